"""``WanTextToVideoPipeline``: a prompt -> a video with a diffusers Wan pipeline folder (Wan 2.1 T2V, Wan 2.2 T2V
A14B with its two experts, Wan 2.2 TI2V as text-to-video), as diffusers' ``WanPipeline`` computes it, in JAX.

    pipe = WanTextToVideoPipeline.from_pretrained("/models/Wan2.1-T2V-1.3B-Diffusers", dtype="bfloat16")
    frames = pipe(None, "a cat walks on the grass", num_frames=81, height=480, width=832)    # uint8 (F, H, W, 3)

The folder's parts: ``transformer/`` (``jaxvc/models/wan.py``), ``text_encoder/`` + ``tokenizer/`` (UMT5-XXL,
``jaxvc/models/t5_encoder.py``), ``vae/`` (``jaxvc/models/wan_vae.py``, latents normalized per channel) and
``scheduler/``: its own solver (UniPC in Wan's folders) with its flow shift, or ``sampler=NAME`` for another one
on the same shift. Prompts are cleaned of HTML escapes and extra spaces (diffusers' ``prompt_clean``, which also
runs ftfy when it is installed), tokenized to ``max_text_length`` (diffusers' ``max_sequence_length``, 512), encoded
and zeroed past each prompt's ``</s>``. Guidance is classifier-free on the negative prompt, one jitted ``lax.scan``.

Wan 2.2 A14B folders have two experts of the same shape: ``transformer/`` denoises the steps whose timestep is at
least ``boundary_ratio`` x the training timesteps (the high-noise layout), ``transformer_2/`` the rest, each with
its own guidance scale (``guidance_scale``, ``guidance_scale_2``). Which expert a step uses is known on the host
from the sampler's timesteps, so the scan body picks it with one ``lax.cond`` (both experts stay on the device).
``jaxvc generate --model FOLDER`` runs it (a text-to-video model: no ``--reference``); image-to-video folders are
``jaxvc/wan_i2v_pipeline.py``'s, which reuses this loop with its conditioning.
"""
from __future__ import annotations

import functools
import html
import json
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxvc import compile_options, media
from jaxvc.diffusion.sampling import classifier_free_guidance, sample
from jaxvc.diffusion.schedule import load_scheduler_config
from jaxvc.models.video_vae import VideoVAE
from jaxvc.parallel.inference import MeshPlacement
from jaxvc.pipeline import CustomVideoPipeline, model_settings

PIPELINE_CLASSES = ("WanPipeline", "WanImageToVideoPipeline")


def wan_pipeline_class(path) -> str | None:
    """The diffusers class named by a folder's ``model_index.json`` when it is a Wan pipeline jaxvc runs."""
    index = Path(path) / "model_index.json"
    if not index.is_file():
        return None
    try:
        name = json.loads(index.read_text()).get("_class_name")
    except json.JSONDecodeError:
        return None
    return name if name in PIPELINE_CLASSES else None


def is_wan_pipeline_folder(path) -> bool:
    return wan_pipeline_class(path) is not None


def load_wan_pipeline(path, **kwargs):
    """The jaxvc pipeline of a diffusers Wan folder: text-to-video or image-to-video, by its ``model_index.json``."""
    if wan_pipeline_class(path) == "WanImageToVideoPipeline":
        from jaxvc.wan_i2v_pipeline import WanImageToVideoPipeline

        return WanImageToVideoPipeline.from_pretrained(path, **kwargs)
    return WanTextToVideoPipeline.from_pretrained(path, **kwargs)


def clean_prompt(text: str) -> str:
    """diffusers' Wan ``prompt_clean`` without ftfy: HTML unescaped twice, whitespace runs collapsed."""
    return " ".join(html.unescape(html.unescape(text)).split()).strip()


