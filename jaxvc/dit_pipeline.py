"""``SubjectDiTPipeline``: a reference image + a prompt -> a video, with the disentangled S2V method on the Wan DiT.

    pipe = CustomVideoPipeline.from_pretrained("runs/s2v")        # a training run of configs/disentangled_s2v.py
    frames = pipe("subject.png", "a dog running on the beach", num_frames=8, height=64, width=64)

Sampling follows the authors' inference on jaxvc's flow-matching DiT: flow-matching Euler steps (the method's
shift; ``sampler="unipc"`` (Wan's pipelines' own solver) or ``"dpm++"`` use the same shift), classifier-free
guidance on the text only: both halves carry the reference's tokens, the unconditional half the negative prompt
(default "", without ``<cls>``), the conditional half ``"<cls> " + prompt``. The loop is one jitted ``lax.scan``
(``jaxvc/diffusion/sampling.py``). The interface is ``CustomVideoPipeline``'s, so ``jaxvc generate`` runs it.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxvc import compile_options, media
from jaxvc.diffusion.samplers import make_sampler
from jaxvc.diffusion.sampling import classifier_free_guidance, sample
from jaxvc.parallel.inference import MeshPlacement
from jaxvc.pipeline import CustomVideoPipeline, batch_arguments, load_reference_image, model_settings


def merge_wan_lora(transformer_params, path, *, scale: float = 1.0, allow_pickle: bool = False):
    """A Wan DiT's parameters with a LoRA file (diffusers/peft ``transformer.<module>`` keys) folded in at
    ``scale``."""
    from jaxvc.convert.lora import read_lora
    from jaxvc.models import lora

    loaded = read_lora(path, {"transformer": transformer_params}, allow_pickle=allow_pickle, scale=scale)
    if "transformer" not in loaded.adapters:
        raise ValueError(f"{path}: no LoRA for the Wan transformer in this file")
    return lora.merge(transformer_params, loaded.adapters["transformer"])


class SubjectDiTPipeline(MeshPlacement):
    """The trained ``DisentangledS2V`` method's DiT (with its LoRA), text encoder, tokenizer and VAE;
    ``shard("fsdp=8")`` places them on a device mesh (``jaxvc/parallel/inference.py``)."""
    reference_frame = False  # no extra UNet frame: the reference enters as its own token stream
    samples_batches = True  # ``generate`` takes a list of prompts: B videos in one sampling loop
    takes_reference = True
    conditioning = None
    save = CustomVideoPipeline.save  # at ``default_fps`` unless told
    # the rate of the method's training clips (49 frames at 8 fps): the rate its videos play right at
    default_fps = 8
    generate_videos = CustomVideoPipeline.generate_videos  # host images and prompts -> uint8 videos, via generate
    merge_loras = CustomVideoPipeline.merge_loras  # merge_lora each (file, scale), then store_weights
    # the method's inference (50 steps, CFG 6); a run's pipeline takes its run's (``TrainedRun.sampling``)
    default_sampling = {"num_inference_steps": 50, "guidance_scale": 6.0, "eta": 0.0, "sampler": None,
                        "negative_prompt": ""}

    def __init__(self, method, params, tokenizer):
        self.method, self.params, self.tokenizer = method, params, tokenizer
        if getattr(method, "sampling_defaults", None):  # the run's validation sampling
            self.default_sampling = dict(method.sampling_defaults)

    @property
    def default_video(self) -> tuple[int, int, int]:
        """(frames, height, width) the method trained on (its validation frames): ``jaxvc generate``'s defaults."""
        return self.method.sample_frames, self.method.height, self.method.width

    def sampler_name(self, sampler: str | None = None) -> str:
        """The sampler ``generate(sampler=sampler)`` runs: ``sampler``, else the method's flow-matching Euler."""
        return sampler or "euler"

    @property
    def compute_dtype(self) -> str:
        """The dtype the DiT computes in and keeps its matrices in."""
        return jnp.dtype(self.method.transformer.config.dtype).name

    @property
    def attention_backend(self) -> str:
        return self.method.transformer.config.attention_backend

    def merge_lora(self, path, *, scale: float = 1.0, allow_pickle: bool = False) -> "SubjectDiTPipeline":
        """Fold a Wan LoRA file (diffusers/peft ``transformer.<module>`` keys) into the DiT's weights at ``scale``."""
        tree = self.params["params"]
        merged = merge_wan_lora(tree["transformer"], path, scale=scale, allow_pickle=allow_pickle)
        self.params = {"params": {**tree, "transformer": merged}}
        return self

    def store_weights(self, dtype) -> "SubjectDiTPipeline":
        """Keep the DiT's (and UMT5's) weight matrices in ``dtype``, the dtype they compute in: the same videos at
        half their memory in bf16 (``jaxvc/models/weight_storage.py``). A CLIP text encoder and the VAE compute in
        float32; the LoRA adapters stay as trained."""
        from jaxvc.models.weight_storage import store_weights

        parts = ("transformer", "text_encoder") if self.method.t5 else ("transformer",)
        tree = self.params["params"]
        self.params = {"params": {**tree, **{part: store_weights(tree[part], dtype) for part in parts}}}
        return self

    def abstract_params(self) -> dict:
        return self.method.abstract_params()

    @functools.cached_property
    def _jitted(self) -> dict:
        method = self.method
        jit = compile_options.jit
        return {"text": jit(lambda params, ids: method.encode_text(params, ids)),
                "encode": jit(method.encode_pixels), "decode": jit(method.decode_latents)}

    @functools.lru_cache(maxsize=8)
    def _generate_fn(self, num_inference_steps: int, guidance_scale: float, progress: bool,
                     sampler_name: str = "euler"):
        method = self.method
        sampler = make_sampler(sampler_name, None, num_inference_steps, flow_shift=method.options.flow_shift,
                               num_train_timesteps=method.options.num_train_timesteps)

        def generate(params, text, negative_text, reference_latent, x_T, rng):
            texts = jnp.concatenate([negative_text, text], axis=0)            # [uncond; cond]
            references = jnp.concatenate([reference_latent, reference_latent], axis=0)  # the subject in both

            def model(x_stacked, t, step_index):
                return method.velocity(params, x_stacked, jnp.full((x_stacked.shape[0],), t), texts, references)

            return sample(classifier_free_guidance(model, guidance_scale), x_T, sampler, rng=rng,
                          progress=True if progress else None, progress_desc="denoising")

        return compile_options.jit(generate)

    def generate(self, reference, prompt, *, negative_prompt=None, guidance_scale: float | None = None,
                 num_inference_steps: int | None = None, seed=0, num_frames: int | None = None,
                 height: int | None = None, width: int | None = None, progress: bool = False, decode: bool = True,
                 reference_guidance_scale=None, reference_guidance_start: float = 0.0, eta: float | None = None,
                 sampler: str | None = None):
        """reference (1, height, width, 3) in [-1, 1] -> video (1, F, height, width, 3) in [-1, 1] (unclipped), or
        with ``decode=False`` the latents. Traceable (the trainer's validation samples run it under jit). A batch
        as ``CustomVideoPipeline.generate``'s: B prompts, references (B, height, width, 3), one or B negative
        prompts and seeds (one int: video i gets seed + i), each video as it would be alone."""
        if reference is None:
            raise ValueError("this model generates a given subject: pass a reference image")
        if reference_guidance_scale is not None or eta:
            raise ValueError("the disentangled S2V sampler guides the text only (reference_guidance_scale) and is "
                             "deterministic (eta = 0)")
        del reference_guidance_start
        settings = model_settings(self, negative_prompt=negative_prompt, guidance_scale=guidance_scale,
                                  num_inference_steps=num_inference_steps, num_frames=num_frames, height=height,
                                  width=width, sampler=sampler)  # None: the run's (its size, its validation)
        prompts, negatives, seeds = batch_arguments(prompt, settings["negative_prompt"], seed)
        with self.on_mesh():
            return self._generate(reference, prompts, negatives, settings["guidance_scale"],
                                  settings["num_inference_steps"], seeds, settings["num_frames"], settings["height"],
                                  settings["width"], progress, decode, settings["sampler"])

    def _generate(self, reference, prompts, negatives, guidance_scale, num_inference_steps, seeds, num_frames,
                  height, width, progress, decode, sampler):
        factor = 1 if self.method.vae is None else self.method.vae.downsample_factor
        latent_frames = self.method.latent_frames(num_frames)  # Wan VAE: 1 + (num_frames - 1) / 4
        _, p_h, p_w = self.method.transformer.config.patch_size
        for name, size, patch in (("height", height, p_h), ("width", width, p_w)):
            if size % (factor * patch):
                raise ValueError(f"{name}={size} must be divisible by {factor * patch} for this model")
        batch = len(prompts)
        if tuple(reference.shape) != (batch, height, width, 3):
            raise ValueError(f"reference must be ({batch}, {height}, {width}, 3) in [-1, 1], got "
                             f"{tuple(reference.shape)}")
        reference_latent = self._jitted["encode"](self.params, reference[:, None])  # (B, 1, h, w, c)
        ids = lambda texts: jnp.asarray(self.tokenizer(list(texts)))
        text = self._jitted["text"](self.params, ids(self.method.prompt(prompt) for prompt in prompts))
        negative_text = self._jitted["text"](self.params, ids(negatives))
        shape = (1, latent_frames, height // factor, width // factor, self.method.transformer.config.in_channels)
        # video i's noise from its own seed, as alone; the SDE samplers' noise from fold_in(seed, 1)
        x_T = jnp.concatenate([jax.random.normal(jax.random.key(seed), shape, jnp.float32) for seed in seeds])
        step_keys = [jax.random.fold_in(jax.random.key(seed), 1) for seed in seeds]
        rng_steps = step_keys[0] if batch == 1 else jnp.stack(step_keys)
        latents = self._generate_fn(num_inference_steps, float(guidance_scale), progress, sampler or "euler")(
            self.params, text, negative_text, reference_latent, x_T, rng_steps)
        return self._jitted["decode"](self.params, latents) if decode else latents

    def __call__(self, reference_image, prompt: str, *, num_frames: int | None = None, height: int | None = None,
                 width: int | None = None, progress: bool = True, output_type: str = "uint8", **kwargs) -> np.ndarray:
        """One video: uint8 frames (num_frames, height, width, 3), or the latents with ``output_type="latent"``;
        a size left None is the method's (``default_video``), the sampling its run's."""
        if reference_image is None:
            raise ValueError("this model generates a given subject: pass a reference image")
        frames, default_height, default_width = self.default_video
        num_frames = frames if num_frames is None else num_frames
        height = default_height if height is None else height
        width = default_width if width is None else width
        reference = jnp.asarray(load_reference_image(reference_image, height, width))[None]
        out = self.generate(reference, prompt, num_frames=num_frames, height=height, width=width,
                            progress=progress, decode=output_type == "uint8", **kwargs)
        if output_type == "latent":
            return np.asarray(out[0])
        return media.to_uint8(np.clip(np.asarray(out[0]), -1.0, 1.0))
