"""MicroCinema (Wang et al., arXiv 2311.18829): image & text to video, with the image as the video's *center frame*.

Read top to bottom. Stage 1 is any text-to-image model (for customization: a personalised one, or the user's photo
of the subject); this file is stage 2, which animates that center frame as the text says, on jaxvc's inflated
AnimateDiff UNet (the paper's own 3-D UNet is not released; ``specs/METHODS.md`` (d)).

AppearNet (Appearance Injection Network)
    A ControlNet-style copy of the UNet's encoder (down blocks with their motion modules, and the mid block),
    initialised from the main UNet's weights. Its input is z_t + ZeroConv([z^c, ..., z^c]): the noisy video latents
    plus a zero-initialised 1x1 convolution of the center frame's latent z^c repeated over the F frames.
    Every ResNet and every spatial transformer of AppearNet yields an appearance embedding (B*F, h, w, c).
Injection into the main UNet (encoder, mid block and decoder)
    ResNet j:     h = GN(h) * (1 + gamma) + beta   at its second GroupNorm (``norm2``, before SiLU -> conv2),
                  (gamma, beta) = ZeroConv1x1(embedding of AppearNet's ResNet j)           -- FiLM
    Attention j:  out = Transformer_j(h) + ZeroConv1x1(embedding of AppearNet's transformer j)
    Decoder blocks take the embeddings of the encoder level at the same resolution, mirrored as the skip
    connections are (up block layer j <- down block layer n-1-j, the extra last layer <- layer 0). The paper draws
    a projector and then a 1x1 conv for (gamma, beta); two linear maps in a row are one, so jaxvc has one zero-init
    1x1 conv per site: at initialisation the model is exactly the main UNet.
Appearance noise prior
    training:   eps = eps_n + lambda * [z^c, ..., z^c] (lambda = 0.03); z_t = sqrt(ab) z_0 + sqrt(1 - ab) eps,
                and the model predicts this eps (its target includes the prior)
    inference:  z_T = eps_n + gamma * [z^c, ..., z^c] (gamma = 0.02)
    The prior is a property of the sample's noise, so it stays when the condition is dropped for classifier-free
    guidance (both guidance branches start from the same z_T at inference).

Training updates AppearNet, the zero convs and the motion modules of the main UNet (its spatial layers keep the
text-to-image model); the center frame of a training clip is its middle frame. Classifier-free guidance drops text
and center frame together (-> the empty prompt and a zero latent), which is also the unconditional branch of
sampling (DDIM, guidance 7.5).
"""
from __future__ import annotations

import contextlib
import dataclasses
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import traverse_util

from jaxvc.config_utils import ConfigError
from jaxvc.diffusion import losses as diffusion_losses
from jaxvc.diffusion.schedule import add_noise
from jaxvc.methods.base import model_frame_size
from jaxvc.methods.video_base import (VideoDiffusionMethod, build_components, condition_dropout,
                                      finish_from_config, options_from_mapping)
from jaxvc.models.unet import UNetConfig, is_motion_param
from jaxvc.models.weight_storage import store_weights
from jaxvc.pipeline import ReferenceConditioning

Path = tuple[str, ...]
CENTER_FRAMES = ("middle", "reference")
DECODER_KEYS = re.compile(r"^(up_blocks_\d+|conv_norm_out|conv_out)$")  # what AppearNet, an encoder copy, lacks


