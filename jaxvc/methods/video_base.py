"""What the UNet-based methods share: an AnimateDiff UNet, a CLIP text encoder, a VAE (or pixel space), their shapes,
parameters, conditioning, the training noise schedule, validation samples, and building them from a config.

A method subclasses ``VideoDiffusionMethod`` and adds what makes it itself: which parameters train, the loss, how
the condition enters and the generation pipeline (``jaxvc/methods/videomaker.py``, ``jaxvc/methods/still_moving.py``).
Its options dataclass must have ``train_text_encoder``, ``prediction_type``, ``beta_schedule``, ``beta_start``,
``beta_end`` and ``num_train_timesteps``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxvc.config_utils import ConfigError
from jaxvc.diffusion.schedule import NoiseSchedule, make_schedule
from jaxvc.methods.base import Method, PipelineValidation, frame_size, init_program, validation_sampling
from jaxvc.models.attention import BACKENDS
from jaxvc.models.clip_text import CLIPTextConfig, CLIPTextEncoder, abstract_clip_text_params
from jaxvc.models.motion import BUFFERS
from jaxvc.models.patchify import from_patches, to_patches
from jaxvc.models.unet import UNetConfig, UNetMotion
from jaxvc.models.vae import AutoencoderKL, VAEConfig, abstract_vae_params, decode_video, encode_video
from jaxvc.train.state import unbox as strip_boxes


def options_from_mapping(cls, values: Mapping[str, Any] | None, method: str):
    """An options dataclass from a config mapping; unknown keys are an error naming the known ones."""
    values = dict(values or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{method}: unknown option(s) {unknown}; known: {sorted(known)}")
    return cls(**values)


def condition_dropout(rng, batch_size: int, both_prob: float, text_prob: float, condition_prob: float):
    """Classifier-free guidance dropout, one draw per example: (drop_text, drop_condition) (B,) bools. u ~ U(0, 1)
    drops both below ``both_prob``, then the text only in the next ``text_prob``, then the condition (reference
    image, center frame) only in the next ``condition_prob``."""
    u = jax.random.uniform(rng, (batch_size,))
    drop_both = u < both_prob
    drop_text = drop_both | ((u >= both_prob) & (u < both_prob + text_prob))
    lo = both_prob + text_prob
    return drop_text, drop_both | ((u >= lo) & (u < lo + condition_prob))


class VideoDiffusionMethod(PipelineValidation, Method):
    """Parameters: ``{"params": {"unet": ..., "text_encoder": ..., "vae": ...}}`` (``vae`` absent in pixel space),
    plus whatever ``extra_params`` a method adds.

    ``vae_config=None`` runs the diffusion in pixel space, optionally on ``pixel_patch`` x ``pixel_patch`` blocks
    folded into channels (``jaxvc/models/patchify.py``; the UNet's in/out channels are then 3 * pixel_patch^2), which
    is how the demo trains a tiny model from scratch on a CPU.
    """
    name = "video_diffusion"
    uses_reference = True  # validation samples come with a reference image each
    init_in_parts = True  # init_params: the UNet, text encoder, VAE and extras each their own program

    def __init__(self, unet_config: UNetConfig, text_config: CLIPTextConfig, vae_config: VAEConfig | None,
                 options, empty_prompt_tokens, *, num_frames: int, image_size: int | tuple[int, int],
                 pretrained: Mapping[str, Any] | None = None, pixel_patch: int = 1):
        if unet_config.motion is None:
            raise ValueError(f"{self.name}: the UNet needs motion modules (unet_config.motion is None)")
        if vae_config is not None and pixel_patch != 1:
            raise ValueError(f"{self.name}: pixel_patch applies to pixel-space models only (vae_config is set)")
        self.pixel_patch = int(pixel_patch)
        latent_channels = 3 * self.pixel_patch ** 2 if vae_config is None else vae_config.latent_channels
        if unet_config.in_channels != latent_channels or unet_config.out_channels != latent_channels:
            raise ValueError(f"{self.name}: UNet in/out channels ({unet_config.in_channels}, "
                             f"{unet_config.out_channels}) must equal the latent channels ({latent_channels})")
        if unet_config.cross_attention_dim != text_config.hidden_size:
            raise ValueError(f"{self.name}: UNet cross_attention_dim {unet_config.cross_attention_dim} != text "
                             f"encoder hidden_size {text_config.hidden_size}")
        self.unet = UNetMotion(unet_config)
        self.text_encoder = CLIPTextEncoder(text_config)
        self.vae = None if vae_config is None else AutoencoderKL(vae_config)
        self.options = options
        self.empty_prompt_tokens = jnp.asarray(empty_prompt_tokens, jnp.int32).reshape(1, -1)  # (1, 77)
        # the training frames: (height, width), square from an int
        multiple = (self.pixel_patch if vae_config is None else vae_config.downsample_factor) * 2 ** (
            len(unet_config.block_out_channels) - 1)  # the UNet halves the latent (levels - 1) times
        self.num_frames = num_frames
        self.height, self.width = frame_size(image_size, multiple=multiple, owner=self.name)
        self.pretrained = dict(pretrained or {})
        self.tokenizer = None  # set by build_method_from_config: the tokenizer its captions are encoded with
        self.validation: list = []  # (prompt, reference (H, W, 3) in [-1, 1] or None) pairs: see set_validation
        self.validation_settings: dict = {}
        self.schedule: NoiseSchedule = make_schedule(
            options.beta_schedule, beta_start=options.beta_start, beta_end=options.beta_end,
            num_train_timesteps=options.num_train_timesteps)

    # ---------------------------------------------------------------- shapes and parameters
    @property
    def latent_frame_size(self) -> tuple[int, int]:
        """(h, w) of the latent grid the UNet sees."""
        factor = self.pixel_patch if self.vae is None else self.vae.config.downsample_factor
        return self.height // factor, self.width // factor

    @property
    def latent_channels(self) -> int:
        return self.unet.config.in_channels

    def _unet_example(self):
        sample = jax.ShapeDtypeStruct((1, self.num_frames, *self.latent_frame_size, self.latent_channels), jnp.float32)
        text = jax.ShapeDtypeStruct((1, self.empty_prompt_tokens.shape[1], self.unet.config.cross_attention_dim),
                                    jnp.float32)
        return sample, text

    def unet_sites(self, spec):
        """The UNet's sites of an adapter ``spec`` (``jaxvc/models/lora.py``), found by tracing its init."""
        from jaxvc.models import lora

        sample, text = self._unet_example()
        return lora.find_sites(lambda: self.unet.init(jax.random.key(0), jnp.zeros(sample.shape),
                                                      jnp.zeros((1,), jnp.int32), jnp.zeros(text.shape)), spec)

    def extra_params(self, rng: jax.Array | None, components: Mapping[str, Any]) -> dict:
        """Parameters a method adds beside the components (adapters): boxed and abstract when ``rng`` is None,
        concrete otherwise. ``components`` holds the (abstract or concrete) component trees."""
        return {}

    def abstract_params(self):
        sample, text = self._unet_example()
        unet = jax.eval_shape(self.unet.init, jax.random.key(0), sample, jnp.zeros((1,), jnp.int32), text)
        tree = {"unet": unet["params"],
                "text_encoder": abstract_clip_text_params(self.text_encoder.config)["params"]}
        if self.vae is not None:
            tree["vae"] = abstract_vae_params(self.vae.config)["params"]
        tree.update(self.extra_params(None, tree))
        return {"params": tree}

    def init_params(self, rng):
        unet_rng, text_rng, vae_rng = jax.random.split(rng, 3)  # as before extra_params existed: same inits
        extra_rng = jax.random.fold_in(rng, 3)
        sample, text = self._unet_example()
        tokens = self.empty_prompt_tokens
        # each component's init is its own program (init_program): one compile per component and method object
        fresh = {"unet": (unet_rng, lambda r: self.unet.init(r, jnp.zeros(sample.shape), jnp.zeros((1,), jnp.int32),
                                                              jnp.zeros(text.shape))),
                 "text_encoder": (text_rng, lambda r: self.text_encoder.init(
                     r, jnp.broadcast_to(tokens, (1, tokens.shape[1]))))}
        if self.vae is not None:
            size = self.vae.config.downsample_factor
            fresh["vae"] = (vae_rng, lambda r: self.vae.init(r, jnp.zeros((1, size, size,
                                                                          self.vae.config.in_channels))))
        unknown = sorted(set(self.pretrained) - set(fresh))
        if unknown:
            raise ValueError(f"{self.name}: pretrained weights given for unknown component(s) {unknown}")
        # a loaded component's random init is not run (at SD1.5 size it would cost seconds and gigabytes)
        tree = {name: self.pretrained[name] if name in self.pretrained
                else init_program(self, name, lambda r, make=make: nn.unbox(make(r))["params"])(component_rng)
                for name, (component_rng, make) in fresh.items()}
        # boxes stripped without sharding constraints; with weights read from files this runs eagerly (host arrays)
        extras = lambda r, components: strip_boxes(self.extra_params(r, components))
        made = extras if self.pretrained else init_program(self, "extras", extras)
        tree.update(made(extra_rng, tree))
        return {"params": tree}

    # ---------------------------------------------------------------- conditioning
    def encode_text(self, params, tokens):
        """tokens (B, 77) -> (B, 77, D) last hidden state of the text encoder (frozen unless train_text_encoder)."""
        out = self.text_encoder.apply({"params": params["params"]["text_encoder"]}, tokens)
        if self.options.train_text_encoder:
            return out["last_hidden_state"]
        return jax.lax.stop_gradient(out["last_hidden_state"])

    def encode_pixels(self, params, video):
        """video (B, F, H, W, 3) in [-1, 1] -> latents (B, F, h, w, c) (pixel space: blocks folded into channels)."""
        if self.vae is None:
            return to_patches(video, self.pixel_patch)
        latents = encode_video(self.vae, {"params": params["params"]["vae"]}, video)
        return jax.lax.stop_gradient(latents)

    def decode_latents(self, params, latents):
        if self.vae is None:
            return jnp.clip(from_patches(latents, self.pixel_patch), -1.0, 1.0)
        return jnp.clip(decode_video(self.vae, {"params": params["params"]["vae"]}, latents), -1.0, 1.0)

    # ---------------------------------------------------------------- sampling
    def scheduler_config(self) -> dict:
        """The training noise schedule in diffusers' scheduler-config terms, with DDIM inference settings.

        Pixel-space models clip the DDIM x0 estimate to the image range: near t = T, sqrt(alpha_bar) ~ 0 and an
        unclipped estimate explodes (latent-space models follow the authors and do not clip)."""
        opts = self.options
        return {"beta_schedule": opts.beta_schedule, "beta_start": opts.beta_start, "beta_end": opts.beta_end,
                "num_train_timesteps": opts.num_train_timesteps, "prediction_type": opts.prediction_type,
                "timestep_spacing": "linspace", "steps_offset": 1, "set_alpha_to_one": False,
                "clip_sample": self.vae is None}

    def pipeline(self, params, tokenizer):
        """A ``CustomVideoPipeline`` sampling this model with trained ``params`` ({"params": {...}})."""
        raise NotImplementedError(f"{self.name} has no generation pipeline")

    def custom_pipeline(self, params, tokenizer, *, text_config=None, text_params=None, **options):
        """``CustomVideoPipeline`` over this method's UNet, text encoder (or the given one) and VAE with the trained
        ``params``, its schedule and pixel patching; ``options`` are the pipeline's (adapters, conditioning...)."""
        from jaxvc.pipeline import CustomVideoPipeline

        tree = params["params"]
        pipe = CustomVideoPipeline(
            self.unet.config, {"params": tree["unet"]}, text_config or self.text_encoder.config,
            {"params": tree["text_encoder"] if text_params is None else text_params}, tokenizer,
            None if self.vae is None else self.vae.config, None if self.vae is None else {"params": tree["vae"]},
            scheduler_config=self.scheduler_config(), pixel_patch=self.pixel_patch, **options)
        pipe.default_video = (self.sample_frames, self.height, self.width)  # its size, its validation frames
        if self.sampling_defaults:  # and its validation sampling
            pipe.default_sampling = dict(self.sampling_defaults)
        return pipe

    # ---------------------------------------------------------------- validation samples (the trainer's hook)
    def example_batch(self, batch_size: int):
        return {"video": jax.ShapeDtypeStruct((batch_size, self.num_frames, self.height, self.width, 3), jnp.float32),
                "tokens": jax.ShapeDtypeStruct((batch_size, self.empty_prompt_tokens.shape[1]), jnp.int32)}


@dataclasses.dataclass
class Components:
    """What a config's ``model`` section builds: the three configs, loaded weights (if any) and the tokenizer."""
    unet: UNetConfig
    text: CLIPTextConfig
    vae: VAEConfig | None
    pretrained: dict
    tokenizer: Any
    pixel_patch: int


def build_components(config) -> Components:
    """Named sizes, or weights from local files (``config.model.pretrained`` pipeline folder / jaxvc checkpoint +
    ``config.model.motion_adapter``), with the config's compute dtype, remat policy and attention backend."""
    from jaxvc.models.tokenizer import load_tokenizer
    from jaxvc.models.unet import unet_config
    from jaxvc.train.compute import compute_dtype

    model = config.model
    dtype = compute_dtype(config.get("compute_dtype", "float32"))
    remat = config.get("remat_policy", "none") or "none"  # a policy name (jaxvc/train/compute.py)
    attention = model.get("attention_backend", "xla") or "xla"  # the UNet's; the VAE and text encoder keep xla
    if attention not in BACKENDS:
        raise ConfigError(f"config.model.attention_backend = {attention!r}: expected one of {', '.join(BACKENDS)}")
    pretrained, tokenizer_folder = {}, model.get("tokenizer") or None
    if not model.pretrained and model.get("requires_pretrained", False):
        raise ConfigError("config.model.pretrained is empty, but this variant fine-tunes pretrained weights: give a "
                          "local diffusers SD1.5 folder (or a converted AnimateDiff one; "
                          "--config.model.motion_adapter for the motion modules), or "
                          "--config.model.requires_pretrained=false to train from random weights")
    if model.pretrained:
        from jaxvc.convert.pipeline import load_pipeline
        weights = load_pipeline(model.pretrained, motion_adapter=model.motion_adapter or None,
                                allow_pickle=model.allow_pickle, dtype=dtype, remat=remat,
                                attention_backend=attention)
        unet, text, vae = weights.unet_config, weights.text_config, weights.vae_config
        if BUFFERS in weights.unet_params:
            # the methods apply the UNet with its parameters only, i.e. the sinusoidal formula's tables
            raise ConfigError(f"config.model.pretrained = {model.pretrained!r}: its motion modules store positional "
                              "tables that differ from the sinusoidal formula (the loader's warning names them); "
                              "the methods train and sample with the formula's, so they cannot fine-tune these "
                              "weights as they are (jaxvc generate on the folder uses the stored tables)")
        pretrained = {"unet": weights.unet_params["params"], "text_encoder": weights.text_params["params"]}
        if weights.vae_params is not None:
            pretrained["vae"] = weights.vae_params["params"]
        tokenizer_folder = tokenizer_folder or weights.tokenizer_folder
    else:
        vae = None if model.vae_variant == "none" else VAEConfig.variant(model.vae_variant)
        channels = 3 * model.get("pixel_patch", 1) ** 2 if vae is None else vae.latent_channels
        text = CLIPTextConfig.variant(model.text_variant)
        overrides = {"attention_backend": attention,
                     **(dict(model.unet_overrides.to_dict()) if model.get("unet_overrides") else {})}
        unet = unet_config(model.unet_variant, model.motion_layout, in_channels=channels, out_channels=channels,
                           cross_attention_dim=text.hidden_size, dtype=dtype, remat=remat, **overrides)
    return Components(unet, text, vae, pretrained, load_tokenizer(tokenizer_folder),
                      model.get("pixel_patch", 1) if not model.pretrained else 1)


def finish_from_config(method: VideoDiffusionMethod, config, components: Components) -> VideoDiffusionMethod:
    """The settings every method built from a config gets: jittable init or not, the tokenizer, validation."""
    method.init_params_jittable = not components.pretrained  # loaded weights are host arrays the trainer places
    if method.tokenizer is None:  # a method may extend it (CustomCrafter adds its placeholder token)
        method.tokenizer = components.tokenizer  # the one its captions were encoded with: generation from the run too
    configure_validation(method, config)
    return method


def configure_validation(method: VideoDiffusionMethod, config) -> None:
    """``config.validation``: the prompts (and reference images, for methods that take one) the trainer samples
    every ``sample_every`` steps, and the CLIP / DINO folders that score them. Checked here, not at the first sample
    point hours later."""
    from pathlib import Path

    from jaxvc.pipeline import load_reference_image

    validation = config.get("validation") or {}
    prompts, references = tuple(validation.get("prompts", ())), tuple(validation.get("references", ()))
    if config.get("sample_every", 0) and not prompts:
        raise ConfigError("sample_every > 0 needs config.validation.prompts"
                          + (" (and one reference image each)" if method.uses_reference else ""))
    for key in ("clip_model", "dino_model"):
        folder = validation.get(key, "")
        if folder and not (Path(folder) / "config.json").is_file():
            raise ConfigError(f"config.validation.{key} = {folder!r}: no config.json there (a local transformers "
                              "folder is expected)")
    sampler = validation.get("sampler", "")
    if sampler:
        from jaxvc.diffusion.samplers import sampler_names

        names = sampler_names(flow=getattr(method, "flow_matching", False))
        if sampler not in names:
            raise ConfigError(f"config.validation.sampler = {sampler!r}: method '{method.name}' samples with one of "
                              f"{names} ('' for its own)")
    frames = validation.get("num_frames")
    if frames is not None and int(frames) < 1:
        raise ConfigError(f"config.validation.num_frames = {frames}: a positive number of frames (or None for "
                          f"model.num_frames)")
    if frames is not None and hasattr(method, "latent_frames"):  # a Wan VAE codes 1 + 4k frames only
        try:
            method.latent_frames(int(frames))
        except ValueError as error:
            raise ConfigError(f"config.validation.num_frames = {frames}: {error}") from None
    method.generation_frames = None if frames is None else int(frames)
    if validation:  # the run's sampling, the defaults of its pipelines (``method.pipeline``, a loaded run's)
        method.sampling_defaults = validation_sampling(validation)
    if validation.get("eta", 0.0) and (sampler not in ("", "ddim") or getattr(method, "flow_matching", False)):
        raise ConfigError(f"config.validation.eta = {validation.get('eta')}: DDIM's eta; method '{method.name}' "
                          f"samples with {sampler or 'its own sampler'}, which takes none (set it to 0)")
    if prompts:
        if method.uses_reference and len(references) != len(prompts):
            raise ConfigError(f"config.validation: {len(prompts)} prompts but {len(references)} references")
        if not method.uses_reference and references:
            raise ConfigError(f"config.validation.references: method '{method.name}' takes no reference image")
        images = [load_reference_image(path, method.height, method.width) for path in references]
        method.set_validation(prompts, images, num_inference_steps=validation.get("steps", 25),
                              guidance_scale=validation.get("guidance_scale", 8.0), seed=validation.get("seed", 0),
                              sampler=sampler, eta=validation.get("eta", 0.0),
                              negative_prompt=validation.get("negative_prompt", ""))
