"""``WanTextToVideoPipeline``: a prompt -> a video with a diffusers Wan pipeline folder (Wan 2.1 T2V, Wan 2.2 TI2V
as text-to-video), as diffusers' ``WanPipeline`` computes it, in JAX.

    pipe = WanTextToVideoPipeline.from_pretrained("/models/Wan2.1-T2V-1.3B-Diffusers", dtype="bfloat16")
    frames = pipe(None, "a cat walks on the grass", num_frames=81, height=480, width=832)    # uint8 (F, H, W, 3)

The folder's parts: ``transformer/`` (``jaxvc/models/wan.py``), ``text_encoder/`` + ``tokenizer/`` (UMT5-XXL,
``jaxvc/models/t5_encoder.py``), ``vae/`` (``jaxvc/models/wan_vae.py``, latents normalized per channel) and
``scheduler/``: its own solver (UniPC in Wan's folders) with its flow shift, or ``sampler=NAME`` for another one
on the same shift. Prompts are cleaned of HTML escapes and extra spaces (diffusers' ``prompt_clean``, which also
runs ftfy when it is installed), tokenized to ``max_text_length`` (diffusers' ``max_sequence_length``, 512), encoded
and zeroed past each prompt's ``</s>``. Guidance is classifier-free on the negative prompt, one jitted ``lax.scan``.
``jaxvc generate --model FOLDER`` runs it (a text-to-video model: no ``--reference``). Wan 2.2 A14B's two experts
(``transformer_2``, ``boundary_ratio``) are not supported.
"""
from __future__ import annotations

import functools
import html
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxvc import compile_options, media
from jaxvc.diffusion.sampling import classifier_free_guidance, sample
from jaxvc.diffusion.schedule import load_scheduler_config
from jaxvc.models.video_vae import VideoVAE
from jaxvc.pipeline import CustomVideoPipeline

def is_wan_pipeline_folder(path) -> bool:
    index = Path(path) / "model_index.json"
    if not index.is_file():
        return False
    try:
        return json.loads(index.read_text()).get("_class_name") == "WanPipeline"
    except json.JSONDecodeError:
        return False


def clean_prompt(text: str) -> str:
    """diffusers' Wan ``prompt_clean`` without ftfy: HTML unescaped twice, whitespace runs collapsed."""
    return " ".join(html.unescape(html.unescape(text)).split()).strip()


