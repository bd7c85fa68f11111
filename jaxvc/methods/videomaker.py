"""VideoMaker (arXiv 2412.19645): zero-shot customized video generation with the video model's own features.

Read top to bottom: the reference image becomes one extra, **last** latent frame of the video; every UNet layer
processes the F+1 frames (ResNets per frame, motion modules over F+1 frames, cross-attention with the same text);
in every spatial self-attention (PISA, ``jaxvc/models/transformer2d.py``) each generated frame attends over
``[its own tokens; the reference tokens]`` and the reference's own outputs are averaged over the F frames.
No new parameters: training updates the spatial self-attention (attn1 q/k/v/out) and the motion modules.

Training objective, Guidance Information Recognition Loss (GIRL):
    t ~ U{0..T-1},  z_t = noised video latents (B, F, h, w, c)
    t' = floor(alpha * t) (alpha = 0.01),  r_t' = reference latent noised at t' (the "remind" timestep)
    eps_hat = UNet([z_t ; r_t'], t, text)   (B, F+1, h, w, c); the reference frame gets the same t and text
    L = ||eps - eps_hat[:, :F]||^2 + beta * ||eps_r - eps_hat[:, F]||^2   (beta = 0.1, plain mean MSE)
With ``loss_space="x0"`` both errors are measured on the clean-sample estimates instead (v-prediction then behaves
as an x0 model whose output has a skip connection from its input; see ``VideoMakerOptions.loss_space``).
Condition dropout for classifier-free guidance: text -> the empty prompt and/or reference -> zeros (the
unconditional branch at inference uses a zero reference latent, as the authors' code).

Ablation switches (the paper's Table): ``girl`` (off: clean reference, no reference loss), ``reference_cross_attention``
(off: the reference frame skips attn2), ``train_motion_modules`` (off: only spatial self-attention trains).
``train_all_unet`` trains every UNet weight and ``train_text_encoder`` the text encoder too (for models trained from
scratch, e.g. the demo's synthetic world, whose text encoder has no pretrained weights to keep).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxvc.diffusion import losses as diffusion_losses
from jaxvc.diffusion.schedule import NoiseSchedule, add_noise, get_target, make_schedule
from jaxvc.methods.base import Method
from jaxvc.models.attention import BACKENDS
from jaxvc.models.clip_text import CLIPTextConfig, CLIPTextEncoder, abstract_clip_text_params
from jaxvc.models.patchify import from_patches, to_patches
from jaxvc.models.unet import UNetConfig, UNetMotion
from jaxvc.models.vae import AutoencoderKL, VAEConfig, abstract_vae_params, decode_video, encode_video


@dataclasses.dataclass(frozen=True)
class VideoMakerOptions:
    girl: bool = True
    girl_alpha: float = 0.01            # t' = floor(alpha * t)
    girl_beta: float = 0.1              # weight of the reference-frame loss
    reference_cross_attention: bool = True
    train_spatial_self_attention: bool = True
    train_motion_modules: bool = True
    train_all_unet: bool = False
    train_text_encoder: bool = False    # the paper freezes CLIP; a model trained from scratch has no CLIP to keep
    drop_both_prob: float = 0.1         # text -> "" and reference -> zeros together
    drop_text_prob: float = 0.0
    drop_reference_prob: float = 0.0
    prediction_type: str = "epsilon"
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    num_train_timesteps: int = 1000
    snr_gamma: float | None = None      # min-SNR weighting (off by default, as the paper)
    # Per-timestep weight of the video loss (jaxvc/diffusion/losses.py WEIGHTINGS); None: min-SNR when snr_gamma is
    # set, else none (the paper). "inverse_one_minus_alpha_bar" on an x0 loss, 1/(1 - ab_t) = SNR + 1, weighs each
    # timestep as a v-prediction loss would, up to loss_weight_max.
    loss_weighting: str | None = None
    loss_weight_max: float | None = None
    # Where the error is measured: "target" (the paper: eps, v or x0, whatever the model predicts) or "x0" (the
    # prediction turned into a clean-sample estimate first). v-prediction with an x0-space loss gives the output a
    # skip connection, x0_hat = sqrt(ab) x_t - sqrt(1 - ab) v_hat (identity at small t, free-form at large t), and
    # weights every timestep by its x0 error, as an x0-prediction model does.
    loss_space: str = "target"
    # Training timesteps: uniform as in the paper ("none"), or diffusers' timestep bias: "later" draws the noisiest
    # `portion` of the timesteps `multiplier` times as often (where the layout, hence the caption, decides).
    timestep_bias_strategy: str = "none"
    timestep_bias_multiplier: float = 1.0
    timestep_bias_portion: float = 0.25

    def __post_init__(self):
        if self.loss_space not in diffusion_losses.LOSS_SPACES:
            raise ValueError(f"videomaker: loss_space={self.loss_space!r} is not one of {diffusion_losses.LOSS_SPACES}")
        if self.loss_weighting not in diffusion_losses.WEIGHTINGS:
            raise ValueError(f"videomaker: loss_weighting={self.loss_weighting!r} is not one of "
                             f"{diffusion_losses.WEIGHTINGS}")
        diffusion_losses.check_timestep_bias(self.timestep_bias_strategy, self.timestep_bias_multiplier,
                                             self.timestep_bias_portion)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> "VideoMakerOptions":
        values = dict(values or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"videomaker: unknown option(s) {unknown}; known: {sorted(known)}")
        return cls(**values)


def is_spatial_self_attention(path: tuple[str, ...]) -> bool:
    """``attn1`` of a spatial transformer block (down, mid or up), not of a motion module."""
    return "attn1" in path and any(p.startswith("attentions_") for p in path) and not is_motion_module(path)


def is_motion_module(path: tuple[str, ...]) -> bool:
    return any(p.startswith("motion_modules_") for p in path)


class VideoMaker(Method):
    """Parameters: ``{"params": {"unet": ..., "text_encoder": ..., "vae": ...}}`` (``vae`` absent in pixel space).

    ``vae_config=None`` runs the diffusion in pixel space, optionally on ``pixel_patch`` x ``pixel_patch`` blocks
    folded into channels (``jaxvc/models/patchify.py``; the UNet's in/out channels are then 3 * pixel_patch^2), which
    is how the demo trains a tiny model from scratch on a CPU.
    """
    name = "videomaker"

    def __init__(self, unet_config: UNetConfig, text_config: CLIPTextConfig, vae_config: VAEConfig | None,
                 options: VideoMakerOptions, empty_prompt_tokens, *, num_frames: int, image_size: int,
                 pretrained: Mapping[str, Any] | None = None, pixel_patch: int = 1):
        if unet_config.motion is None:
            raise ValueError("videomaker: the UNet needs motion modules (unet_config.motion is None)")
        if vae_config is not None and pixel_patch != 1:
            raise ValueError("videomaker: pixel_patch applies to pixel-space models only (vae_config is set)")
        self.pixel_patch = int(pixel_patch)
        latent_channels = 3 * self.pixel_patch ** 2 if vae_config is None else vae_config.latent_channels
        if unet_config.in_channels != latent_channels or unet_config.out_channels != latent_channels:
            raise ValueError(f"videomaker: UNet in/out channels ({unet_config.in_channels}, "
                             f"{unet_config.out_channels}) must equal the latent channels ({latent_channels})")
        if unet_config.cross_attention_dim != text_config.hidden_size:
            raise ValueError(f"videomaker: UNet cross_attention_dim {unet_config.cross_attention_dim} != text "
                             f"encoder hidden_size {text_config.hidden_size}")
        self.unet = UNetMotion(unet_config)
        self.text_encoder = CLIPTextEncoder(text_config)
        self.vae = None if vae_config is None else AutoencoderKL(vae_config)
        self.options = options
        self.empty_prompt_tokens = jnp.asarray(empty_prompt_tokens, jnp.int32).reshape(1, -1)  # (1, 77)
        self.num_frames, self.image_size = num_frames, image_size
        self.pretrained = dict(pretrained or {})
        self.tokenizer = None  # set by from_config: the tokenizer its captions are encoded with
        self.validation: list = []  # (prompt, reference (H, W, 3) in [-1, 1]) pairs: see set_validation
        self.validation_settings: dict = {}
        self.schedule: NoiseSchedule = make_schedule(
            options.beta_schedule, beta_start=options.beta_start, beta_end=options.beta_end,
            num_train_timesteps=options.num_train_timesteps)

    # ---------------------------------------------------------------- shapes and parameters
    @property
    def latent_size(self) -> int:
        return self.image_size // (self.pixel_patch if self.vae is None else self.vae.config.downsample_factor)

    @property
    def latent_channels(self) -> int:
        return self.unet.config.in_channels

    def _unet_example(self):
        size, c = self.latent_size, self.latent_channels
        sample = jax.ShapeDtypeStruct((1, self.num_frames, size, size, c), jnp.float32)
        text = jax.ShapeDtypeStruct((1, self.empty_prompt_tokens.shape[1], self.unet.config.cross_attention_dim),
                                    jnp.float32)
        return sample, text

    def abstract_params(self):
        sample, text = self._unet_example()
        unet = jax.eval_shape(self.unet.init, jax.random.key(0), sample, jnp.zeros((1,), jnp.int32), text)
        tree = {"unet": unet["params"],
                "text_encoder": abstract_clip_text_params(self.text_encoder.config)["params"]}
        if self.vae is not None:
            tree["vae"] = abstract_vae_params(self.vae.config)["params"]
        return {"params": tree}

    def init_params(self, rng):
        unet_rng, text_rng, vae_rng = jax.random.split(rng, 3)
        sample, text = self._unet_example()
        tree = {"unet": nn.unbox(self.unet.init(unet_rng, jnp.zeros(sample.shape), jnp.zeros((1,), jnp.int32),
                                                jnp.zeros(text.shape)))["params"],
                "text_encoder": nn.unbox(self.text_encoder.init(
                    text_rng, jnp.broadcast_to(self.empty_prompt_tokens, (1, self.empty_prompt_tokens.shape[1]))
                ))["params"]}
        if self.vae is not None:
            size = self.vae.config.downsample_factor
            tree["vae"] = nn.unbox(self.vae.init(vae_rng, jnp.zeros((1, size, size, self.vae.config.in_channels))))[
                "params"]
        for name, loaded in self.pretrained.items():
            if name not in tree:
                raise ValueError(f"videomaker: pretrained weights given for unknown component '{name}'")
            tree[name] = loaded
        return {"params": tree}

    def trainable(self, path: tuple[str, ...]) -> bool:
        if len(path) >= 2 and path[1] == "text_encoder":
            return self.options.train_text_encoder
        if len(path) < 2 or path[1] != "unet":
            return False  # the VAE is frozen
        if self.options.train_all_unet:
            return True
        if self.options.train_spatial_self_attention and is_spatial_self_attention(path):
            return True
        return self.options.train_motion_modules and is_motion_module(path)

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

    def denoise(self, params, noisy_latents, timesteps, text_embeddings, reference_latent):
        """The UNet on [video frames; reference frame]: (B, F, h, w, c) + (B, 1, h, w, c) -> (B, F+1, h, w, c)."""
        return self.unet.apply({"params": params["params"]["unet"]}, noisy_latents, timesteps, text_embeddings,
                               reference_latent=reference_latent,
                               reference_cross_attention=self.options.reference_cross_attention)

    # ---------------------------------------------------------------- the loss
    def loss(self, params, batch, rng):
        opts = self.options
        rng_t, rng_noise, rng_ref_noise, rng_drop = jax.random.split(rng, 4)
        latents = batch["latents"] if "latents" in batch else self.encode_pixels(params, batch["video"])
        if "reference_latent" in batch:
            reference = batch["reference_latent"]
        else:
            reference = self.encode_pixels(params, batch["reference"][:, None])  # (B, 1, h, w, c)
        tokens = batch["tokens"]
        batch_size, num_frames = latents.shape[:2]

        # condition dropout: per example, both / text only / reference only
        u = jax.random.uniform(rng_drop, (batch_size,))
        drop_both = u < opts.drop_both_prob
        drop_text = drop_both | ((u >= opts.drop_both_prob) & (u < opts.drop_both_prob + opts.drop_text_prob))
        lo = opts.drop_both_prob + opts.drop_text_prob
        drop_reference = drop_both | ((u >= lo) & (u < lo + opts.drop_reference_prob))
        tokens = jnp.where(drop_text[:, None], self.empty_prompt_tokens, tokens)
        reference = jnp.where(drop_reference[:, None, None, None, None], 0.0, reference)
        text = self.encode_text(params, tokens)

        weights = None
        if opts.timestep_bias_strategy != "none":
            weights = diffusion_losses.timestep_weights(opts.num_train_timesteps, opts.timestep_bias_strategy,
                                                        opts.timestep_bias_multiplier, opts.timestep_bias_portion)
        t = diffusion_losses.sample_timesteps(rng_t, batch_size, opts.num_train_timesteps, weights=weights)
        noise = jax.random.normal(rng_noise, latents.shape, latents.dtype)
        noisy = add_noise(self.schedule, latents, noise, t)
        if opts.girl:
            t_ref = jnp.floor(opts.girl_alpha * t).astype(jnp.int32)  # the "remind" timestep t' = floor(0.01 t)
            reference_noise = jax.random.normal(rng_ref_noise, reference.shape, reference.dtype)
            reference_input = add_noise(self.schedule, reference, reference_noise, t_ref)
        else:
            reference_input = reference

        prediction = self.denoise(params, noisy, t, text, reference_input)  # (B, F+1, h, w, c)
        video_target = get_target(self.schedule, latents, noise, t, opts.prediction_type)
        weighting = opts.loss_weighting or ("min_snr" if opts.snr_gamma else None)
        video_loss, _ = diffusion_losses.diffusion_loss(
            self.schedule, prediction[:, :num_frames], latents, noise, t, prediction_type=opts.prediction_type,
            x_t=noisy, loss_space=opts.loss_space, weighting=weighting, snr_gamma=opts.snr_gamma or 5.0,
            max_weight=opts.loss_weight_max)
        metrics = {"video_loss": video_loss,
                   "video_mse_unweighted": jnp.mean(jnp.square(prediction[:, :num_frames] - video_target))}
        total = video_loss
        if opts.girl:
            reference_loss, _ = diffusion_losses.diffusion_loss(
                self.schedule, prediction[:, num_frames:], reference, reference_noise, t_ref,
                prediction_type=opts.prediction_type, x_t=reference_input, loss_space=opts.loss_space)
            total = total + opts.girl_beta * reference_loss
            metrics["reference_loss"] = reference_loss
        metrics["drop_reference_rate"] = jnp.mean(drop_reference.astype(jnp.float32))
        return total, metrics

    # ---------------------------------------------------------------- sampling
    def scheduler_config(self) -> dict:
        """The training noise schedule in diffusers' scheduler-config terms, with VideoMaker's inference settings.

        Pixel-space models clip the DDIM x0 estimate to the image range: near t = T, sqrt(alpha_bar) ~ 0 and an
        unclipped estimate explodes (latent-space models follow the authors and do not clip)."""
        opts = self.options
        return {"beta_schedule": opts.beta_schedule, "beta_start": opts.beta_start, "beta_end": opts.beta_end,
                "num_train_timesteps": opts.num_train_timesteps, "prediction_type": opts.prediction_type,
                "timestep_spacing": "linspace", "steps_offset": 1, "set_alpha_to_one": False,
                "clip_sample": self.vae is None}

    def pipeline(self, params, tokenizer):
        """A ``CustomVideoPipeline`` sampling this model with trained ``params`` ({"params": {...}})."""
        from jaxvc.pipeline import CustomVideoPipeline

        tree = params["params"]
        return CustomVideoPipeline(
            self.unet.config, {"params": tree["unet"]}, self.text_encoder.config, {"params": tree["text_encoder"]},
            tokenizer, None if self.vae is None else self.vae.config,
            None if self.vae is None else {"params": tree["vae"]}, scheduler_config=self.scheduler_config(),
            reference_cross_attention=self.options.reference_cross_attention, pixel_patch=self.pixel_patch)

    # ---------------------------------------------------------------- validation samples (the trainer's hook)
    def set_validation(self, prompts, references, *, num_inference_steps: int = 25, guidance_scale: float = 8.0,
                       seed: int = 0) -> None:
        """What ``sample`` generates every ``config.sample_every`` steps: each prompt with its reference image."""
        if len(prompts) != len(references):
            raise ValueError(f"videomaker validation: {len(prompts)} prompts but {len(references)} reference images "
                             "(one each)")
        self.validation = list(zip(prompts, references))
        self.validation_settings = dict(num_inference_steps=int(num_inference_steps),
                                        guidance_scale=float(guidance_scale), seed=int(seed))

    def sample(self, params, rng):
        """Validation videos ``{"validation": (N, F, S, S, 3)}`` in [-1, 1], traced under the trainer's jit. Each
        uses the seed ``validation_settings["seed"] + i``, not ``rng``: the same noise at every sample point, so the
        videos show what training changed."""
        del rng
        if not self.validation:
            raise ValueError("videomaker: no validation prompts (config.validation.prompts) to sample")
        from jaxvc.models.tokenizer import load_tokenizer

        pipe = self.pipeline(params, self.tokenizer or load_tokenizer(None))
        settings = self.validation_settings
        videos = [pipe.generate(jnp.asarray(reference, jnp.float32)[None], prompt, num_frames=self.num_frames,
                                height=self.image_size, width=self.image_size, seed=settings["seed"] + i,
                                num_inference_steps=settings["num_inference_steps"],
                                guidance_scale=settings["guidance_scale"])[0]
                  for i, (prompt, reference) in enumerate(self.validation)]
        return {"validation": jnp.clip(jnp.stack(videos), -1.0, 1.0)}

    def example_batch(self, batch_size: int):
        size = self.image_size
        return {"video": jax.ShapeDtypeStruct((batch_size, self.num_frames, size, size, 3), jnp.float32),
                "reference": jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.float32),
                "tokens": jax.ShapeDtypeStruct((batch_size, self.empty_prompt_tokens.shape[1]), jnp.int32)}


def from_config(config) -> VideoMaker:
    """Build VideoMaker from ``configs/videomaker.py``: named sizes, or weights from local files
    (``config.model.pretrained`` pipeline folder/checkpoint + ``config.model.motion_adapter``)."""
    from jaxvc.models.clip_text import CLIPTextConfig
    from jaxvc.models.tokenizer import load_tokenizer
    from jaxvc.models.unet import unet_config
    from jaxvc.train.compute import compute_dtype

    model = config.model
    dtype = compute_dtype(config.get("compute_dtype", "float32"))
    remat = config.get("remat_policy", "none") or "none"  # a policy name (jaxvc/train/compute.py)
    attention = model.get("attention_backend", "xla") or "xla"  # the UNet's; the VAE and text encoder keep xla
    if attention not in BACKENDS:
        raise ValueError(f"config.model.attention_backend = {attention!r}: expected one of {', '.join(BACKENDS)}")
    pretrained, tokenizer_folder = {}, model.get("tokenizer") or None
    if model.pretrained:
        from jaxvc.convert.pipeline import load_pipeline
        weights = load_pipeline(model.pretrained, motion_adapter=model.motion_adapter or None,
                                allow_pickle=model.allow_pickle, dtype=dtype, remat=remat,
                                attention_backend=attention)
        unet, text, vae = weights.unet_config, weights.text_config, weights.vae_config
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
    tokenizer = load_tokenizer(tokenizer_folder)
    method = VideoMaker(unet, text, vae, VideoMakerOptions.from_mapping(model.options.to_dict()), tokenizer(""),
                        num_frames=model.num_frames, image_size=model.image_size, pretrained=pretrained,
                        pixel_patch=model.get("pixel_patch", 1) if not model.pretrained else 1)
    method.init_params_jittable = not pretrained  # loaded weights are host arrays the trainer places itself
    method.tokenizer = tokenizer  # the one its captions were encoded with: generation from the run uses it too
    _configure_validation(method, config)
    return method


def _configure_validation(method: VideoMaker, config) -> None:
    """``config.validation``: the prompts and reference images the trainer samples every ``sample_every`` steps,
    and the CLIP / DINO folders that score them. Checked here, not at the first sample point hours later."""
    from pathlib import Path

    from jaxvc.config_utils import ConfigError
    from jaxvc.pipeline import load_reference_image

    validation = config.get("validation") or {}
    prompts, references = tuple(validation.get("prompts", ())), tuple(validation.get("references", ()))
    if config.get("sample_every", 0) and not prompts:
        raise ConfigError("sample_every > 0 needs config.validation.prompts (and one reference image each)")
    for key in ("clip_model", "dino_model"):
        folder = validation.get(key, "")
        if folder and not (Path(folder) / "config.json").is_file():
            raise ConfigError(f"config.validation.{key} = {folder!r}: no config.json there (a local transformers "
                              "folder is expected)")
    if prompts:
        if len(references) != len(prompts):
            raise ConfigError(f"config.validation: {len(prompts)} prompts but {len(references)} references")
        images = [load_reference_image(path, method.image_size, method.image_size) for path in references]
        method.set_validation(prompts, images, num_inference_steps=validation.get("steps", 25),
                              guidance_scale=validation.get("guidance_scale", 8.0), seed=validation.get("seed", 0))
