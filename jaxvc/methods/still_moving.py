"""Still-Moving (Chefer et al., arXiv 2407.08674): a customized text-to-image model's spatial weights in a
text-to-video model, made to work by adapters trained on still ("frozen") videos. No video of the subject is needed.

Read top to bottom. The T2V model is an inflated T2I model (AnimateDiff: SD1.5's spatial layers + motion modules).
Plugging a customized T2I (DreamBooth, a LoRA) into it directly gives artifacts and weak adherence; Still-Moving
trains small adapters instead, in two stages, on frozen videos v = [x, x, ..., x] (one image repeated over F frames):

  stage "motion" (once per T2V base)
      Motion Adapter: LoRA (rank 32) on q, k, v of every temporal attention (``motion_modules_*/.../attn[12]``).
      Trained on frozen videos of the base T2I's images with the plain epsilon-MSE, the model learns to make *still*
      videos; everything else is frozen.
  stage "spatial" (per customization)
      Spatial weights <- the customized T2I's (a LoRA file merged in, or a fine-tuned pipeline folder); the motion
      adapter is loaded, on (scale 1) and frozen. Spatial Adapters: a zero-initialised low-rank linear map (rank 64)
      on the output of every spatial ResNet and transformer block, y = f(x) + up(down(f(x))), trained ~500 steps on
      about 40 frozen videos made from the customized T2I's samples. With the motion adapter on, a frozen video is
      what the model should produce, so the spatial adapters learn to fix the customized features *without* having
      to explain away motion. Prior preservation ([G] off) is a data matter: a second stream of frozen videos from
      the *original* T2I's class samples (``config.data.streams.prior``), mixed in at an equal rate, same loss.
  inference
      The motion adapter is removed (scale 0): customized spatial weights + spatial adapters + the original motion
      modules generate moving videos of the customized subject.

The adapters are ``jaxvc/models/lora.py``'s, applied while the UNet runs; the method's parameter tree is the base
model's plus ``adapters/motion`` (and ``adapters/spatial``), and only the stage's adapter trains. Which layers and
ranks are [G] defaults of ``specs/METHODS.md`` (c): the paper gives no numbers for them.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxvc.config_utils import ConfigError
from jaxvc.diffusion import losses as diffusion_losses
from jaxvc.diffusion.schedule import add_noise
from jaxvc.methods.base import model_frame_size
from jaxvc.methods.video_base import (VideoDiffusionMethod, build_components, finish_from_config,
                                      options_from_mapping)
from jaxvc.models import lora

STAGES = ("motion", "spatial")
MOTION_TARGETS = (r".*motion_modules_\d+/transformer_blocks_\d+/attn[12]/to_[qkv]",)
SPATIAL_TARGETS = (r"(down_blocks_\d+|mid_block|up_blocks_\d+)/(resnets|attentions)_\d+",)


@dataclasses.dataclass(frozen=True)
class StillMovingOptions:
    stage: str = "motion"
    motion_rank: int = 32
    motion_alpha: float | None = None
    motion_targets: tuple[str, ...] = MOTION_TARGETS
    spatial_rank: int = 64
    spatial_targets: tuple[str, ...] = SPATIAL_TARGETS
    # stage "spatial": the trained motion adapter, a stage-"motion" run folder or a LoRA file written by save_lora
    motion_adapter: str = ""
    # the customization: a LoRA file (diffusers / peft / kohya) merged into the UNet (and the text encoder, if the
    # file has one) at this scale. Empty when config.model.pretrained already is the customized model.
    customization_lora: str = ""
    customization_scale: float = 1.0
    freeze_frames: bool = True  # train on frame 0 repeated F times, whatever the data stream gives
    drop_text_prob: float = 0.0  # caption -> "" (the base model's unconditional branch is kept as it is by default)
    inference_motion_scale: float = 0.0  # the paper removes the motion adapter at inference
    train_text_encoder: bool = False
    prediction_type: str = "epsilon"
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    num_train_timesteps: int = 1000

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ConfigError(f"still_moving: stage={self.stage!r} is not one of {STAGES}")
        if self.train_text_encoder:
            raise ConfigError("still_moving: the text encoder stays frozen (only the stage's adapter trains)")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> "StillMovingOptions":
        values = dict(values or {})
        for key in ("motion_targets", "spatial_targets"):
            if key in values:
                values[key] = tuple(values[key])
        return options_from_mapping(cls, values, "still_moving")


class StillMoving(VideoDiffusionMethod):
    """Parameters: ``{"params": {"unet", "text_encoder", "vae", "adapters": {"motion", "spatial"}}}``."""
    name = "still_moving"
    uses_reference = False

    def __init__(self, *args, motion_adapter: lora.AppliedAdapter | None = None,
                 customization: Mapping[str, lora.AppliedAdapter] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        opts = self.options
        self.motion_spec = lora.AdapterSpec(include=opts.motion_targets, rank=opts.motion_rank,
                                            alpha=opts.motion_alpha, placement="input")
        self.spatial_spec = lora.AdapterSpec(include=opts.spatial_targets, rank=opts.spatial_rank,
                                             placement="output")
        if opts.stage == "spatial" and motion_adapter is None:
            raise ConfigError("still_moving: stage 'spatial' needs the trained motion adapter "
                             "(config.model.options.motion_adapter: a stage-'motion' run folder or LoRA file)")
        self.loaded_motion_adapter = motion_adapter  # frozen in stage "spatial"
        if motion_adapter is not None:
            self.motion_spec = motion_adapter.spec
        self.customization = dict(customization or {})
        self.sample_motion_scale = 1.0 if opts.stage == "motion" else opts.inference_motion_scale

    # ---------------------------------------------------------------- parameters
    def extra_params(self, rng, components):
        """``adapters``: the motion adapter (fresh in stage "motion", loaded in stage "spatial") and, in stage
        "spatial", the fresh spatial adapters."""
        def fresh(spec, index):
            sites = self.unet_sites(spec)
            if rng is None:
                return jax.eval_shape(lambda: lora.init_adapter(jax.random.key(0), sites, spec, boxed=True))
            return lora.init_adapter(jax.random.fold_in(rng, index), sites, spec, boxed=True)

        if self.loaded_motion_adapter is None:
            adapters = {"motion": fresh(self.motion_spec, 0)}
        else:  # replicated: small, and loaded as host arrays
            tree = self.loaded_motion_adapter.tree
            adapters = {"motion": jax.tree.map(
                lambda x: nn.LogicallyPartitioned(jax.ShapeDtypeStruct(x.shape, jnp.float32) if rng is None
                                                  else jnp.asarray(x, jnp.float32), (None,) * x.ndim), tree)}
        if self.options.stage == "spatial":
            adapters["spatial"] = fresh(self.spatial_spec, 1)
        return {"adapters": adapters}

    def init_params(self, rng):
        params = super().init_params(rng)
        tree = dict(params["params"])
        for component, adapter in self.customization.items():  # the customized T2I's weights
            tree[component] = lora.merge(tree[component], adapter)
        return {"params": tree}

    def trainable(self, path: tuple[str, ...]) -> bool:
        return len(path) >= 3 and path[1] == "adapters" and path[2] == self.options.stage

    # ---------------------------------------------------------------- the model with its adapters
    def adapters(self, params, motion_scale) -> list[lora.AppliedAdapter]:
        """The adapters the UNet runs with: the motion adapter at ``motion_scale`` (left out when that is the number
        0: removed, as at inference) and the spatial adapters, if any, at scale 1."""
        tree = params["params"]["adapters"]
        removed = isinstance(motion_scale, (int, float)) and motion_scale == 0
        applied = [] if removed else [lora.AppliedAdapter(self.motion_spec, tree["motion"], motion_scale)]
        if "spatial" in tree:
            applied.append(lora.AppliedAdapter(self.spatial_spec, tree["spatial"], 1.0))
        return applied

    def denoise(self, params, noisy_latents, timesteps, text_embeddings, motion_scale=1.0):
        """(B, F, h, w, c) -> (B, F, h, w, c): the UNet with the motion adapter at ``motion_scale`` and the spatial
        adapters (if any) on."""
        with lora.applied(self.adapters(params, motion_scale)):
            return self.unet.apply({"params": params["params"]["unet"]}, noisy_latents, timesteps, text_embeddings)

    # ---------------------------------------------------------------- the loss
    def loss(self, params, batch, rng):
        opts = self.options
        rng_t, rng_noise, rng_drop = jax.random.split(rng, 3)
        video = batch["video"]  # (B, F, H, W, 3)
        if opts.freeze_frames:  # encode one frame, repeat its latent: a frozen video
            first = self.encode_pixels(params, video[:, :1])  # (B, 1, h, w, c)
            latents = jnp.repeat(first, video.shape[1], axis=1)
        else:
            latents = self.encode_pixels(params, video)
        batch_size = latents.shape[0]
        drop = jax.random.uniform(rng_drop, (batch_size,)) < opts.drop_text_prob
        tokens = jnp.where(drop[:, None], self.empty_prompt_tokens, batch["tokens"])
        text = self.encode_text(params, tokens)
        t = diffusion_losses.sample_timesteps(rng_t, batch_size, opts.num_train_timesteps)
        noise = jax.random.normal(rng_noise, latents.shape, latents.dtype)
        noisy = add_noise(self.schedule, latents, noise, t)
        prediction = self.denoise(params, noisy, t, text, motion_scale=1.0)
        loss, _ = diffusion_losses.diffusion_loss(self.schedule, prediction, latents, noise, t,
                                                  prediction_type=opts.prediction_type, x_t=noisy)
        return loss, {"diffusion_loss": loss}

    def exported_adapters(self, params):
        """``jaxvc export-lora``: the motion adapter (a LoRA); the spatial adapters are output adapters."""
        tree = params["params"]["adapters"]
        return ({"unet": lora.AppliedAdapter(self.motion_spec, tree["motion"])},
                ["adapters/spatial"] if "spatial" in tree else [])

    # ---------------------------------------------------------------- sampling
    def pipeline(self, params, tokenizer, motion_scale: float | None = None):
        """Text-to-video sampling (no reference frame) with the spatial adapters on and the motion adapter at
        ``motion_scale`` (default: removed, as the paper; stage "motion" runs sample with it on, to show stills)."""
        scale = self.sample_motion_scale if motion_scale is None else float(motion_scale)
        return self.custom_pipeline(params, tokenizer, reference_frame=False, adapters=self.adapters(params, scale))


def load_motion_adapter(path: str, unet_params) -> lora.AppliedAdapter:
    """The trained motion adapter from a stage-"motion" run folder (its latest checkpoint, EMA weights if kept) or
    from a LoRA file (``jaxvc.convert.lora.save_lora``)."""
    from jaxvc.train.trained_run import is_run_folder, load_trained_run

    if is_run_folder(path):
        run = load_trained_run(path)
        if run.config.method != "still_moving" or run.method.options.stage != "motion":
            raise ValueError(f"{path}: not a Still-Moving stage-'motion' run (method {run.config.method!r})")
        tree = jax.tree.map(lambda x: jax.device_get(x), run.params["params"]["adapters"]["motion"])
        return lora.AppliedAdapter(run.method.motion_spec, tree, 1.0)
    if not Path(path).exists():
        raise FileNotFoundError(f"still_moving: motion adapter {path!r}: no such run folder or LoRA file")
    from jaxvc.convert.lora import read_lora

    return read_lora(path, {"unet": unet_params}).adapters["unet"]


def from_config(config) -> StillMoving:
    """Build Still-Moving from ``configs/still_moving.py``."""
    from jaxvc.convert.lora import read_lora
    from jaxvc.convert.unet import abstract_variables
    from jaxvc.models.clip_text import abstract_clip_text_params

    parts = build_components(config)
    model = config.model
    opts = StillMovingOptions.from_mapping(model.options.to_dict())
    # the architecture (shapes only) that files are matched against
    unet_shapes = abstract_variables(parts.unet)["params"]
    motion = load_motion_adapter(opts.motion_adapter, unet_shapes) if opts.motion_adapter else None
    customization = {}
    if opts.customization_lora:
        loaded = read_lora(opts.customization_lora, {"unet": unet_shapes, "text_encoder": abstract_clip_text_params(
            parts.text)["params"]}, scale=opts.customization_scale)
        customization = loaded.adapters
    method = StillMoving(parts.unet, parts.text, parts.vae, opts, parts.tokenizer(""), motion_adapter=motion,
                         customization=customization, num_frames=model.num_frames,
                         image_size=model_frame_size(model), pretrained=parts.pretrained, pixel_patch=parts.pixel_patch)
    # the adapters read from files are small: they enter the jitted init as constants (only pretrained weights,
    # big host arrays, make the trainer initialise eagerly)
    return finish_from_config(method, config, parts)