@dataclasses.dataclass(frozen=True)
class MicroCinemaOptions:
    noise_prior_train: float = 0.03      # lambda: eps = eps_n + lambda * z^c in training
    noise_prior_inference: float = 0.02  # gamma: z_T = eps_n + gamma * z^c at sampling
    inject_decoder: bool = True          # the paper injects into encoder and decoder
    # the center frame of a training clip: its middle frame (the paper), or the batch's reference image (a
    # customization setting: another view of the subject, e.g. the synthetic world's highlighted reference)
    center_frame: str = "middle"
    train_motion_modules: bool = True    # [G] the main branch's temporal layers train with AppearNet
    train_all_unet: bool = False
    train_text_encoder: bool = False
    drop_both_prob: float = 0.1          # [G] text -> "" and center frame -> zeros together
    drop_text_prob: float = 0.0
    drop_image_prob: float = 0.0
    prediction_type: str = "epsilon"
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    num_train_timesteps: int = 1000

    def __post_init__(self):
        if self.center_frame not in CENTER_FRAMES:
            raise ConfigError(f"microcinema: center_frame={self.center_frame!r} is not one of {CENTER_FRAMES}")
        for name in ("drop_both_prob", "drop_text_prob", "drop_image_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"microcinema: {name}={getattr(self, name)} is not a probability")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> "MicroCinemaOptions":
        return options_from_mapping(cls, values, "microcinema")


# ------------------------------------------------------------------------------------------------------------
def appearance_sites(config: UNetConfig) -> dict[Path, int]:
    """AppearNet's embedding sites -> their channels: every ResNet and spatial transformer of the down blocks and
    the mid block (``("down_blocks_1", "resnets_0")``, ``("mid_block", "attentions_0")``, ...)."""
    sites = {}
    layers = config.per_level("layers_per_block")
    for level, block_type in enumerate(config.down_block_types):
        channels = config.block_out_channels[level]
        for j in range(layers[level]):
            sites[(f"down_blocks_{level}", f"resnets_{j}")] = channels
            if block_type.startswith("CrossAttn"):
                sites[(f"down_blocks_{level}", f"attentions_{j}")] = channels
    for name in ("resnets_0", "attentions_0", "resnets_1"):
        sites[("mid_block", name)] = config.block_out_channels[-1]
    return sites


def injection_plan(config: UNetConfig, inject_decoder: bool = True) -> dict[Path, Path]:
    """Main-UNet site -> the AppearNet site whose embedding it receives. A ResNet site is its ``norm2`` (FiLM), a
    transformer site the transformer itself (added to its output)."""
    sources = appearance_sites(config)
    plan = {}
    for block, layer in sources:  # encoder and mid block: the same place
        plan[(block, layer, "norm2") if layer.startswith("resnets") else (block, layer)] = (block, layer)
    if inject_decoder:
        layers = config.per_level("layers_per_block")
        for k, block_type in enumerate(config.up_block_types):
            level = config.levels - 1 - k
            for j in range(layers[level] + 1):
                source = max(layers[level] - 1 - j, 0)  # mirrored, as the skip connections
                plan[(f"up_blocks_{k}", f"resnets_{j}", "norm2")] = (f"down_blocks_{level}", f"resnets_{source}")
                attention = (f"down_blocks_{level}", f"attentions_{source}")
                if block_type.startswith("CrossAttn") and attention in sources:
                    plan[(f"up_blocks_{k}", f"attentions_{j}")] = attention
    return plan


def _zero_conv(shape_in: int, shape_out: int, rng, boxed_abstract: bool):
    """A zero-initialised 1x1 convolution {"kernel": (in, out), "bias": (out,)}, with logical axis names."""
    leaves = {"kernel": ((shape_in, shape_out), ("conv_in", "conv_out")), "bias": ((shape_out,), ("conv_out",))}
    return {name: nn.LogicallyPartitioned(jax.ShapeDtypeStruct(shape, jnp.float32) if boxed_abstract
                                          else jnp.zeros(shape, jnp.float32), names)
            for name, (shape, names) in leaves.items()}


def _conv1x1(x, conv):
    return jnp.dot(x, conv["kernel"].astype(x.dtype)) + conv["bias"].astype(x.dtype)


class MicroCinema(VideoDiffusionMethod):
    """Parameters: ``{"params": {"unet", "text_encoder", "vae", "appearnet", "injection"}}``; ``injection`` holds
    ``zero_conv`` (the center frame into AppearNet) and one zero conv per main-UNet site (``sites/<path>``)."""
    name = "microcinema"
    uses_reference = True  # the center frame

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.plan = injection_plan(self.unet.config, self.options.inject_decoder)
        self.sources = appearance_sites(self.unet.config)

    # ---------------------------------------------------------------- parameters
    def extra_params(self, rng, components):
        """AppearNet = the main UNet's encoder and mid block (copied, so pretrained weights are its start); the
        zero convs."""
        appearnet = {key: value for key, value in components["unet"].items() if not DECODER_KEYS.match(key)}
        channels = self.latent_channels
        sites = {}
        for site, source in self.plan.items():
            width = self.sources[source]
            sites[site] = _zero_conv(width, 2 * width if site[-1] == "norm2" else width, rng, rng is None)
        injection = {"zero_conv": _zero_conv(channels, channels, rng, rng is None),
                     "sites": traverse_util.unflatten_dict(sites)}
        return {"appearnet": appearnet, "injection": injection}

    def trainable(self, path: tuple[str, ...]) -> bool:
        if len(path) < 2:
            return False
        part = path[1]
        if part in ("appearnet", "injection"):
            return True
        if part == "text_encoder":
            return self.options.train_text_encoder
        if part == "unet":
            return self.options.train_all_unet or (self.options.train_motion_modules and is_motion_param(path))
        return False  # the VAE

    # ---------------------------------------------------------------- the model
    def appearance(self, params, noisy_latents, timesteps, text_embeddings, center_latent):
        """AppearNet on z_t + ZeroConv(z^c) -> {site: embedding (B*F, h, w, c)} for every ``appearance_sites``."""
        tree = params["params"]
        hint = _conv1x1(center_latent.astype(noisy_latents.dtype), tree["injection"]["zero_conv"])  # (B, 1, h, w, C)

        def capture(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if context.method_name == "__call__" and context.module.path in self.sources:
                # sown, not kept in a Python dict: inside nn.remat the call runs in jax.checkpoint's trace, and
                # only a collection carries its value out of it
                context.module.sow("intermediates", "appearance", out)
            return out

        with nn.intercept_methods(capture):
            _, state = self.unet.apply({"params": tree["appearnet"]}, noisy_latents + hint, timesteps,
                                       text_embeddings, encoder_only=True, mutable=["intermediates"])
        sown = traverse_util.flatten_dict(state["intermediates"])
        captured = {path[:-1]: values[-1] for path, values in sown.items() if path[-1] == "appearance"}
        missing = sorted("/".join(s) for s in self.sources if s not in captured)
        if missing:
            raise ValueError(f"microcinema: AppearNet never ran {missing} (does the UNet config match the plan?)")
        return captured

    @contextlib.contextmanager
    def injected(self, params, embeddings):
        """Run the main UNet inside this block to have the appearance embeddings injected (FiLM at every ResNet's
        norm2, added to every transformer's output). Every planned site must be reached."""
        is_conv = lambda _, value: isinstance(value, Mapping) and "kernel" in value
        convs = traverse_util.flatten_dict(params["params"]["injection"]["sites"], is_leaf=is_conv)
        injections = {site: _conv1x1(embeddings[source], convs[site]) for site, source in self.plan.items()}
        reached = set()

        def inject(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            path = context.module.path
            if context.method_name != "__call__" or path not in injections:
                return out
            reached.add(path)
            value = injections[path].astype(out.dtype)
            if path[-1] == "norm2":
                gamma, beta = jnp.split(value, 2, axis=-1)
                return out * (1 + gamma) + beta
            return out + value

        with nn.intercept_methods(inject):
            yield
        missing = sorted("/".join(s) for s in injections if s not in reached)
        if missing:
            raise ValueError(f"microcinema: injection sites never reached by the UNet: {missing}")

    def denoise(self, params, noisy_latents, timesteps, text_embeddings, center_latent):
        """(B, F, h, w, c) + center latent (B, 1, h, w, c) -> the UNet's prediction (B, F, h, w, c)."""
        embeddings = self.appearance(params, noisy_latents, timesteps, text_embeddings, center_latent)
        with self.injected(params, embeddings):
            return self.unet.apply({"params": params["params"]["unet"]}, noisy_latents, timesteps, text_embeddings)

    # ---------------------------------------------------------------- the loss
    def center_latent(self, params, batch, latents):
        """z^c (B, 1, h, w, c): the middle frame of the clip's latents, or the encoded reference image."""
        if self.options.center_frame == "middle":
            middle = latents.shape[1] // 2
            return latents[:, middle:middle + 1]
        return self.encode_pixels(params, batch["reference"][:, None])

    def loss(self, params, batch, rng):
        opts = self.options
        rng_t, rng_noise, rng_drop = jax.random.split(rng, 3)
        latents = self.encode_pixels(params, batch["video"])  # (B, F, h, w, c)
        center = self.center_latent(params, batch, latents)
        batch_size = latents.shape[0]

        drop_text, drop_image = condition_dropout(rng_drop, batch_size, opts.drop_both_prob, opts.drop_text_prob,
                                                  opts.drop_image_prob)
        tokens = jnp.where(drop_text[:, None], self.empty_prompt_tokens, batch["tokens"])
        condition = jnp.where(drop_image[:, None, None, None, None], 0.0, center)
        text = self.encode_text(params, tokens)

        t = diffusion_losses.sample_timesteps(rng_t, batch_size, opts.num_train_timesteps)
        noise = self.training_noise(rng_noise, latents.shape, center)
        noisy = add_noise(self.schedule, latents, noise, t)
        prediction = self.denoise(params, noisy, t, text, condition)
        loss, _ = diffusion_losses.diffusion_loss(self.schedule, prediction, latents, noise, t,
                                                  prediction_type=opts.prediction_type, x_t=noisy)
        return loss, {"diffusion_loss": loss, "drop_image_rate": jnp.mean(drop_image.astype(jnp.float32))}

    def training_noise(self, rng, shape, center_latent):
        """The appearance noise prior: eps = eps_n + lambda * z^c over every frame."""
        return jax.random.normal(rng, shape, jnp.float32) + self.options.noise_prior_train * center_latent

    # ---------------------------------------------------------------- sampling
    def pipeline(self, params, tokenizer):
        """Image & text to video: ``pipe.generate(center_image, prompt)``; the image is the center frame."""
        tree = params["params"]
        conditioning = AppearanceConditioning(self, {"appearnet": tree["appearnet"], "injection": tree["injection"]})
        return self.custom_pipeline(params, tokenizer, reference_frame=False, conditioning=conditioning)


class AppearanceConditioning(ReferenceConditioning):
    """MicroCinema in ``CustomVideoPipeline``: AppearNet + injection around the UNet, and the noise prior."""

    def __init__(self, method: MicroCinema, params):
        self.method, self.params = method, params

    def denoise(self, params, run_unet, x, timesteps, texts, references):
        tree = {"params": params}
        embeddings = self.method.appearance(tree, x, timesteps, texts, references)
        with self.method.injected(tree, embeddings):
            return run_unet()

    def initial_latents(self, noise, reference_latent):
        """z_T = eps_n + gamma * [z^c, ..., z^c]."""
        return noise + self.method.options.noise_prior_inference * reference_latent.astype(noise.dtype)

    def store_weights(self, dtype) -> "AppearanceConditioning":
        """AppearNet (the UNet's encoder, computing in its dtype) keeps its matrices in ``dtype``: the same videos.
        The injection's 1x1 convs stay as trained (the zero conv computes in the latents' float32)."""
        self.params = {**self.params, "appearnet": store_weights(self.params["appearnet"], dtype)}
        return self


def from_config(config) -> MicroCinema:
    """Build MicroCinema from ``configs/microcinema.py``: named sizes, or SD1.5 + AnimateDiff from local files."""
    parts = build_components(config)
    model = config.model
    method = MicroCinema(parts.unet, parts.text, parts.vae, MicroCinemaOptions.from_mapping(model.options.to_dict()),
                         parts.tokenizer(""), num_frames=model.num_frames, image_size=model_frame_size(model),
                         pretrained=parts.pretrained, pixel_patch=parts.pixel_patch)
    return finish_from_config(method, config, parts)
