"""CustomCrafter (arXiv 2408.13239): per-subject tuning of a video model on a few images of the subject, keeping
its motion, with a Spatial Subject Learning Module and Dynamic Weighted Video Sampling.

Read top to bottom.
  Spatial Subject Learning Module (SSLM): LoRA (rank 4, down ~ N(0, 1/r^2), up = 0) on to_q, to_k, to_v of the
      self-attention (attn1) and cross-attention (attn2) of every *spatial* transformer block; not the temporal
      layers, not to_out, not the feed-forwards. Plus textual inversion: a new token ``<new1>`` whose embedding row
      starts as the class word's (``initializer_token``, e.g. "toy") and trains; the rest of the text encoder and the
      whole UNet are frozen. Custom Diffusion's trick is kept: in cross-attention the key and value of token 0 (the
      start token) carry no gradient.
  Data: each subject image becomes a static video (the image repeated over ``num_frames``, 4 in the paper's config)
      with a caption such as "a <new1> toy" (its own, or one of the authors' templates with "<new1> <class>":
      ``config.data.caption_phrases``); prior preservation: every batch is half instance, half class images ("a
      toy"; ``config.data.fixed_split``), as the authors concatenate them, and the batch mean is the authors'
      L + 1 * L_prior up to a constant factor (alpha = 1; with Adam a constant loss factor changes nothing).
  Loss: masked mean of the per-element error on the noise (L2 by default; the authors' config says L1,
      ``loss_type``); the mask (``batch["mask"]``, a subject box or segmentation) pooled to the latent grid.
  Dynamic Weighted Video Sampling (DWV): the LoRA scale is 0.4 for the first K = 5 of 50 DDIM steps (the layout and
      motion form with the model's own prior), then 0.8 (the subject's appearance is painted in); CFG 12 with the
      empty prompt, DDIM eta 1.

The paper's base is VideoCrafter2; jaxvc runs the same mechanism on its AnimateDiff UNet (SD1.5 + motion modules),
whose spatial transformer blocks are the same BasicTransformerBlocks. The authors' data augmentation is the input
pipeline's (``config.data``): instance images flipped with p 0.5 and rescaled (``jaxvc.data.transforms.
rescale_subject``: zoomed out onto black with a "far away"/"very small" prefix and the loss on the subject's box, or
zoomed in with "zoomed in"/"close up"); the class images of prior preservation are not.
"""
from __future__ import annotations

import contextlib
import dataclasses
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxvc.config_utils import ConfigError
from jaxvc.diffusion import losses as diffusion_losses
from jaxvc.diffusion.schedule import add_noise, get_target
from jaxvc.methods.base import model_frame_size
from jaxvc.methods.video_base import (VideoDiffusionMethod, build_components, finish_from_config,
                                      options_from_mapping)
from jaxvc.models import lora

SSLM_TARGETS = (r"(down_blocks_\d+|mid_block|up_blocks_\d+)/attentions_\d+/transformer_blocks_\d+/attn[12]/to_[qkv]",)
CROSS_ATTENTION_KV = re.compile(r".*attentions_\d+/transformer_blocks_\d+/attn2/to_[kv]")


@dataclasses.dataclass(frozen=True)
class CustomCrafterOptions:
    rank: int = 4
    alpha: float | None = None  # None: alpha = rank, the LoRA scale lambda is the only multiplier (1 in training)
    lora_targets: tuple[str, ...] = SSLM_TARGETS
    placeholder_token: str = "<new1>"
    initializer_token: str = "toy"  # the class word; must be one token
    train_token: bool = True
    detach_start_token: bool = True  # Custom Diffusion: no gradient through token 0's cross-attention key / value
    loss_type: str = "l2"
    freeze_frames: bool = True
    # Dynamic Weighted Video Sampling
    early_lora_scale: float = 0.4
    late_lora_scale: float = 0.8
    switch_step: int = 5  # steps [0, switch_step) use early_lora_scale
    prediction_type: str = "epsilon"
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    num_train_timesteps: int = 1000
    train_text_encoder: bool = False  # the text encoder's own weights stay frozen (only the new row trains)

    def __post_init__(self):
        if self.loss_type not in ("l1", "l2"):
            raise ConfigError(f"customcrafter: loss_type={self.loss_type!r}: expected 'l1' or 'l2'")
        if self.train_text_encoder:
            raise ConfigError("customcrafter: the text encoder stays frozen; train_token trains the new row")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> "CustomCrafterOptions":
        values = dict(values or {})
        if "lora_targets" in values:
            values["lora_targets"] = tuple(values["lora_targets"])
        return options_from_mapping(cls, values, "customcrafter")


def dwv_lora_scale(options: CustomCrafterOptions):
    """The LoRA scale at DDIM step ``i`` (0 = the noisiest): early_lora_scale before switch_step, then late."""
    def scale(step_index):
        return jnp.where(step_index < options.switch_step, options.early_lora_scale, options.late_lora_scale)
    return scale