class WanTextToVideoPipeline:
    """Wan's DiT, UMT5 text encoder and tokenizer, video VAE and scheduler config, loaded from local files."""
    reference_frame = False
    takes_reference = False  # text-to-video: ``jaxvc generate`` refuses --reference
    conditioning = None
    default_video = (81, 480, 832)  # (frames, height, width): Wan 2.1's 480p
    save = staticmethod(CustomVideoPipeline.save)

    def __init__(self, transformer, text_encoder, tokenizer, vae: VideoVAE, params: dict, scheduler_config: dict):
        self.transformer, self.text_encoder, self.tokenizer, self.vae = transformer, text_encoder, tokenizer, vae
        self.params, self.scheduler_config = params, scheduler_config

    @classmethod
    def from_pretrained(cls, folder, *, dtype=None, attention_backend: str | None = None, allow_pickle: bool = False,
                        max_text_length: int = 512, vae_chunk_frames: int | None = 4) -> "WanTextToVideoPipeline":
        """A diffusers ``WanPipeline`` folder (``save_pretrained`` layout); ``dtype`` is the DiT's and the text
        encoder's compute dtype (the VAE computes in float32)."""
        from jaxvc.convert.t5 import load_t5_encoder
        from jaxvc.convert.wan import load_wan
        from jaxvc.convert.wan_vae import load_wan_vae
        from jaxvc.models.t5_encoder import T5Encoder
        from jaxvc.models.t5_tokenizer import T5Tokenizer
        from jaxvc.models.wan import WanTransformer3D

        root = Path(folder)
        index = json.loads((root / "model_index.json").read_text())
        if index.get("transformer_2") and index["transformer_2"][0] is not None or index.get("boundary_ratio"):
            raise ValueError(f"{root}: a two-expert Wan 2.2 pipeline (transformer_2, boundary_ratio), which jaxvc "
                             "does not run; Wan 2.1 T2V and Wan 2.2 TI2V-5B folders are supported")
        for part in ("transformer", "text_encoder", "tokenizer", "vae", "scheduler"):
            if not (root / part).is_dir():
                raise FileNotFoundError(f"{root}: no {part}/ folder (a diffusers WanPipeline folder has transformer/, "
                                        "text_encoder/, tokenizer/, vae/ and scheduler/)")
        overrides = {} if dtype is None else {"dtype": jnp.dtype(dtype)}
        wan_config, wan_params = load_wan(root / "transformer", allow_pickle=allow_pickle,
                                          **overrides, **({} if attention_backend is None
                                                          else {"attention_backend": attention_backend}))
        text_config, text_params = load_t5_encoder(root / "text_encoder", allow_pickle=allow_pickle, **overrides)
        vae_config, vae_params = load_wan_vae(root / "vae", allow_pickle=allow_pickle)
        tokenizer = T5Tokenizer.from_folder(root / "tokenizer", max_length=max_text_length)
        params = {"transformer": wan_params["params"], "text_encoder": text_params["params"],
                  "vae": vae_params["params"]}
        return cls(WanTransformer3D(wan_config), T5Encoder(text_config), tokenizer,
                   VideoVAE(vae_config, chunk_frames=vae_chunk_frames), params,
                   load_scheduler_config(root / "scheduler"))

    def merge_lora(self, path, *, scale: float = 1.0, allow_pickle: bool = False) -> "WanTextToVideoPipeline":
        """Fold a Wan LoRA file (diffusers/peft ``transformer.<module>`` keys) into the DiT at ``scale``."""
        from jaxvc.dit_pipeline import merge_wan_lora

        self.params = {**self.params, "transformer": merge_wan_lora(self.params["transformer"], path, scale=scale,
                                                                     allow_pickle=allow_pickle)}
        return self

    # ---------------------------------------------------------------- parts
    def sampler(self, num_inference_steps: int, name: str | None = None):
        """The folder's scheduler as a jaxvc sampler, or the named one (``jaxvc.diffusion.samplers``) on its shift."""
        from jaxvc.diffusion.samplers import from_scheduler_config, make_sampler

        cfg = self.scheduler_config
        if name is None:
            return from_scheduler_config({"_class_name": "UniPCMultistepScheduler", **cfg}, num_inference_steps)
        shift = float(cfg.get("flow_shift", cfg.get("shift", 1.0)))
        return make_sampler(name, None, num_inference_steps, flow_shift=shift,
                            num_train_timesteps=int(cfg.get("num_train_timesteps", 1000)))

    @functools.cached_property
    def _jitted(self) -> dict:
        jit = compile_options.jit

        def encode_text(params, ids):  # (1, L) -> (1, L, D), zero past </s> as Wan's pipelines feed them
            mask = self.tokenizer.attention_mask(ids)
            return self.text_encoder.apply({"params": params}, ids, mask) * mask[..., None]

        return {"text": jit(encode_text),
                "decode": jit(lambda params, latents: self.vae.decode({"params": params}, latents))}

    @functools.lru_cache(maxsize=8)
    def _generate_fn(self, num_inference_steps: int, guidance_scale: float, progress: bool, sampler_name):
        sampler = self.sampler(num_inference_steps, sampler_name)
        transformer = self.transformer

        def generate(params, text, negative_text, x_T, rng):
            guided = guidance_scale > 1.0  # diffusers runs the unconditional pass only then
            texts = jnp.concatenate([negative_text, text], axis=0) if guided else text  # [uncond; cond]

            def model(x_stacked, t, step_index):
                timesteps = jnp.full((x_stacked.shape[0],), t)
                return transformer.apply({"params": params}, x_stacked, timesteps, texts)

            denoise = classifier_free_guidance(model, guidance_scale) if guided else model
            return sample(denoise, x_T, sampler, rng=rng, progress=True if progress else None,
                          progress_desc="denoising")

        return compile_options.jit(generate)

    def generate(self, reference, prompt: str, *, negative_prompt: str = "", guidance_scale: float = 5.0,
                 num_inference_steps: int = 50, seed: int = 0, num_frames: int = 81, height: int = 480,
                 width: int = 832, progress: bool = False, decode: bool = True, reference_guidance_scale=None,
                 reference_guidance_start: float = 0.0, eta: float = 0.0, sampler: str | None = None):
        """A video (1, F, H, W, 3) in [-1, 1] (unclipped), or with ``decode=False`` the latents (1, F', h, w, c)."""
        if reference is not None or reference_guidance_scale is not None:
            raise ValueError("a Wan text-to-video pipeline takes no reference image")
        if eta:
            raise ValueError("eta is DDIM's; Wan's samplers are flow-matching solvers")
        del reference_guidance_start
        factor = self.vae.downsample_factor
        _, p_h, p_w = self.transformer.config.patch_size
        for name, size, patch in (("height", height, p_h), ("width", width, p_w)):
            if size % (factor * patch):
                raise ValueError(f"{name}={size} must be divisible by {factor * patch} for this model")
        latent_frames = self.vae.latent_frames(num_frames)  # 1 + (num_frames - 1) / 4
        ids = lambda text: jnp.asarray(self.tokenizer([clean_prompt(text)]))  # noqa: E731
        text = self._jitted["text"](self.params["text_encoder"], ids(prompt))
        negative_text = self._jitted["text"](self.params["text_encoder"], ids(negative_prompt))
        shape = (1, latent_frames, height // factor, width // factor, self.transformer.config.in_channels)
        x_T = jax.random.normal(jax.random.key(seed), shape, jnp.float32)
        rng_steps = jax.random.fold_in(jax.random.key(seed), 1)  # the SDE samplers' noise
        latents = self._generate_fn(num_inference_steps, float(guidance_scale), progress, sampler)(
            self.params["transformer"], text, negative_text, x_T, rng_steps)
        return self._jitted["decode"](self.params["vae"], latents) if decode else latents

    def __call__(self, reference_image, prompt: str, *, num_frames: int = 81, height: int = 480, width: int = 832,
                 progress: bool = True, output_type: str = "uint8", **kwargs) -> np.ndarray:
        """One video: uint8 frames (num_frames, height, width, 3), or the latents with ``output_type="latent"``."""
        if reference_image is not None:
            raise ValueError("a Wan text-to-video pipeline takes no reference image")
        out = self.generate(None, prompt, num_frames=num_frames, height=height, width=width, progress=progress,
                            decode=output_type == "uint8", **kwargs)
        if output_type == "latent":
            return np.asarray(out[0])
        return media.to_uint8(np.clip(np.asarray(out[0]), -1.0, 1.0))

