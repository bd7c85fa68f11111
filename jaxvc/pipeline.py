"""``CustomVideoPipeline``: a reference image of a subject + a text prompt -> a video of that subject (VideoMaker).

    pipe = CustomVideoPipeline.from_pretrained("path/to/animatediff-folder-or-jaxvc-checkpoint")
    frames = pipe("subject.png", "a person walking on the beach", num_frames=16, height=512, width=512)
    pipe.save(frames, "out/", name="beach", reference="subject.png")   # .mp4, .gif, _sheet.png at 8 fps

Sampling follows the authors' inference: DDIM (``linspace`` spacing, ``steps_offset`` 1, no clipping, eta 0 by
default), classifier-free guidance 8 whose unconditional branch is (negative prompt, **zero** reference latent), the
reference latent clean (never noised), and the reference frame's prediction dropped before each scheduler step.
The denoising loop is one jitted ``lax.scan`` (``jaxvc/diffusion/sampling.py``) with a tqdm bar over steps.

``reference_frame=False`` samples a plain text-to-video AnimateDiff model (no reference frame at all: the motion
modules see exactly the F generated frames), as Still-Moving's customized models are. A method whose reference enters
the UNet another way passes a ``conditioning`` (see ``ReferenceConditioning``; MicroCinema's AppearNet).
``adapters`` are UNet adapters (``jaxvc/models/lora.py``) applied while it runs; an adapter's scale may be a function
of the step index (0 first).
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from PIL import Image, UnidentifiedImageError

from jaxvc import compile_options, media
from jaxvc.data.media import REFERENCE_BACKGROUND, rgb_image
from jaxvc.diffusion.samplers import make_sampler
from jaxvc.diffusion.sampling import classifier_free_guidance, piecewise_constant, reference_guidance, sample
from jaxvc.models import lora
from jaxvc.models.clip_text import CLIPTextConfig, CLIPTextEncoder
from jaxvc.models.patchify import from_patches, to_patches
from jaxvc.models.tokenizer import CLIPTokenizer, load_tokenizer
from jaxvc.models.unet import UNetConfig, UNetMotion
from jaxvc.models.vae import AutoencoderKL, VAEConfig, decode_video, encode_video
from jaxvc.models.weight_storage import store_weights
from jaxvc.parallel.inference import DATA_PARALLEL_RULES, MeshPlacement, inference_mesh

# VideoMaker's inference scheduler settings (authors' code, and diffusers' AnimateDiff examples), applied over the
# checkpoint's scheduler config: linear betas between its beta_start and beta_end (an SD1.5 folder says
# scaled_linear; AnimateDiff's motion modules were trained with linear).
VIDEOMAKER_SCHEDULER = {"timestep_spacing": "linspace", "steps_offset": 1, "clip_sample": False,
                        "beta_schedule": "linear"}
SD15_SCHEDULER = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                  "num_train_timesteps": 1000, "prediction_type": "epsilon", "set_alpha_to_one": False}


def open_image(path, what: str = "reference image") -> Image.Image:
    """The image file at ``path``, decoded whole: FileNotFoundError when there is no such file, ValueError when PIL
    cannot read it, each a one-line message "<what> <path>: ..." (``jaxvc generate`` checks its inputs with it before
    it loads a model, which takes minutes for a big one)."""
    from PIL import ImageFile

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path}: file does not exist")
    # Libraries imported beside jaxvc (tensorflow-datasets, vbench's AMT) set PIL's process-wide
    # LOAD_TRUNCATED_IMAGES, which pads a truncated file with grey instead of failing: off while this one decodes
    truncated_ok, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
    try:
        with Image.open(path) as opened:
            opened.load()  # decodes the pixels: a truncated file fails here, not when the model reads it
            return opened.copy()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
        reason = " ".join(str(error).split())  # one line whatever the decoder said
        raise ValueError(f"{what} {path}: not a readable image ({reason})") from error
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = truncated_ok


def load_reference_image(image, height: int, width: int) -> np.ndarray:
    """Any image (path, PIL image or uint8/float array; RGB, RGBA, L, P, CMYK...) -> (height, width, 3) in [-1, 1].

    Transparent pixels become white (the papers' references are subjects on white). The image is resized so it
    covers (height, width) and center-cropped, keeping its aspect ratio.
    """
    if isinstance(image, (str, os.PathLike)):
        image = open_image(image)
    elif isinstance(image, np.ndarray):
        array = image
        if array.ndim == 2:
            array = np.stack([array] * 3, axis=-1)
        if array.ndim != 3 or array.shape[-1] not in (3, 4):
            raise ValueError(f"reference image array must be (H, W), (H, W, 3) or (H, W, 4), got {array.shape}")
        if array.dtype != np.uint8:
            array = media.to_uint8(array)  # floats are taken to be in [-1, 1]
        image = Image.fromarray(array)
    if not isinstance(image, Image.Image):
        raise TypeError(f"reference image: expected a path, PIL image or numpy array, got {type(image).__name__}")
    image = rgb_image(image, background=REFERENCE_BACKGROUND)
    scale = max(height / image.height, width / image.width)
    resized = image.resize((max(width, round(image.width * scale)), max(height, round(image.height * scale))),
                           Image.BICUBIC)
    left, top = (resized.width - width) // 2, (resized.height - height) // 2
    cropped = np.asarray(resized.crop((left, top, left + width, top + height)), np.float32)
    return cropped / 127.5 - 1.0


def batch_arguments(prompt, negative_prompt, seed) -> tuple[list[str], list[str], list[int]]:
    """A pipeline's ``generate`` arguments as lists of one per video: ``prompt`` one or a list of B; ``negative_prompt``
    and ``seed`` one for all or B (one int seed: video i gets seed + i)."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    batch = len(prompts)
    negatives = [negative_prompt] * batch if isinstance(negative_prompt, str) else list(negative_prompt)
    seeds = [int(seed) + i for i in range(batch)] if isinstance(seed, (int, np.integer)) else [int(s) for s in seed]
    if not batch or len(negatives) != batch or len(seeds) != batch:
        raise ValueError(f"generate: {batch} prompts, {len(negatives)} negative prompts and {len(seeds)} seeds; "
                         "expected one or more prompts and one negative prompt and seed each (or one for all)")
    return prompts, negatives, seeds


class CustomVideoPipeline(MeshPlacement):
    """UNet (with motion modules) + text encoder + tokenizer + optional VAE (None: a pixel-space model, optionally on
    ``pixel_patch`` x ``pixel_patch`` blocks folded into channels). ``shard("data=8")`` samples batches of videos
    data-parallel (``jaxvc/parallel/inference.py``)."""
    default_video = (16, 512, 512)  # (frames, height, width): ``jaxvc generate``'s defaults, AnimateDiff's size
    # frames per second its videos are written at (``save``, ``jaxvc generate --fps``): AnimateDiff's 8, the rate
    # the UNet methods' motion modules learnt; ``jaxvc eval``'s dynamic degree reads it back from the container
    default_fps = 8
    # ``jaxvc generate``'s and ``generate_videos``' sampling defaults: VideoMaker's inference (DDIM 30, CFG 8); a
    # training run's pipeline takes its run's (``TrainedRun.sampling``)
    default_sampling = {"num_inference_steps": 30, "guidance_scale": 8.0, "eta": 0.0, "sampler": None,
                        "negative_prompt": ""}
    samples_batches = True  # ``generate`` takes a list of prompts: B videos in one sampling loop

    def __init__(self, unet_config: UNetConfig, unet_params, text_config: CLIPTextConfig, text_params,
                 tokenizer: CLIPTokenizer, vae_config: VAEConfig | None = None, vae_params=None,
                 scheduler_config: dict | None = None, reference_cross_attention: bool = True,
                 pixel_patch: int = 1, reference_frame: bool = True, adapters=(),
                 conditioning: "ReferenceConditioning | None" = None):
        if unet_config.motion is None:
            raise ValueError("CustomVideoPipeline needs a UNet with motion modules (pass a motion adapter)")
        self.unet = UNetMotion(unet_config)
        self.text_encoder = CLIPTextEncoder(text_config)
        self.vae = None if vae_config is None else AutoencoderKL(vae_config)
        # the UNet keeps all its variables: a checkpoint whose positional tables differ from the formula carries
        # them in a "buffers" collection beside "params" (see jaxvc/convert/unet.py)
        self.params = {"unet": _variables(unet_params), "text_encoder": _params(text_params),
                       "vae": None if vae_params is None else _params(vae_params)}
        self.tokenizer = tokenizer
        # defaults: SD1.5's training schedule with VideoMaker's inference settings; a given config wins
        self.scheduler_config = {**SD15_SCHEDULER, **VIDEOMAKER_SCHEDULER, **(scheduler_config or {})}
        self.reference_cross_attention = reference_cross_attention
        self.pixel_patch = 1 if vae_config is not None else int(pixel_patch)
        self.reference_frame = bool(reference_frame)
        if conditioning is not None and self.reference_frame:
            raise ValueError("CustomVideoPipeline: a conditioning replaces the reference frame (reference_frame=False)")
        self.conditioning = conditioning
        # specs and scales are static (part of the compiled program); the trees are arguments of it
        self.adapters = tuple((a.spec, a.scale) for a in adapters)
        self.params["adapters"] = [a.tree for a in adapters]
        self.params["conditioning"] = None if conditioning is None else conditioning.params

    @property
    def takes_reference(self) -> bool:
        """Whether generation takes a reference image (as an extra frame, or through a conditioning)."""
        return self.reference_frame or self.conditioning is not None

    def sampler_name(self, sampler: str | None = None) -> str:
        """The sampler ``generate(sampler=sampler)`` runs: ``sampler``, else the methods' DDIM."""
        return sampler or "ddim"

    @property
    def compute_dtype(self) -> str:
        """The dtype the UNet computes in and keeps its matrices in (the text encoder and VAE: float32)."""
        return jnp.dtype(self.unet.config.dtype).name

    @property
    def attention_backend(self) -> str:
        return self.unet.config.attention_backend

    @classmethod
    def from_pretrained(cls, path, *, motion_adapter=None, allow_pickle: bool = False, dtype=None,
                        attention_backend: str | None = None, step: int | None = None, use_ema: bool = True,
                        lora: Sequence[tuple[str, float]] = (), lora_2: Sequence[tuple[str, float]] = (),
                        unet_weights: str | None = None) -> "CustomVideoPipeline":
        """A diffusers AnimateDiff/SD folder (+ motion adapter), a jaxvc checkpoint written by ``jaxvc convert``, or
        a training run folder (``jaxvc train --workdir``: checkpoint ``step``, default the latest, with its EMA
        weights when the run keeps them and ``use_ema``). A diffusers Wan pipeline folder gives a
        ``WanTextToVideoPipeline`` (``jaxvc/wan_pipeline.py``) or a ``WanImageToVideoPipeline``
        (``jaxvc/wan_i2v_pipeline.py``).

        ``lora``: (file, scale) pairs merged (``merge_lora``) into the float32 weights as they load, before the
        parts computing in ``dtype`` store their matrices in it: the merge is rounded once, as the float32 merge is
        when the layers cast it. ``lora_2``: the same for a two-expert Wan 2.2 folder's low-noise expert.

        ``unet_weights``: a UNet state dict, whole or partial, put over the AnimateDiff folder's UNet weights
        (VideoMaker's released ``human_pytorch_model.bin``, loaded by its authors with ``strict=False``;
        ``jaxvc/convert/unet_overlay.py``)."""
        from jaxvc.convert.pipeline import load_pipeline
        from jaxvc.train.trained_run import is_run_folder
        from jaxvc.wan_pipeline import is_wan_pipeline_folder, load_wan_pipeline

        run_folder = is_run_folder(path)  # (a bucket run folder costs requests: each kind is looked up once)
        wan_folder = not run_folder and is_wan_pipeline_folder(path)
        if unet_weights is not None and (run_folder or wan_folder):
            raise ValueError(f"{path}: unet_weights (--unet-weights) go over an AnimateDiff/SD folder's UNet, not a "
                             "training run's or a Wan folder's")
        if lora_2 and not wan_folder:
            raise ValueError(f"{path} has one denoiser: a LoRA for a low-noise expert (lora_2, --lora-2) "
                             "needs a two-expert Wan 2.2 folder (A14B)")
        if run_folder:
            return cls.from_run(path, step=step, use_ema=use_ema, dtype=dtype, attention_backend=attention_backend,
                                lora=lora, allow_pickle=allow_pickle)
        if wan_folder:
            if motion_adapter is not None or step is not None:
                raise ValueError(f"{path}: a Wan pipeline folder takes no motion adapter or step")
            return load_wan_pipeline(path, dtype=dtype, attention_backend=attention_backend,
                                     allow_pickle=allow_pickle, lora=lora, lora_2=lora_2)
        if step is not None:
            raise ValueError(f"{path}: step={step} is for training run folders; this is a pipeline folder")
        overrides = {}
        if dtype is not None:
            overrides["dtype"] = jnp.dtype(dtype)
        if attention_backend is not None:
            overrides["attention_backend"] = attention_backend
        weights = load_pipeline(path, motion_adapter=motion_adapter, allow_pickle=allow_pickle, **overrides)
        if unet_weights is not None:
            from jaxvc.convert.unet_overlay import overlay_unet_weights

            weights.unet_params, _ = overlay_unet_weights(weights.unet_config, weights.unet_params, unet_weights,
                                                          allow_pickle=allow_pickle)
        tokenizer = load_tokenizer(weights.tokenizer_folder)
        # the checkpoint's training schedule, sampled with VideoMaker's inference settings (authors' code)
        pipe = cls(weights.unet_config, weights.unet_params, weights.text_config, weights.text_params, tokenizer,
                   weights.vae_config, weights.vae_params, {**weights.scheduler_config, **VIDEOMAKER_SCHEDULER})
        return pipe.merge_loras(lora, allow_pickle=allow_pickle, store=dtype)

    def store_weights(self, dtype) -> "CustomVideoPipeline":
        """Keep the UNet's weight matrices in ``dtype``, the dtype it computes in: the same videos at half their
        memory in bf16 (``jaxvc/models/weight_storage.py``). The text encoder and the VAE compute in float32."""
        self.params["unet"] = {**self.params["unet"], "params": store_weights(self.params["unet"]["params"], dtype)}
        if self.conditioning is not None:
            self.params["conditioning"] = self.conditioning.store_weights(dtype).params
        return self

    def merge_loras(self, loras: Sequence[tuple[str, float]], *, allow_pickle: bool = False, store=None):
        """``merge_lora`` for each (file, scale) of ``loras``, then ``store_weights(store)`` unless ``store`` is
        None: how the loaders merge a user's LoRAs before storing (one rounding of the merged matrices)."""
        for path, scale in loras:
            self.merge_lora(path, scale=scale, allow_pickle=allow_pickle)
        return self if store is None else self.store_weights(jnp.dtype(store))

    @classmethod
    def from_run(cls, workdir, *, step: int | None = None, use_ema: bool = True, dtype=None,
                 attention_backend: str | None = None, lora: Sequence[tuple[str, float]] = (),
                 allow_pickle: bool = False) -> "CustomVideoPipeline":
        """The model of a training run at one of its checkpoints (``jaxvc/train/trained_run.py``), with ``lora``
        merged as in ``from_pretrained``."""
        from jaxvc.train.trained_run import load_trained_run

        overrides = {}
        if dtype is not None:
            overrides["compute_dtype"] = str(jnp.dtype(dtype))
        if attention_backend is not None:
            overrides["model.attention_backend"] = attention_backend
        run = load_trained_run(workdir, step=step, use_ema=use_ema, overrides=overrides)
        if not callable(getattr(run.method, "pipeline", None)):
            raise ValueError(f"{workdir}: method '{run.config.method}' has no generation pipeline")
        pipe = run.method.pipeline(run.params, run.method.tokenizer)  # the tokenizer the run's captions went through
        # the parts that compute in dtype keep their matrices in it, after the merges
        pipe.merge_loras(lora, allow_pickle=allow_pickle, store=dtype)
        pipe.default_sampling = run.sampling
        pipe.trained_step, pipe.trained_with_ema = run.step, run.used_ema
        return pipe

    def merge_lora(self, path, *, scale: float = 1.0, allow_pickle: bool = False) -> "CustomVideoPipeline":
        """Fold a LoRA file (diffusers, peft or kohya format, ``jaxvc/convert/lora.py``) into the UNet's and text
        encoder's weights at ``scale``: a user's customized SD1.5 (DreamBooth LoRA) in this video model. Into weights
        already stored in bf16 (``store_weights``), the merge is rounded to bf16 once more; ``from_pretrained(lora=
        ...)`` merges in float32 before storing."""
        from jaxvc.convert.lora import read_lora

        loaded = read_lora(path, {"unet": self.params["unet"]["params"], "text_encoder": self.params["text_encoder"]},
                           allow_pickle=allow_pickle, scale=scale)
        if "unet" in loaded.adapters:
            self.params["unet"] = {**self.params["unet"],
                                   "params": lora.merge(self.params["unet"]["params"], loaded.adapters["unet"])}
        if "text_encoder" in loaded.adapters:
            self.params["text_encoder"] = lora.merge(self.params["text_encoder"], loaded.adapters["text_encoder"])
        return self

    @property
    def downsample_factor(self) -> int:
        return self.pixel_patch if self.vae is None else self.vae.config.downsample_factor

    # ------------------------------------------------------------------------------------------------- sampling
    def encode_prompts(self, prompts):
        ids = jnp.asarray(self.tokenizer(list(prompts)))
        return self._jitted["text"](self.params["text_encoder"], ids)

    def encode_reference(self, reference):
        """(B, H, W, 3) in [-1, 1] -> clean reference latent (B, 1, h, w, c)."""
        if self.vae is None:
            return to_patches(reference[:, None], self.pixel_patch)
        return self._jitted["encode"](self.params["vae"], reference[:, None])

    @functools.cached_property
    def _jitted(self) -> dict:
        """The text encoder and the VAE, each one compiled program (run op by op, a VAE decode dispatches hundreds of
        small kernels), with jaxvc's compile defaults for this backend (``jaxvc/compile_options.py``)."""
        jit = compile_options.jit
        return {"text": jit(lambda params, ids: self.text_encoder.apply({"params": params}, ids)["last_hidden_state"]),
                "encode": jit(lambda params, video: encode_video(self.vae, {"params": params}, video)),
                "decode": jit(lambda params, latents: decode_video(self.vae, {"params": params}, latents))}

    @functools.lru_cache(maxsize=8)
    def _sampler(self, num_inference_steps: int, eta: float, sampler: str = "ddim"):
        return make_sampler(sampler, self.scheduler_config, num_inference_steps, eta=float(eta))

    @functools.lru_cache(maxsize=8)
    def _generate_fn(self, num_inference_steps: int, eta: float, guidance_scale: float,
                     reference_guidance_scale: float | None, reference_guidance_start: int, progress: bool,
                     sampler_name: str = "ddim"):
        """The jitted generation for these settings (cached: a new jit wrapper would recompile every call)."""
        sampler = self._sampler(num_inference_steps, eta, sampler_name)
        unet, cross, adapter_specs, conditioning = (self.unet, self.reference_cross_attention, self.adapters,
                                                    self.conditioning)

        def generate(unet_variables, adapter_trees, conditioning_params, text, negative_text, reference_latent, x_T,
                     rng):
            if reference_latent is None:  # a text-to-video model: [uncond; cond] texts, no reference frame
                texts, references = jnp.concatenate([negative_text, text], axis=0), None
            elif reference_guidance_scale is None:  # [uncond; cond]
                no_reference = jnp.zeros_like(reference_latent)
                texts = jnp.concatenate([negative_text, text], axis=0)
                references = jnp.concatenate([no_reference, reference_latent], axis=0)
            else:  # [uncond; text only; text + reference]
                no_reference = jnp.zeros_like(reference_latent)
                texts = jnp.concatenate([negative_text, text, text], axis=0)
                references = jnp.concatenate([no_reference, no_reference, reference_latent], axis=0)
            frames = x_T.shape[1]

            def model(x_stacked, t, step_index):
                applied = [lora.AppliedAdapter(spec, tree, scale(step_index) if callable(scale) else scale)
                           for (spec, scale), tree in zip(adapter_specs, adapter_trees)]
                timesteps = jnp.full((x_stacked.shape[0],), t)

                def run_unet():
                    with lora.applied(applied):
                        return unet.apply(unet_variables, x_stacked, timesteps, texts, reference_cross_attention=cross,
                                          reference_latent=None if conditioning is not None else references)

                if conditioning is not None:
                    return conditioning.denoise(conditioning_params, run_unet, x_stacked, timesteps, texts,
                                                references)
                return run_unet()[:, :frames]               # drop the reference frame's prediction (if any)

            if reference_guidance_scale is None:
                denoise = classifier_free_guidance(model, guidance_scale)
            else:
                # the first `reference_guidance_start` steps (the layout) guide the reference like the text
                reference_scale = functools.partial(piecewise_constant, boundaries=[reference_guidance_start],
                                                    values=[guidance_scale, reference_guidance_scale])
                denoise = reference_guidance(model, guidance_scale, reference_scale)
            return sample(denoise, x_T, sampler, rng=rng, progress=True if progress else None,
                          progress_desc="denoising")

        return compile_options.jit(generate)

    def __call__(self, reference_image, prompt: str, *, negative_prompt: str | None = None,
                 guidance_scale: float | None = None, reference_guidance_scale: float | None = None,
                 reference_guidance_start: float = 0.0, num_inference_steps: int | None = None, seed: int = 0,
                 num_frames: int | None = None, height: int | None = None, width: int | None = None,
                 eta: float | None = None, progress: bool = True, output_type: str = "uint8",
                 sampler: str | None = None) -> np.ndarray:
        """Generate one video: uint8 frames (num_frames, height, width, 3), or with ``output_type="latent"`` the
        float32 latents (num_frames, h, w, c) before decoding. ``reference_image=None`` generates without a subject
        (zero reference latent, text only). ``reference_guidance_scale``: None guides text and reference together
        with ``guidance_scale`` (the paper; two branches); a number guides them separately (three branches,
        ``jaxvc.diffusion.sampling.reference_guidance``): ``guidance_scale`` for the text, this for the reference,
        from the fraction ``reference_guidance_start`` of the steps on (before it, the reference is guided with
        ``guidance_scale`` too: a strong reference guidance while the layout forms pulls the subject to where it
        is in the reference image). ``sampler``: None or ``ddim`` (the methods' own), ``dpm++``, ``dpm++-karras``,
        ``dpm++-sde``, ``unipc``, ... (``jaxvc.diffusion.samplers``). A setting left None is the model's
        (``model_settings``: a run's size and validation sampling, a folder's 16 x 512 x 512, DDIM 30, CFG 8)."""
        if output_type not in ("uint8", "latent"):
            raise ValueError(f"output_type must be 'uint8' or 'latent', got {output_type!r}")
        settings = model_settings(self, negative_prompt=negative_prompt, guidance_scale=guidance_scale,
                                  num_inference_steps=num_inference_steps, num_frames=num_frames, height=height,
                                  width=width, eta=eta, sampler=sampler)
        height, width = settings["height"], settings["width"]
        reference = None
        if reference_image is not None:
            reference = jnp.asarray(load_reference_image(reference_image, height, width))[None]
        out = self.generate(reference, prompt, reference_guidance_scale=reference_guidance_scale,
                            reference_guidance_start=reference_guidance_start, seed=seed, progress=progress,
                            decode=output_type == "uint8", **settings)
        if output_type == "latent":
            return np.asarray(out[0])
        return media.to_uint8(np.clip(np.asarray(out[0]), -1.0, 1.0))

    def generate(self, reference, prompt, *, negative_prompt=None, guidance_scale: float | None = None,
                 reference_guidance_scale: float | None = None, reference_guidance_start: float = 0.0,
                 num_inference_steps: int | None = None, seed=0, num_frames: int | None = None,
                 height: int | None = None, width: int | None = None, eta: float | None = None,
                 progress: bool = False, decode: bool = True, sampler: str | None = None):
        """``__call__`` on arrays, traceable (the trainer's validation samples run it under ``jit``): reference
        (1, height, width, 3) in [-1, 1] or None -> video (1, F, height, width, 3) in [-1, 1], unclipped, or
        with ``decode=False`` the latents (1, F, h, w, c).

        A batch of B videos in one sampling program: ``prompt`` a list of B prompts, ``reference`` (B, height,
        width, 3) (or None), ``negative_prompt`` one or B, ``seed`` one (video i gets seed + i) or B. Each video
        draws its noise from its own seed, so the batch equals the B videos made one by one. On a ``shard``-ed
        pipeline the batch is split over the mesh's ``data`` axis (B a multiple of its size). A setting left None
        is the model's (``model_settings``)."""
        settings = model_settings(self, negative_prompt=negative_prompt, guidance_scale=guidance_scale,
                                  num_inference_steps=num_inference_steps, num_frames=num_frames, height=height,
                                  width=width, eta=eta, sampler=sampler)
        negative_prompt, guidance_scale = settings["negative_prompt"], settings["guidance_scale"]
        num_inference_steps, num_frames = settings["num_inference_steps"], settings["num_frames"]
        height, width, eta, sampler = settings["height"], settings["width"], settings["eta"], settings["sampler"]
        prompts, negatives, seeds = batch_arguments(prompt, negative_prompt, seed)
        batch = len(prompts)
        if reference_guidance_scale is not None and (reference is None or not self.takes_reference):
            raise ValueError("reference_guidance_scale needs a reference image (there is no reference to guide by)")
        if reference is not None and not self.takes_reference:
            raise ValueError("this model is text-to-video (no reference frame): generate with reference=None")
        if not 0.0 <= reference_guidance_start <= 1.0:
            raise ValueError(f"reference_guidance_start={reference_guidance_start}: expected a fraction of the steps "
                             "in [0, 1]")
        # the VAE downsamples by its factor, the UNet halves the latent (levels - 1) times
        multiple = self.downsample_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)
        for name, size in (("height", height), ("width", width)):
            if size % multiple:
                raise ValueError(f"{name}={size} must be divisible by {multiple} for this model")
        # one position is taken by the reference frame, if the model has one
        max_frames = self.unet.config.motion.max_seq_length - int(self.reference_frame)
        if not 1 <= num_frames <= max_frames:
            raise ValueError(f"num_frames={num_frames}: this motion adapter allows 1..{max_frames} frames"
                             + (" (max_seq_length minus the reference frame)" if self.reference_frame else ""))
        if reference is not None and tuple(reference.shape) != (batch, height, width, 3):
            raise ValueError(f"reference must be ({batch}, {height}, {width}, 3) in [-1, 1], got {reference.shape}")
        if self.mesh is not None and batch % self.mesh.shape["data"]:
            raise ValueError(f"a batch of {batch} videos on a mesh of data={self.mesh.shape['data']}: the batch "
                             "must be a multiple of the data axis")
        generate = self._generate_fn(num_inference_steps, float(eta), float(guidance_scale),
                                     None if reference_guidance_scale is None else float(reference_guidance_scale),
                                     round(reference_guidance_start * num_inference_steps), progress,
                                     sampler or "ddim")
        with self.on_mesh():
            return self._generate(generate, reference, prompts, negatives, seeds, num_frames, height, width, decode)

    def _generate(self, generate, reference, prompts, negatives, seeds, num_frames, height, width, decode):
        """generate's work once its arguments are checked (on the mesh, if any)."""
        batch, latent_size = len(prompts), (height // self.downsample_factor, width // self.downsample_factor)
        if not self.takes_reference:
            reference_latent = None
        elif reference is None:  # no subject: the zero reference latent of the unconditional branch
            reference_latent = jnp.zeros((batch, 1, *latent_size, self.unet.config.in_channels), jnp.float32)
        else:
            reference_latent = self.encode_reference(self._split_batch(reference))    # (B, 1, h, w, c)
        text = self.encode_prompts(prompts)
        negative_text = self.encode_prompts(negatives)
        # each video's noise from its own seed: x_T (B, F, h, w, c) row i as video i alone would draw it
        keys = [jax.random.split(jax.random.key(seed)) for seed in seeds]
        latent_shape = (1, num_frames, *latent_size, self.unet.config.in_channels)
        x_T = jnp.concatenate([jax.random.normal(init, latent_shape, jnp.float32) for init, _ in keys])
        rng_steps = keys[0][1] if batch == 1 else jnp.stack([steps for _, steps in keys])  # (B,): one per video
        if self.conditioning is not None:  # e.g. MicroCinema's appearance noise prior
            x_T = self.conditioning.initial_latents(x_T, reference_latent)
        latents = generate(self.params["unet"], self.params["adapters"], self.params["conditioning"], text,
                           negative_text, self._split_batch(reference_latent), self._split_batch(x_T), rng_steps)
        if not decode:
            return latents
        if self.vae is None:
            return from_patches(latents, self.pixel_patch)
        return self._jitted["decode"](self.params["vae"], latents)

    def generate_videos(self, references, prompts, *, negative_prompts=None, seeds=0, progress: bool = False,
                        **settings) -> np.ndarray:
        """A batch of videos from host inputs: reference images (paths, PIL images or arrays; None for a
        text-to-video model) and prompts, one each -> uint8 (B, F, H, W, 3). ``settings``: ``generate``'s (the size
        defaults to the model's ``default_video``, the sampling and the negative prompt to its
        ``default_sampling``)."""
        settings = model_settings(self, negative_prompt=negative_prompts, **settings)
        height, width = settings["height"], settings["width"]
        if references is not None and any(image is None for image in references):
            raise ValueError("generate_videos: a reference image for every video, or references=None")
        pixels = None if references is None else jnp.asarray(
            np.stack([load_reference_image(image, height, width) for image in references]))
        videos = self.generate(pixels, list(prompts), seed=seeds, progress=progress, **settings)
        return media.to_uint8(np.clip(np.asarray(videos), -1.0, 1.0))

    # ------------------------------------------------------------------------------------------------- mesh
    def shard(self, mesh) -> "CustomVideoPipeline":
        """Sample data-parallel on ``mesh`` (``"data=8"`` or a Mesh whose other axes have size 1): the weights
        replicated on every device, a batch of videos split over ``data``; returns self."""
        mesh = inference_mesh(mesh)
        others = {axis: size for axis, size in mesh.shape.items() if axis != "data" and size > 1}
        if others:
            raise ValueError(f"the UNet pipeline samples data-parallel (its weights fit one device): a mesh of data=N "
                             f"only, got {dict(mesh.shape)}")
        self.params = jax.device_put(self.params, NamedSharding(mesh, PartitionSpec()))
        self.mesh, self.rules = mesh, DATA_PARALLEL_RULES
        self.forget_compiled()
        return self

    def _split_batch(self, array):
        """``array`` with its leading (batch) axis over the mesh's ``data`` axis (as is without a mesh)."""
        if self.mesh is None or array is None:
            return array
        return jax.device_put(array, NamedSharding(self.mesh, PartitionSpec("data")))

    def save(self, frames, out_dir, name: str = "video", reference=None, fps: int | None = None) -> dict[str, Path]:
        """``save_video`` at ``fps``, default the model's ``default_fps`` (a video written at another rate than
        the model's plays too fast or too slow)."""
        return save_video(frames, out_dir, name, reference=reference, fps=self.default_fps if fps is None else fps)


def save_video(frames, out_dir, name: str = "video", reference=None, fps: int = 8) -> dict[str, Path]:
    """Write ``<name>.mp4``, ``<name>.gif`` and ``<name>_sheet.png`` (reference, if given, then the frames)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frames = media.to_uint8(frames)
    rows, labels = [frames], ["generated"]
    if reference is not None:
        reference = load_reference_image(reference, frames.shape[1], frames.shape[2])
        rows, labels = [media.to_uint8(reference[None]), frames], ["reference", "generated"]
    return {"mp4": media.write_mp4(out_dir / f"{name}.mp4", frames, fps=fps),
            "gif": media.write_gif(out_dir / f"{name}.gif", frames, fps=fps),
            "sheet": media.save_png(out_dir / f"{name}_sheet.png", media.contact_sheet(rows, labels))}


class ReferenceConditioning:
    """How a method's reference image enters the UNet when it is not VideoMaker's extra frame (the interface
    ``CustomVideoPipeline(conditioning=...)`` calls; ``jaxvc/methods/microcinema.py`` implements it).

    ``params``: its parameters, an argument of the compiled sampling program. ``denoise(params, run_unet, x,
    timesteps, texts, references)`` returns the UNet's prediction (N, F, h, w, c) for the stacked guidance branches,
    with ``references`` (N, 1, h, w, c) (zeros in the unconditional branch); ``run_unet()`` runs the UNet (with
    the pipeline's adapters) on ``x``. ``initial_latents(noise, reference_latent)`` makes x_T from the Gaussian
    noise (1, F, h, w, c) and the reference latent (1, 1, h, w, c)."""
    params: Any = None

    def denoise(self, params, run_unet, x, timesteps, texts, references):
        raise NotImplementedError

    def initial_latents(self, noise, reference_latent):
        return noise

    def store_weights(self, dtype) -> "ReferenceConditioning":
        """Keep the matrices of the parts that compute in the UNet's dtype ``dtype`` in it
        (``CustomVideoPipeline.store_weights``); by default none are known to."""
        return self


def sampling_settings(defaults: dict, sampler: str | None) -> dict:
    """A pipeline's ``default_sampling`` as ``generate`` keywords for ``sampler`` (None: the default's): its DDIM
    eta only when the sampler is DDIM (the others draw no such noise)."""
    sampler = sampler or defaults.get("sampler")
    ddim = sampler in (None, "ddim")
    return {"num_inference_steps": defaults["num_inference_steps"], "guidance_scale": defaults["guidance_scale"],
            "eta": defaults.get("eta", 0.0) if ddim else 0.0, "sampler": sampler}


def model_settings(pipe, **given) -> dict:
    """``given`` generation keywords with each None filled from the model: the size from ``pipe.default_video``
    (what a run trained on), steps, guidance, DDIM eta, sampler and negative prompt from ``pipe.default_sampling``
    (a run's validation settings, a method's published ones). Keywords other than those pass through."""
    frames, height, width = pipe.default_video
    defaults = {"num_frames": frames, "height": height, "width": width,
                **sampling_settings(pipe.default_sampling, given.get("sampler")),
                "negative_prompt": pipe.default_sampling.get("negative_prompt", "")}
    return {**given, **{key: value for key, value in defaults.items() if given.get(key, None) is None}}


def _variables(variables: Any) -> dict:
    """Flax variables ``{"params": ..., ...}`` from either variables or a bare parameter tree."""
    return dict(variables) if isinstance(variables, dict) and "params" in variables else {"params": variables}


def _params(variables: Any):
    """Accept ``{"params": tree}`` or the bare tree."""
    return variables["params"] if isinstance(variables, dict) and set(variables) == {"params"} else variables
