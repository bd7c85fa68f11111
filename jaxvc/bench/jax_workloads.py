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
finished after six minutes, while the host draws take seconds). Inference workloads use the weights cast to the
compute dtype (as a bf16 diffusers pipeline holds them).
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
from jaxvc.bench.timing import compiled_memory_bytes, jax_peak_memory, time_calls
from jaxvc.train.metrics import compiled_flops

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
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _latents(rng, shape):
    return jax.random.normal(rng, shape, jnp.float32)


def _trainable_path(method):
    """The analytic counter's "unet/down_blocks_0/..." paths -> the method's own trainable(path) predicate."""
    return lambda path: method.trainable(("params", *path.split("/"), "kernel"))


def train_step(method, params, batch_size: int, *, warmup: int, iters: int,
               compiler_options: dict | None = None) -> Measurement:
    from jaxvc.train.optim import build_optimizer
    from jaxvc.train.state import new_state, split_params
    from jaxvc.train.step import make_train_step

    optim = ConfigDict(dict(lr=1e-5, schedule="constant", warmup_steps=0, b1=0.9, b2=0.999, eps=1e-8,
                            weight_decay=1e-2, clip_norm=1.0))  # configs/videomaker.py:sd15
    optimizer, schedule = build_optimizer(optim, total_steps=1000)
    trainable, frozen = split_params(params, method.trainable)
    state = jax.jit(lambda t, f: new_state(t, f, optimizer, jax.random.PRNGKey(1), use_ema=False))(trainable, frozen)
    frames, latent, channels = method.num_frames, method.latent_size, method.latent_channels
    keys = jax.random.split(jax.random.key(2), 3)
    batch = {"latents": _latents(keys[0], (batch_size, frames, latent, latent, channels)),
             "reference_latent": _latents(keys[1], (batch_size, 1, latent, latent, channels)),
             "tokens": jax.random.randint(keys[2], (batch_size, 77), 0, method.text_encoder.config.vocab_size,
                                          jnp.int32)}
    step = jax.jit(make_train_step(method, optimizer, schedule), donate_argnums=0)
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile(compiler_options)
    compile_s = time.perf_counter() - start
    holder = {"state": state}

    def call():
        holder["state"], metrics = compiled(holder["state"], batch)
        return metrics["loss"]

    timing = time_calls(call, jax.block_until_ready, warmup=warmup, iters=iters)
    loss = float(call())
    memory, kind = jax_peak_memory()
    counts = analytic.train_step_flops(method.unet.config, method.text_encoder.config, batch_size, frames, latent,
                                       _trainable_path(method))
    return Measurement("train step", "jaxvc", method.image_size, batch_size, timing.median_s, timing.min_s,
                       peak_memory_bytes=memory, memory_kind=kind, xla_flops=compiled_flops(compiled),
                       analytic_flops=counts["total"], compile_s=compile_s,
                       xla_planned_bytes=compiled_memory_bytes(compiled),
                       extra={"times_s": timing.times_s, "loss": loss, "analytic_forward": counts["forward"],
                              "analytic_backward": counts["backward"]})


def sampling(method, params, batch_size: int, *, steps: int, guidance: float, warmup: int, iters: int,
             loop_counted_once: bool, compiler_options: dict | None = None) -> Measurement:
    pipe = method.pipeline(params, tokenizer=None)
    dtype = method.unet.config.dtype
    unet_variables = _cast_floats(pipe.params["unet"], dtype)
    frames, latent, channels = method.num_frames, method.latent_size, method.latent_channels
    keys = jax.random.split(jax.random.key(3), 4)
    text_dim = method.text_encoder.config.hidden_size
    text = jax.random.normal(keys[0], (batch_size, 77, text_dim), jnp.float32)
    negative = jax.random.normal(keys[1], (batch_size, 77, text_dim), jnp.float32)
    reference = _latents(keys[2], (batch_size, 1, latent, latent, channels))
    x_T = _latents(keys[3], (batch_size, frames, latent, latent, channels))
    generate = pipe._generate_fn(steps, 0.0, float(guidance), None, 0, False)  # the pipeline's own jitted generation
    args = (unet_variables, text, negative, reference, x_T, jax.random.key(4))
    start = time.perf_counter()
    compiled = generate.lower(*args).compile(compiler_options)
    compile_s = time.perf_counter() - start
    timing = time_calls(lambda: compiled(*args), jax.block_until_ready, warmup=warmup, iters=iters)
    memory, kind = jax_peak_memory()
    xla = compiled_flops(compiled)
    if xla is not None and loop_counted_once:
        xla *= steps  # XLA counted the scan body (one guided step) once
    return Measurement("sampling", "jaxvc", method.image_size, batch_size, timing.median_s, timing.min_s,
                       peak_memory_bytes=memory, memory_kind=kind, xla_flops=xla,
                       analytic_flops=analytic.sampling_flops(method.unet.config, batch_size, frames, latent, steps),
                       compile_s=compile_s, xla_planned_bytes=compiled_memory_bytes(compiled),
                       extra={"times_s": timing.times_s, "steps": steps, "guidance": guidance})


def vae_decode(method, params, batch_size: int, *, chunk: int | None, warmup: int, iters: int,
               compiler_options: dict | None = None) -> Measurement:
    from jaxvc.models.vae import decode_video

    vae = method.vae
    variables = {"params": _cast_floats(params["params"]["vae"], vae.config.dtype)}
    frames, latent, channels = method.num_frames, method.latent_size, method.latent_channels
    latents = _latents(jax.random.key(5), (batch_size, frames, latent, latent, channels))
    decode = jax.jit(lambda v, z: decode_video(vae, v, z, chunk=chunk))
    start = time.perf_counter()
    compiled = decode.lower(variables, latents).compile(compiler_options)
    compile_s = time.perf_counter() - start
    timing = time_calls(lambda: compiled(variables, latents), jax.block_until_ready, warmup=warmup, iters=iters)
    memory, kind = jax_peak_memory()
    xla = compiled_flops(compiled)
    chunked = chunk is not None and chunk < batch_size * frames
    return Measurement("VAE decode", "jaxvc", method.image_size, batch_size, timing.median_s, timing.min_s,
                       peak_memory_bytes=memory, memory_kind=kind,
                       # a chunked decode is a lax.map loop, whose body XLA counts once: leave the count out
                       xla_flops=None if chunked else xla,
                       analytic_flops=analytic.vae_decode_flops(vae.config, batch_size * frames, latent),
                       compile_s=compile_s, xla_planned_bytes=compiled_memory_bytes(compiled),
                       extra={"times_s": timing.times_s, "chunk": chunk})