class WanTextToVideoPipeline(MeshPlacement):
    """Wan's DiT (one or two experts), UMT5 text encoder and tokenizer, video VAE and scheduler config, loaded from
    local files. ``params`` holds ``transformer`` (and ``transformer_2``), ``text_encoder`` and ``vae``;
    ``shard("fsdp=8")`` places them on a device mesh (``jaxvc/parallel/inference.py``)."""
    reference_frame = False
    takes_reference = False  # text-to-video: ``jaxvc generate`` refuses --reference
    conditioning = None
    save = CustomVideoPipeline.save  # at ``default_fps`` unless told
    # diffusers' WanPipeline / WanImageToVideoPipeline defaults, with the folder's scheduler (UniPC)
    default_sampling = {"num_inference_steps": 50, "guidance_scale": 5.0, "eta": 0.0, "sampler": None,
                        "negative_prompt": ""}

    def __init__(self, transformer, text_encoder, tokenizer, vae: VideoVAE, params: dict, scheduler_config: dict, *,
                 boundary_ratio: float | None = None, expand_timesteps: bool = False):
        self.transformer, self.text_encoder, self.tokenizer, self.vae = transformer, text_encoder, tokenizer, vae
        self.params, self.scheduler_config = params, scheduler_config
        self.boundary_ratio, self.expand_timesteps = boundary_ratio, expand_timesteps
        if (boundary_ratio is None) != ("transformer_2" not in params):
            raise ValueError("a Wan pipeline has two experts (params['transformer_2']) exactly when it has a "
                             f"boundary_ratio; got boundary_ratio={boundary_ratio} and params {sorted(params)}")

    @property
    def default_video(self) -> tuple[int, int, int]:
        """(frames, height, width) ``jaxvc generate`` uses unless told: Wan 2.2 TI2V-5B's 121 x 704 x 1280 (its
        ``expand_timesteps`` folders), 81 x 480 x 832 (480p) for the others."""
        return (121, 704, 1280) if self.expand_timesteps else (81, 480, 832)

    @property
    def default_fps(self) -> int:
        """The rate Wan's videos are made for (``save``, ``jaxvc generate --fps``): Wan 2.2 TI2V-5B's 24 (its
        ``expand_timesteps`` folders; Wan's ``sample_fps`` and diffusers' TI2V example), 16 for Wan 2.1 and Wan 2.2
        A14B. Written at another rate a video plays too fast or too slow, and ``jaxvc eval``'s dynamic degree, which
        reads the rate from the container, subsamples it wrongly."""
        return 24 if self.expand_timesteps else 16

    def sampler_name(self, sampler: str | None = None) -> str:
        """The sampler ``generate(sampler=sampler)`` runs: ``sampler``, else the folder's own scheduler (its class,
        e.g. UniPCMultistepScheduler: ``scheduler/``'s settings as they are, which no ``sampler`` name stands for)."""
        return sampler or self.scheduler_config.get("_class_name") or "UniPCMultistepScheduler"

    @property
    def compute_dtype(self) -> str:
        """The dtype the DiT(s) and UMT5 compute in and keep their matrices in (the VAE: float32)."""
        return jnp.dtype(self.transformer.config.dtype).name

    @property
    def attention_backend(self) -> str:
        return self.transformer.config.attention_backend

    @property
    def has_two_experts(self) -> bool:
        return self.boundary_ratio is not None

    @classmethod
    def from_pretrained(cls, folder, *, dtype=None, attention_backend: str | None = None, allow_pickle: bool = False,
                        max_text_length: int = 512, vae_chunk_frames: int | None = 4,
                        lora: Sequence[tuple[str, float]] = (), lora_2: Sequence[tuple[str, float]] = ()):
        """A diffusers ``WanPipeline`` folder (``save_pretrained`` layout); ``dtype`` is the DiT's and the text
        encoder's compute dtype, and the dtype their matrices are stored in (the VAE computes in float32).
        ``lora`` / ``lora_2``: (file, scale) pairs merged into ``transformer`` / ``transformer_2`` (a two-expert
        folder's low-noise expert) in float32 as each loads, before its matrices are stored in ``dtype``."""
        return cls(**cls._load_parts(Path(folder), dtype=dtype, attention_backend=attention_backend,
                                     allow_pickle=allow_pickle, max_text_length=max_text_length,
                                     vae_chunk_frames=vae_chunk_frames, lora=lora, lora_2=lora_2))

    @classmethod
    def _load_parts(cls, root: Path, *, dtype, attention_backend, allow_pickle, max_text_length,
                    vae_chunk_frames, lora=(), lora_2=()) -> dict:
        """The constructor's arguments from a folder: the parts every Wan pipeline folder has."""
        from jaxvc.convert.t5 import load_t5_encoder
        from jaxvc.convert.wan import load_wan
        from jaxvc.convert.wan_vae import load_wan_vae
        from jaxvc.dit_pipeline import merge_wan_lora
        from jaxvc.models.t5_encoder import T5Encoder
        from jaxvc.models.t5_tokenizer import T5Tokenizer
        from jaxvc.models.wan import WanTransformer3D
        from jaxvc.models.weight_storage import store_weights

        index = json.loads((root / "model_index.json").read_text())
        has_part = lambda part: bool(index.get(part)) and index[part][0] is not None  # noqa: E731
        boundary_ratio = index.get("boundary_ratio")
        if has_part("transformer_2") != (boundary_ratio is not None) or not has_part("transformer"):
            raise ValueError(f"{root}/model_index.json: transformer={index.get('transformer')}, transformer_2="
                             f"{index.get('transformer_2')}, boundary_ratio={boundary_ratio}; jaxvc runs one "
                             "transformer, or two (transformer, transformer_2) split at a boundary_ratio")
        experts = ("transformer", "transformer_2") if boundary_ratio is not None else ("transformer",)
        if lora_2 and len(experts) == 1:
            raise ValueError(f"{root} has one denoiser: a LoRA for a low-noise expert (lora_2, --lora-2) "
                             "needs a two-expert Wan 2.2 folder (A14B)")
        for part in (*experts, "text_encoder", "tokenizer", "vae", "scheduler"):
            if not (root / part).is_dir():
                raise FileNotFoundError(f"{root}: no {part}/ folder (a diffusers Wan pipeline folder has "
                                        f"{', '.join(experts)}, text_encoder/, tokenizer/, vae/ and scheduler/)")
        overrides = {} if dtype is None else {"dtype": jnp.dtype(dtype)}
        backend = {} if attention_backend is None else {"attention_backend": attention_backend}
        # the DiT and UMT5 compute in dtype: their matrices are stored in it (the same outputs at half the memory
        # in bf16; jaxvc/models/weight_storage.py), an expert's after its LoRAs are merged (on the host, in
        # float32: one expert at a time in float32); the VAE and the image encoder compute in float32
        store = None if dtype is None else jnp.dtype(dtype)
        params, configs = {}, {}
        for part, loras in zip(experts, (lora, lora_2)):
            configs[part], loaded = load_wan(root / part, allow_pickle=allow_pickle, **overrides, **backend)
            merged = loaded["params"]
            for path, scale in loras:
                merged = merge_wan_lora(merged, path, scale=scale, allow_pickle=allow_pickle)
            params[part] = store_weights(merged, store)
        if len(set(configs.values())) != 1:
            raise ValueError(f"{root}: transformer/ and transformer_2/ differ in shape ({configs['transformer']} vs "
                             f"{configs['transformer_2']}); Wan 2.2's two experts share one architecture")
        text_config, text_params = load_t5_encoder(root / "text_encoder", allow_pickle=allow_pickle, **overrides)
        vae_config, vae_params = load_wan_vae(root / "vae", allow_pickle=allow_pickle)
        params.update(text_encoder=store_weights(text_params["params"], store), vae=vae_params["params"])
        return dict(transformer=WanTransformer3D(configs["transformer"]), text_encoder=T5Encoder(text_config),
                    tokenizer=T5Tokenizer.from_folder(root / "tokenizer", max_length=max_text_length),
                    vae=VideoVAE(vae_config, chunk_frames=vae_chunk_frames), params=params,
                    scheduler_config=load_scheduler_config(root / "scheduler"), boundary_ratio=boundary_ratio,
                    expand_timesteps=bool(index.get("expand_timesteps", False)))

    def merge_lora(self, path, *, scale: float = 1.0, allow_pickle: bool = False, into: str = "transformer"):
        """Fold a Wan LoRA file (diffusers/peft ``transformer.<module>`` keys) into an expert at ``scale``:
        ``into="transformer_2"`` is a two-expert folder's low-noise one (diffusers' ``load_into_transformer_2``).
        Into weights already stored in bf16, the merge is rounded to bf16 once more; ``from_pretrained(lora=...)``
        merges in float32 before storing."""
        from jaxvc.dit_pipeline import merge_wan_lora

        if into not in self.params or into not in ("transformer", "transformer_2"):
            raise ValueError(f"merge_lora: into='{into}'; this pipeline's experts are "
                             f"{[k for k in self.params if k.startswith('transformer')]}")
        self.params = {**self.params, into: merge_wan_lora(self.params[into], path, scale=scale,
                                                             allow_pickle=allow_pickle)}
        return self

    def abstract_params(self) -> dict:
        """``params``' groups as boxed ShapeDtypeStruct trees (their logical axis names place them on a mesh)."""
        from jaxvc.models.t5_encoder import abstract_t5_params
        from jaxvc.models.wan import abstract_wan_params

        dit = abstract_wan_params(self.transformer.config)["params"]
        experts = {name: dit for name in self.params if name.startswith("transformer")}
        return {**experts, "text_encoder": abstract_t5_params(self.text_encoder.config)["params"],
                "vae": self.vae.abstract_params()}

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

    def high_noise_steps(self, sampler) -> np.ndarray:
        """(steps,) bool: the steps the first expert denoises (all of them with one expert). diffusers compares
        each step's timestep with ``boundary_ratio * num_train_timesteps``."""
        timesteps = np.asarray(sampler.timesteps)
        if not self.has_two_experts:
            return np.ones(timesteps.shape, bool)
        boundary = self.boundary_ratio * int(self.scheduler_config.get("num_train_timesteps", 1000))
        return timesteps >= boundary

    @functools.cached_property
    def _jitted(self) -> dict:
        jit = compile_options.jit

        def encode_text(params, ids):  # (1, L) -> (1, L, D), zero past </s> as Wan's pipelines feed them
            mask = self.tokenizer.attention_mask(ids)
            return self.text_encoder.apply({"params": params}, ids, mask) * mask[..., None]

        return {"text": jit(encode_text),
                "decode": jit(lambda params, latents: self.vae.decode({"params": params}, latents))}

    # The conditioning hooks the image-to-video pipeline overrides: text-to-video has none.
    def _conditioning(self, reference, last_image, num_frames: int, height: int, width: int) -> dict:
        """Host-side preparation: the arrays (a pytree) the denoising loop conditions on."""
        if reference is not None or last_image is not None:
            raise ValueError("a Wan text-to-video pipeline takes no reference image")
        return {}

    def _transformer_inputs(self, x_stacked, t, condition: dict):
        """(the DiT's latents, its timesteps (n,) or per token (n, L), image tokens or None) for a stacked batch."""
        del condition
        return x_stacked, jnp.full((x_stacked.shape[0],), t), None

    def _finish(self, latents, condition: dict):
        """The sampled latents as the VAE decodes them."""
        del condition
        return latents

    @functools.lru_cache(maxsize=8)
    def _generate_fn(self, num_inference_steps: int, guidance_scale: float, guidance_scale_2: float | None,
                     progress: bool, sampler_name):
        sampler = self.sampler(num_inference_steps, sampler_name)
        transformer = self.transformer
        high_noise = jnp.asarray(self.high_noise_steps(sampler))  # (steps,) bool, from the host's timesteps
        guided = guidance_scale > 1.0  # diffusers runs the unconditional pass only then (for both experts)

        def generate(params, text, negative_text, condition, x_T, rng):
            texts = jnp.concatenate([negative_text, text], axis=0) if guided else text  # [uncond; cond]

            def expert(name, scale):
                def model(x_stacked, t, step_index):
                    latents, timesteps, image = self._transformer_inputs(x_stacked, t, condition)
                    return transformer.apply({"params": params[name]}, latents, timesteps, texts, image)
                return classifier_free_guidance(model, scale) if guided else model

            denoise = expert("transformer", guidance_scale)
            if self.has_two_experts:
                high, low = denoise, expert("transformer_2", guidance_scale_2)
                denoise = lambda x, t, i: jax.lax.cond(high_noise[i], high, low, x, t, i)  # noqa: E731
            latents = sample(denoise, x_T, sampler, rng=rng, progress=True if progress else None,
                             progress_desc="denoising")
            return self._finish(latents, condition)

        return compile_options.jit(generate)

    def generate(self, reference, prompt: str, *, negative_prompt: str | None = None,
                 guidance_scale: float | None = None, guidance_scale_2: float | None = None,
                 num_inference_steps: int | None = None, seed: int = 0, num_frames: int | None = None,
                 height: int | None = None, width: int | None = None, progress: bool = False, decode: bool = True,
                 reference_guidance_scale=None, reference_guidance_start: float = 0.0, eta: float | None = None,
                 sampler: str | None = None, last_image=None):
        """A video (1, F, H, W, 3) in [-1, 1] (unclipped), or with ``decode=False`` the latents (1, F', h, w, c).
        ``guidance_scale_2``: the low-noise expert's scale (two-expert folders; default ``guidance_scale``). A
        setting left None is the folder's (``default_video``: 81 x 480 x 832, TI2V-5B 121 x 704 x 1280; 50 steps,
        CFG 5)."""
        settings = model_settings(self, negative_prompt=negative_prompt, guidance_scale=guidance_scale,
                                  num_inference_steps=num_inference_steps, num_frames=num_frames, height=height,
                                  width=width, sampler=sampler)
        negative_prompt, guidance_scale = settings["negative_prompt"], settings["guidance_scale"]
        num_inference_steps, num_frames = settings["num_inference_steps"], settings["num_frames"]
        height, width, sampler = settings["height"], settings["width"], settings["sampler"]
        if reference_guidance_scale is not None:
            raise ValueError("a Wan pipeline guides the text only (no reference_guidance_scale)")
        if eta:
            raise ValueError("eta is DDIM's; Wan's samplers are flow-matching solvers")
        if guidance_scale_2 is not None and not self.has_two_experts:
            raise ValueError("guidance_scale_2 is the low-noise expert's scale; this Wan folder has one transformer")
        del reference_guidance_start
        with self.on_mesh():
            return self._generate(reference, prompt, negative_prompt, guidance_scale, guidance_scale_2,
                                  num_inference_steps, seed, num_frames, height, width, progress, decode, sampler,
                                  last_image)

    def _generate(self, reference, prompt, negative_prompt, guidance_scale, guidance_scale_2, num_inference_steps,
                  seed, num_frames, height, width, progress, decode, sampler, last_image):
        factor = self.vae.downsample_factor
        _, p_h, p_w = self.transformer.config.patch_size
        for name, size, patch in (("height", height, p_h), ("width", width, p_w)):
            if size % (factor * patch):
                raise ValueError(f"{name}={size} must be divisible by {factor * patch} for this model")
        latent_frames = self.vae.latent_frames(num_frames)  # 1 + (num_frames - 1) / 4
        condition = self._conditioning(reference, last_image, num_frames, height, width)
        ids = lambda text: jnp.asarray(self.tokenizer([clean_prompt(text)]))  # noqa: E731
        text = self._jitted["text"](self.params["text_encoder"], ids(prompt))
        negative_text = self._jitted["text"](self.params["text_encoder"], ids(negative_prompt))
        shape = (1, latent_frames, height // factor, width // factor, self.vae.latent_channels)
        x_T = jax.random.normal(jax.random.key(seed), shape, jnp.float32)
        rng_steps = jax.random.fold_in(jax.random.key(seed), 1)  # the SDE samplers' noise
        guidance_scale_2 = None if not self.has_two_experts else float(
            guidance_scale if guidance_scale_2 is None else guidance_scale_2)
        latents = self._generate_fn(num_inference_steps, float(guidance_scale), guidance_scale_2, progress,
                                    sampler)(self.params, text, negative_text, condition, x_T, rng_steps)
        return self._jitted["decode"](self.params["vae"], latents) if decode else latents

    def _reference_pixels(self, image, height: int, width: int):
        """A reference image (path, PIL or array) -> (1, height, width, 3) in [-1, 1]; text-to-video takes none."""
        if image is not None:
            raise ValueError("a Wan text-to-video pipeline takes no reference image")
        return None

    def generate_videos(self, references, prompts, *, negative_prompts=None, seeds=0, progress: bool = False,
                        **settings) -> np.ndarray:
        """``CustomVideoPipeline.generate_videos`` for Wan folders: images (None for text-to-video) and prompts,
        one each -> uint8 (B, F, H, W, 3), the settings the folder's unless given. Wan samples one video per loop,
        so the videos are made one after another (video i: seed + i with one int seed)."""
        prompts = list(prompts)
        references = [None] * len(prompts) if references is None else list(references)
        negatives = [negative_prompts] * len(prompts) if negative_prompts is None or isinstance(
            negative_prompts, str) else list(negative_prompts)
        seeds = [int(seeds) + i for i in range(len(prompts))] if isinstance(seeds, (int, np.integer)) else list(seeds)
        if not len(references) == len(negatives) == len(seeds) == len(prompts):
            raise ValueError(f"generate_videos: {len(prompts)} prompts, {len(references)} references, "
                             f"{len(negatives)} negative prompts and {len(seeds)} seeds: one each")
        return np.stack([self(reference, prompt, negative_prompt=negative, seed=seed, progress=progress, **settings)
                         for reference, prompt, negative, seed in zip(references, prompts, negatives, seeds)])

    def __call__(self, reference_image, prompt: str, *, num_frames: int | None = None, height: int | None = None,
                 width: int | None = None, progress: bool = True, output_type: str = "uint8", last_image=None,
                 **kwargs) -> np.ndarray:
        """One video: uint8 frames (num_frames, height, width, 3), or the latents with ``output_type="latent"``;
        a size left None is the folder's (``default_video``)."""
        frames, default_height, default_width = self.default_video
        num_frames = frames if num_frames is None else num_frames
        height = default_height if height is None else height
        width = default_width if width is None else width
        reference = self._reference_pixels(reference_image, height, width)
        last = None if last_image is None else self._reference_pixels(last_image, height, width)
        out = self.generate(reference, prompt, num_frames=num_frames, height=height, width=width, progress=progress,
                            decode=output_type == "uint8", last_image=last, **kwargs)
        if output_type == "latent":
            return np.asarray(out[0])
        return media.to_uint8(np.clip(np.asarray(out[0]), -1.0, 1.0))
