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

from jaxvc.config_utils import ConfigError
from jaxvc.diffusion import losses as diffusion_losses
from jaxvc.diffusion.schedule import add_noise, get_target
from jaxvc.methods.base import model_frame_size
from jaxvc.methods.video_base import (VideoDiffusionMethod, build_components, condition_dropout,
                                      finish_from_config, options_from_mapping)


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
    beta_schedule: str = "linear"       # the authors' (and AnimateDiff's) DDIM betas, not SD1.5's scaled_linear
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
            raise ConfigError(f"videomaker: loss_space={self.loss_space!r} is not one of "
                              f"{diffusion_losses.LOSS_SPACES}")
        if self.loss_weighting not in diffusion_losses.WEIGHTINGS:
            raise ConfigError(f"videomaker: loss_weighting={self.loss_weighting!r} is not one of "
                             f"{diffusion_losses.WEIGHTINGS}")
        diffusion_losses.check_timestep_bias(self.timestep_bias_strategy, self.timestep_bias_multiplier,
                                             self.timestep_bias_portion)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> "VideoMakerOptions":
        return options_from_mapping(cls, values, "videomaker")


def is_spatial_self_attention(path: tuple[str, ...]) -> bool:
    """``attn1`` of a spatial transformer block (down, mid or up), not of a motion module."""
    return "attn1" in path and any(p.startswith("attentions_") for p in path) and not is_motion_module(path)


def is_motion_module(path: tuple[str, ...]) -> bool:
    return any(p.startswith("motion_modules_") for p in path)


class VideoMaker(VideoDiffusionMethod):
    """Parameters: ``{"params": {"unet": ..., "text_encoder": ..., "vae": ...}}`` (``vae`` absent in pixel space);
    the shared parts (shapes, conditioning, validation samples) are in ``jaxvc/methods/video_base.py``."""
    name = "videomaker"
    uses_reference = True

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
        drop_text, drop_reference = condition_dropout(rng_drop, batch_size, opts.drop_both_prob, opts.drop_text_prob,
                                                      opts.drop_reference_prob)
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
    def pipeline(self, params, tokenizer):
        """A ``CustomVideoPipeline`` sampling this model with trained ``params`` ({"params": {...}})."""
        return self.custom_pipeline(params, tokenizer,
                                    reference_cross_attention=self.options.reference_cross_attention)

    def example_batch(self, batch_size: int):
        return {**super().example_batch(batch_size),
                "reference": jax.ShapeDtypeStruct((batch_size, self.height, self.width, 3), jnp.float32)}


def from_config(config) -> VideoMaker:
    """Build VideoMaker from ``configs/videomaker.py``: named sizes, or weights from local files
    (``config.model.pretrained`` pipeline folder/checkpoint + ``config.model.motion_adapter``)."""
    parts = build_components(config)
    model = config.model
    method = VideoMaker(parts.unet, parts.text, parts.vae, VideoMakerOptions.from_mapping(model.options.to_dict()),
                        parts.tokenizer(""), num_frames=model.num_frames, image_size=model_frame_size(model),
                        pretrained=parts.pretrained, pixel_patch=parts.pixel_patch)
    return finish_from_config(method, config, parts)