@jax.custom_vjp
def _no_grad_first_token(x):
    return x


def _fwd(x):
    return x, None


def _bwd(_, grad):  # (B, L, D): token 0's gradient dropped
    return (grad.at[:, 0].set(0.0),)


_no_grad_first_token.defvjp(_fwd, _bwd)


def detach_start_token(next_fun, args, kwargs, context):
    """Interceptor: cross-attention key / value projections pass token 0 forward unchanged and no gradient back."""
    out = next_fun(*args, **kwargs)
    if context.method_name == "__call__" and CROSS_ATTENTION_KV.fullmatch("/".join(context.module.path)):
        return _no_grad_first_token(out)
    return out


class CustomCrafter(VideoDiffusionMethod):
    """Parameters: ``{"params": {"unet", "text_encoder", "vae", "adapters": {"sslm"}, "new_tokens": (n, D)}}``."""
    name = "customcrafter"
    uses_reference = False

    def __init__(self, *args, tokenizer=None, **kwargs):
        super().__init__(*args, **kwargs)
        opts = self.options
        self.spec = lora.AdapterSpec(include=opts.lora_targets, rank=opts.rank, alpha=opts.alpha,
                                     down_init="gaussian")
        if tokenizer is None:
            raise ValueError("customcrafter: needs the tokenizer (its placeholder token is added to it)")
        ids = tokenizer([opts.initializer_token])[0]
        words = ids[(ids != tokenizer.bos_token_id) & (ids != tokenizer.eos_token_id)]
        if words.size != 1:
            raise ConfigError(f"customcrafter: initializer_token {opts.initializer_token!r} is {words.size} tokens; "
                             "it must be exactly one (a class word such as 'toy', 'dog', 'person')")
        self.initializer_id = int(words[0])
        self.tokenizer = tokenizer.with_added_tokens([opts.placeholder_token])
        self.base_vocab_size = self.text_encoder.config.vocab_size
        if self.tokenizer.added_tokens[opts.placeholder_token] != self.base_vocab_size:
            raise ValueError(f"customcrafter: the tokenizer has {tokenizer.vocab_size} tokens but the text encoder "
                             f"{self.base_vocab_size}: they must match to append the placeholder")

    # ---------------------------------------------------------------- parameters
    def extra_params(self, rng, components):
        sites = self.unet_sites(self.spec)
        hidden = self.text_encoder.config.hidden_size
        if rng is None:
            adapter = jax.eval_shape(lambda: lora.init_adapter(jax.random.key(0), sites, self.spec, boxed=True))
            row = jax.ShapeDtypeStruct((1, hidden), jnp.float32)
        else:
            adapter = lora.init_adapter(rng, sites, self.spec, boxed=True)
            table = nn.unbox(components["text_encoder"])["embeddings"]["token_embedding"]["embedding"]
            row = jnp.asarray(table[self.initializer_id][None], jnp.float32)  # the class word's embedding
        return {"adapters": {"sslm": adapter}, "new_tokens": nn.LogicallyPartitioned(row, (None, "embed"))}

    def trainable(self, path: tuple[str, ...]) -> bool:
        if len(path) >= 2 and path[1] == "new_tokens":
            return self.options.train_token
        return len(path) >= 3 and path[1] == "adapters" and path[2] == "sslm"

    def exported_adapters(self, params):
        """``jaxvc export-lora``: the SSLM at scale 1 (DWV's schedule is a sampling setting)."""
        return {"unet": lora.AppliedAdapter(self.spec, params["params"]["adapters"]["sslm"])}, []

    def learned_tokens(self, params):
        return {self.options.placeholder_token: params["params"]["new_tokens"][0]}

    # ---------------------------------------------------------------- conditioning
    def text_config_with_tokens(self):
        return dataclasses.replace(self.text_encoder.config, vocab_size=self.base_vocab_size + 1)

    def text_params_with_tokens(self, params):
        """The text encoder's parameters with the new rows appended to its (frozen) token table."""
        text = params["params"]["text_encoder"]
        table = text["embeddings"]["token_embedding"]["embedding"]
        rows = params["params"]["new_tokens"]
        wide = jnp.promote_types(table.dtype, rows.dtype)  # a table stored in bf16 (frozen_dtype) must not round
        #                                                    the learnt rows: the table is widened instead
        embeddings = {**text["embeddings"], "token_embedding": {
            "embedding": jnp.concatenate([jax.lax.stop_gradient(table).astype(wide), rows.astype(wide)], axis=0)}}
        return {**text, "embeddings": embeddings}

    def encode_text(self, params, tokens):
        """tokens (B, 77), placeholder ids included -> (B, 77, D); gradient reaches the new rows only."""
        from jaxvc.models.clip_text import CLIPTextEncoder

        return CLIPTextEncoder(self.text_config_with_tokens()).apply(
            {"params": self.text_params_with_tokens(params)}, tokens)["last_hidden_state"]

    def denoise(self, params, noisy_latents, timesteps, text_embeddings, lora_scale=1.0):
        """(B, F, h, w, c) -> (B, F, h, w, c): the UNet with the SSLM at ``lora_scale``."""
        adapter = lora.AppliedAdapter(self.spec, params["params"]["adapters"]["sslm"], lora_scale)
        with contextlib.ExitStack() as stack:
            if self.options.detach_start_token:
                # registered first = outermost in flax's interceptor stack: it sees the LoRA'd key / value, so no
                # gradient reaches the LoRA through token 0 either (tests/test_customcrafter.py checks this)
                stack.enter_context(nn.intercept_methods(detach_start_token))
            stack.enter_context(lora.applied([adapter]))
            return self.unet.apply({"params": params["params"]["unet"]}, noisy_latents, timesteps, text_embeddings)

    # ---------------------------------------------------------------- the loss
    def loss(self, params, batch, rng):
        opts = self.options
        rng_t, rng_noise = jax.random.split(rng)
        video = batch["video"]  # (B, F, H, W, 3)
        if opts.freeze_frames:  # a static video: frame 0's latent repeated
            latents = jnp.repeat(self.encode_pixels(params, video[:, :1]), video.shape[1], axis=1)
        else:
            latents = self.encode_pixels(params, video)
        batch_size = latents.shape[0]
        text = self.encode_text(params, batch["tokens"])
        t = diffusion_losses.sample_timesteps(rng_t, batch_size, opts.num_train_timesteps)
        noise = jax.random.normal(rng_noise, latents.shape, latents.dtype)
        noisy = add_noise(self.schedule, latents, noise, t)
        prediction = self.denoise(params, noisy, t, text)
        target = get_target(self.schedule, latents, noise, t, opts.prediction_type)
        error = prediction - target
        error = jnp.abs(error) if opts.loss_type == "l1" else jnp.square(error)  # (B, F, h, w, c)
        weight = self.latent_mask(batch, latents.shape)  # (B, F, h, w, 1)
        loss = jnp.sum(error * weight) / jnp.maximum(jnp.sum(weight) * error.shape[-1], 1.0)
        # the examples whose caption holds the placeholder: the only ones that train its row (0 in every step: the
        # captions lack it, and the token learns nothing; half the batch with prior preservation)
        with_token = jnp.mean(jnp.any(batch["tokens"] == self.base_vocab_size, axis=1).astype(jnp.float32))
        return loss, {"masked_loss": loss, "mask_fraction": jnp.mean(weight), "placeholder_in_caption": with_token}

    def latent_mask(self, batch, latent_shape):
        """``batch["mask"]`` (B, F, H, W) in {0, 1} average-pooled to the latent grid (B, F, h, w, 1); ones when the
        batch has none (or ``has_mask`` is False for an example)."""
        b, f, h, w, _ = latent_shape
        if "mask" not in batch:
            return jnp.ones((b, f, h, w, 1), jnp.float32)
        mask = batch["mask"].astype(jnp.float32)[:, :1]  # frame 0: the video is static
        height, width = mask.shape[-2:]
        pooled = mask.reshape(b, 1, h, height // h, w, width // w).mean(axis=(3, 5))
        if "has_mask" in batch:
            pooled = jnp.where(batch["has_mask"][:, None, None, None], pooled, 1.0)
        return jnp.repeat(pooled[..., None], f, axis=1)

    # ---------------------------------------------------------------- sampling
    def pipeline(self, params, tokenizer=None, lora_scale=None):
        """Text-to-video sampling with the learnt token and the SSLM at DWV's schedule (or a fixed ``lora_scale``).
        Sample with the paper's settings: 50 DDIM steps, ``guidance_scale=12``, ``eta=1``."""
        tree = params["params"]
        scale = dwv_lora_scale(self.options) if lora_scale is None else float(lora_scale)
        adapter = lora.AppliedAdapter(self.spec, tree["adapters"]["sslm"], scale)
        return self.custom_pipeline(params, tokenizer or self.tokenizer, text_config=self.text_config_with_tokens(),
                                    text_params=self.text_params_with_tokens(params), reference_frame=False,
                                    adapters=[adapter])


def from_config(config) -> CustomCrafter:
    """Build CustomCrafter from ``configs/customcrafter.py``."""
    parts = build_components(config)
    model = config.model
    method = CustomCrafter(parts.unet, parts.text, parts.vae,
                           CustomCrafterOptions.from_mapping(model.options.to_dict()), parts.tokenizer(""),
                           num_frames=model.num_frames, image_size=model_frame_size(model),
                           pretrained=parts.pretrained, pixel_patch=parts.pixel_patch, tokenizer=parts.tokenizer)
    return finish_from_config(method, config, parts)  # keeps method.tokenizer, the one with the placeholder
