"""The jaxvc side of the benchmark, through the library's real code paths.

* train step: ``VideoMaker.loss`` (GIRL, PISA, condition dropout, frozen CLIP text encoder) inside the trainer's
  ``make_train_step`` (value_and_grad over the trainable subset = spatial attn1 + motion modules, global-norm
  clipping + AdamW from ``build_optimizer``, non-finite guard), jitted with the state donated. The batch carries
  latents (``latents``, ``reference_latent``) and token ids, as a latent-cached data pipeline would.
* sampling: ``CustomVideoPipeline``'s jitted generation (one ``lax.scan`` over 30 DDIM steps, guidance with the
  zero-reference unconditional branch, UNet on the doubled batch at F+1 frames); latents in, latents out.
* VAE decode: ``decode_video`` of B x F latents.

Weights are random, drawn with numpy on the host and put on the device (``init_params``): compiling
every layer's initializer is slow everywhere (minutes on a CPU; on an H200 the jitted SD1.5 initializer had not
finished after six minutes, while the host draws take seconds). Sampling keeps the UNet's weights as
``jaxvc generate --dtype`` does (matrices in the compute dtype, ``jaxvc/models/weight_storage.py``; until session 29
every float was cast, norms included, as a bf16 diffusers pipeline holds them); the VAE decode casts its floats.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from jaxvc.bench import flops as analytic
from jaxvc.bench.report import Measurement
from jaxvc.bench.sizes import ModelConfigs
from jaxvc.bench.timing import jax_peak_memory, time_calls
from jaxvc.models.weight_storage import store_weights
from jaxvc.train.metrics import compiled_flops, compiled_memory_bytes

EMPTY_PROMPT = [49406] + [49407] * 76  # CLIP <|startoftext|> then <|endoftext|> padding


def build_method(configs: ModelConfigs, frames: int, image_size: int):
    from jaxvc.methods.videomaker import VideoMaker, VideoMakerOptions

    return VideoMaker(configs.unet, configs.text, configs.vae, VideoMakerOptions(), np.array([EMPTY_PROMPT]),
                      num_frames=frames, image_size=image_size)


def init_params(method, seed: int = 0):
    """All weights (UNet, text encoder, VAE) as one ``{"params": ...}`` tree of random values: numpy draws shaped by
    ``method.abstract_params()`` (kernels ~ N(0, 1/fan_in), norm scales 1, biases 0), not ``jax.jit(
    method.init_params)``, whose compile of every layer's initializer costs minutes at SD1.5 size; timing does not
    care which random values the weights hold.
    """
    from jaxvc.train.state import unbox

    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "scale":
            return jnp.ones(leaf.shape, leaf.dtype)
        if name == "bias":
            return jnp.zeros(leaf.shape, leaf.dtype)
        fan_in = int(np.prod(leaf.shape[:-1])) if name == "kernel" else 2500  # embeddings: std 0.02
        return jnp.asarray(rng.standard_normal(leaf.shape, np.float32) / np.sqrt(fan_in), leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, unbox(method.abstract_params()))


def _cast_floats(tree, dtype):
    def cast(x):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        return jax.ShapeDtypeStruct(x.shape, dtype) if _is_abstract(x) else x.astype(dtype)
    return jax.tree.map(cast, tree)


def _is_abstract(x) -> bool:
    return isinstance(x, jax.ShapeDtypeStruct)


def _shape_only(tree) -> bool:
    """Whether a weight tree holds ShapeDtypeStructs (lowering) rather than arrays (timing)."""
    return any(_is_abstract(x) for x in jax.tree.leaves(tree))


def _latents(rng, shape):
    return jax.random.normal(rng, shape, jnp.float32)


def _trainable_path(method):
    """The analytic counter's "unet/down_blocks_0/..." paths -> the method's own trainable(path) predicate."""
    return lambda path: method.trainable(("params", *path.split("/"), "kernel"))


# ---------------------------------------------------------------- the programs: a jitted function and its arguments
# Each takes concrete parameters (to time the program) or ShapeDtypeStructs from ``method.abstract_params()`` (to
# lower it for a platform this host does not have, jaxvc/bench/cross_lower.py); the arguments follow suit.

def train_step_program(method, params, batch_size: int):
    """(jitted ``make_train_step`` with the state donated, (state, batch)): VideoMaker's train step as the trainer
    runs it, with the optimizer of configs/videomaker.py:sd15."""
    from jaxvc.train.optim import build_optimizer
    from jaxvc.train.state import new_state, split_params
    from jaxvc.train.step import make_train_step

    optim = ConfigDict(dict(lr=1e-5, schedule="constant", warmup_steps=0, b1=0.9, b2=0.999, eps=1e-8,
                            weight_decay=1e-2, clip_norm=1.0))  # configs/videomaker.py:sd15
    optimizer, schedule = build_optimizer(optim, total_steps=1000)
    trainable, frozen = split_params(params, method.trainable)
    make_state = lambda t, f: new_state(t, f, optimizer, jax.random.PRNGKey(1), use_ema=False)
    abstract = _shape_only(params)
    state = jax.eval_shape(make_state, trainable, frozen) if abstract else jax.jit(make_state)(trainable, frozen)
    frames, latent, channels = method.num_frames, method.latent_frame_size[0], method.latent_channels
    shapes = {"latents": ((batch_size, frames, latent, latent, channels), jnp.float32),
              "reference_latent": ((batch_size, 1, latent, latent, channels), jnp.float32),
              "tokens": ((batch_size, 77), jnp.int32)}
    if abstract:
        batch = {name: jax.ShapeDtypeStruct(shape, dtype) for name, (shape, dtype) in shapes.items()}
    else:
        keys = jax.random.split(jax.random.key(2), 3)
        batch = {"latents": _latents(keys[0], shapes["latents"][0]),
                 "reference_latent": _latents(keys[1], shapes["reference_latent"][0]),
                 "tokens": jax.random.randint(keys[2], shapes["tokens"][0], 0,
                                              method.text_encoder.config.vocab_size, jnp.int32)}
    return jax.jit(make_train_step(method, optimizer, schedule), donate_argnums=0), (state, batch)


def sampling_program(method, params, batch_size: int, *, steps: int, guidance: float):
    """(``CustomVideoPipeline``'s own jitted generation, its arguments): 30 guided DDIM steps in one ``lax.scan``,
    the UNet's weights as ``jaxvc generate --dtype`` keeps them."""
    pipe = method.pipeline(params, tokenizer=None)
    unet = pipe.params["unet"]
    unet_variables = {**unet, "params": store_weights(unet["params"], method.unet.config.dtype)}
    frames, latent, channels = method.num_frames, method.latent_frame_size[0], method.latent_channels
    text_shape = (batch_size, 77, method.text_encoder.config.hidden_size)
    reference_shape, video_shape = (batch_size, 1, latent, latent, channels), (batch_size, frames, latent, latent,
                                                                               channels)
    if _shape_only(unet_variables):
        arrays = [jax.ShapeDtypeStruct(shape, jnp.float32)
                  for shape in (text_shape, text_shape, reference_shape, video_shape)]
        rng = jax.eval_shape(lambda: jax.random.key(4))
    else:
        keys = jax.random.split(jax.random.key(3), 4)
        arrays = [_latents(key, shape) for key, shape in zip(keys, (text_shape, text_shape, reference_shape,
                                                                    video_shape))]
        rng = jax.random.key(4)
    generate = pipe._generate_fn(steps, 0.0, float(guidance), None, 0, False)
    return generate, (unet_variables, pipe.params["adapters"], pipe.params["conditioning"], *arrays, rng)


def vae_decode_program(method, params, batch_size: int, *, chunk: int | None):
    """(jitted ``decode_video``, (variables, latents)): B x F latents to frames, ``chunk`` frames at a time."""
    from jaxvc.models.vae import decode_video

    vae = method.vae
    variables = {"params": _cast_floats(params["params"]["vae"], vae.config.dtype)}
    shape = (batch_size, method.num_frames, *method.latent_frame_size, method.latent_channels)
    abstract = _shape_only(variables)
    latents = jax.ShapeDtypeStruct(shape, jnp.float32) if abstract else _latents(jax.random.key(5), shape)
    def vae_decode(variables, latents):  # named: profiles (--profile) show the program by this name
        return decode_video(vae, variables, latents, chunk=chunk)

    return jax.jit(vae_decode), (variables, latents)


def _compile(program, args, compiler_options):
    start = time.perf_counter()
    compiled = program.lower(*args).compile(compiler_options)
    return compiled, time.perf_counter() - start


# ------------------------------------------------------------------------------------------------------ the timings
def train_step(method, params, batch_size: int, *, warmup: int, iters: int,
               compiler_options: dict | None = None, trace=None) -> Measurement:
    step, (state, batch) = train_step_program(method, params, batch_size)
    compiled, compile_s = _compile(step, (state, batch), compiler_options)
    holder = {"state": state}

    def call():
        holder["state"], metrics = compiled(holder["state"], batch)
        return metrics["loss"]

    timing = time_calls(call, jax.block_until_ready, warmup=warmup, iters=iters, trace=trace)
    loss = float(call())
    memory, kind = jax_peak_memory()
    counts = analytic.train_step_flops(method.unet.config, method.text_encoder.config, batch_size, method.num_frames,
                                       method.latent_frame_size[0], _trainable_path(method))
    return Measurement("train step", "jaxvc", method.height, batch_size, timing.median_s, timing.min_s,
                       peak_memory_bytes=memory, memory_kind=kind, xla_flops=compiled_flops(compiled),
                       analytic_flops=counts["total"], compile_s=compile_s,
                       xla_planned_bytes=compiled_memory_bytes(compiled),
                       extra={"times_s": timing.times_s, "loss": loss, "analytic_forward": counts["forward"],
                              "analytic_backward": counts["backward"]})


def sampling(method, params, batch_size: int, *, steps: int, guidance: float, warmup: int, iters: int,
             loop_counted_once: bool, compiler_options: dict | None = None, trace=None) -> Measurement:
    generate, args = sampling_program(method, params, batch_size, steps=steps, guidance=guidance)
    compiled, compile_s = _compile(generate, args, compiler_options)
    timing = time_calls(lambda: compiled(*args), jax.block_until_ready, warmup=warmup, iters=iters,
                        trace=trace)
    memory, kind = jax_peak_memory()
    xla = compiled_flops(compiled)
    if xla is not None and loop_counted_once:
        xla *= steps  # XLA counted the scan body (one guided step) once
    return Measurement("sampling", "jaxvc", method.height, batch_size, timing.median_s, timing.min_s,
                       peak_memory_bytes=memory, memory_kind=kind, xla_flops=xla,
                       analytic_flops=analytic.sampling_flops(method.unet.config, batch_size, method.num_frames,
                                                              method.latent_frame_size[0], steps),
                       compile_s=compile_s, xla_planned_bytes=compiled_memory_bytes(compiled),
                       extra={"times_s": timing.times_s, "steps": steps, "guidance": guidance})


def vae_decode(method, params, batch_size: int, *, chunk: int | None, warmup: int, iters: int,
               compiler_options: dict | None = None, trace=None) -> Measurement:
    decode, args = vae_decode_program(method, params, batch_size, chunk=chunk)
    compiled, compile_s = _compile(decode, args, compiler_options)
    timing = time_calls(lambda: compiled(*args), jax.block_until_ready, warmup=warmup, iters=iters,
                        trace=trace)
    memory, kind = jax_peak_memory()
    xla = compiled_flops(compiled)
    chunked = chunk is not None and chunk < batch_size * method.num_frames
    return Measurement("VAE decode", "jaxvc", method.height, batch_size, timing.median_s, timing.min_s,
                       peak_memory_bytes=memory, memory_kind=kind,
                       # a chunked decode is a lax.map loop, whose body XLA counts once: leave the count out
                       xla_flops=None if chunked else xla,
                       analytic_flops=analytic.vae_decode_flops(method.vae.config, batch_size * method.num_frames,
                                                                method.latent_frame_size[0]),
                       compile_s=compile_s, xla_planned_bytes=compiled_memory_bytes(compiled),
                       extra={"times_s": timing.times_s, "chunk": chunk})
