"""``WanImageToVideoPipeline``: an image (the first frame) + a prompt -> a video with a diffusers
``WanImageToVideoPipeline`` folder, as diffusers computes it, in JAX.

    pipe = CustomVideoPipeline.from_pretrained("/models/Wan2.1-I2V-14B-480P-Diffusers", dtype="bfloat16")
    frames = pipe("first_frame.png", "the cat turns its head", num_frames=81, height=480, width=832)

Three kinds of folder, told apart by their parts (the denoising loop is ``WanTextToVideoPipeline``'s):

* Wan 2.1 I2V / FLF2V (``image_encoder/``): the VAE latents of [image, black frames] and a 4-channel first-frame
  mask are concatenated to the noisy latents (DiT input 16 + 4 + 16 channels); the CLIP ViT-H tokens of the image
  (its penultimate layer) are cross-attended beside the text.
* Wan 2.2 I2V A14B (two experts, no ``image_encoder/``): the concatenated latents and mask only.
* Wan 2.2 TI2V-5B (``expand_timesteps``): the image's latent replaces the first latent frame, whose tokens get
  timestep 0 (DiT input 48 channels).

With ``last_image`` (FLF2V) the condition video ends on that frame, its mask marks it, and the CLIP tokens of both
images are concatenated (the DiT's ``pos_embed`` spans them). The image is fitted to (height, width) keeping its
aspect ratio (``load_reference_image``: cover and centre-crop; diffusers stretches it), and the CLIP tokens are made
from that same fitted image (diffusers gives CLIP the image as passed) by the folder's ``image_processor`` (PIL, as
transformers' ``CLIPImageProcessor``). For an image already of the video's size both are diffusers' inputs exactly
(``tests/test_wan_i2v_pipeline.py``).
``jaxvc generate --model FOLDER --reference IMAGE [--last-frame IMAGE]`` runs it.
"""
from __future__ import annotations

import functools
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jaxvc import compile_options, media
from jaxvc.pipeline import load_reference_image
from jaxvc.wan_pipeline import WanTextToVideoPipeline


def first_frame_mask(num_frames: int, temporal_factor: int, *, last_frame: bool = False) -> np.ndarray:
    """(F', temporal_factor) float32: which pixel frames of each latent frame are given, as diffusers builds it.

    The first pixel frame (and with ``last_frame`` the last one) is given. The first is repeated ``temporal_factor``
    times so the (F + factor - 1) frames fold into F' = 1 + (F - 1) / factor latent frames of ``factor`` channels."""
    given = np.zeros(num_frames, np.float32)
    given[0] = 1.0
    if last_frame:
        given[-1] = 1.0
    given = np.concatenate([np.repeat(given[:1], temporal_factor), given[1:]])  # (F + factor - 1,)
    return given.reshape(-1, temporal_factor)


class WanImageToVideoPipeline(WanTextToVideoPipeline):
    """``WanTextToVideoPipeline`` plus the image conditioning; ``image_encoder`` (CLIP vision tower) and
    ``image_preprocessor`` only for DiTs with image tokens (Wan 2.1 I2V / FLF2V)."""
    takes_reference = True  # the first frame; ``jaxvc generate`` requires --reference

    @property
    def takes_last_frame(self) -> bool:
        """FLF2V-style last frames: every folder but TI2V's (whose first latent frame alone is replaced)."""
        return not self.expand_timesteps

    def __init__(self, *args, image_encoder=None, image_preprocessor=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.image_encoder, self.image_preprocessor = image_encoder, image_preprocessor
        takes_tokens = self.transformer.config.image_dim is not None
        if takes_tokens != (image_encoder is not None):
            raise ValueError(f"Wan image-to-video: the DiT's image_dim is {self.transformer.config.image_dim} but "
                             f"the pipeline {'has no' if image_encoder is None else 'has an'} image encoder")
        # the mask has one channel per pixel frame folded into a latent frame (the VAE's temporal factor, 4)
        channels = self.vae.latent_channels * (1 if self.expand_timesteps else 2) + (
            0 if self.expand_timesteps else self.vae.config.temporal_factor)
        if self.transformer.config.in_channels != channels:
            raise ValueError(f"Wan image-to-video: the DiT takes {self.transformer.config.in_channels} input "
                             f"channels; with this VAE ({self.vae.latent_channels} latent channels) and "
                             f"expand_timesteps={self.expand_timesteps} it must take {channels}")

    @classmethod
    def _load_parts(cls, root: Path, **kwargs) -> dict:
        from jaxvc.convert.vision import load_vision_tower
        from jaxvc.eval.preprocess import ImagePreprocessor
        from jaxvc.models.vision_transformer import VisionTransformer

        parts = super()._load_parts(root, **kwargs)
        if parts["transformer"].config.image_dim is None:
            return parts
        if not (root / "image_encoder").is_dir():
            raise FileNotFoundError(f"{root}: no image_encoder/ folder, but the DiT takes CLIP image tokens "
                                    f"(image_dim={parts['transformer'].config.image_dim})")
        # Wan's encoder is a CLIPVisionModel (no visual_projection): the tokens are its penultimate hidden states.
        config, params = load_vision_tower(root / "image_encoder", allow_pickle=kwargs["allow_pickle"],
                                           projection_dim=None)
        parts["params"]["image_encoder"] = params["params"]
        folder = root / "image_processor" if (root / "image_processor").is_dir() else root / "image_encoder"
        return dict(parts, image_encoder=VisionTransformer(config),
                    image_preprocessor=ImagePreprocessor.for_model(folder, "clip", config.image_size))

    def abstract_params(self) -> dict:
        from jaxvc.models.vision_transformer import abstract_vision_params

        groups = super().abstract_params()
        if self.image_encoder is not None:
            groups["image_encoder"] = abstract_vision_params(self.image_encoder.config)["params"]
        return groups

    @functools.cached_property
    def _encode(self) -> dict:
        jit = compile_options.jit

        def image_tokens(params, pixels):  # (N, S, S, 3) -> (N, 1 + (S/p)^2, D): the penultimate layer's states
            return self.image_encoder.apply({"params": params}, pixels, output_hidden_states=True)["hidden_states"][-2]

        return {"image": jit(image_tokens),
                "video": jit(lambda params, video: self.vae.encode({"params": params}, video))}

    def _reference_pixels(self, image, height: int, width: int):
        return None if image is None else jnp.asarray(load_reference_image(image, height, width))[None]

    # ---------------------------------------------------------------- conditioning hooks
    def _conditioning(self, reference, last_image, num_frames: int, height: int, width: int) -> dict:
        """reference (and last_image): (1, height, width, 3) in [-1, 1] -> the loop's condition arrays."""
        if reference is None:
            raise ValueError("a Wan image-to-video pipeline generates from a first frame: pass a reference image")
        images = [reference] if last_image is None else [reference, last_image]
        for name, image in zip(("reference", "last_image"), images):
            if tuple(image.shape) != (1, height, width, 3):
                raise ValueError(f"{name} must be (1, {height}, {width}, 3) in [-1, 1], got {tuple(image.shape)}")
        condition = {}
        if self.image_encoder is not None:  # CLIP tokens of each image, side by side: (1, n_images * T, D)
            pixels = self.image_preprocessor(media.to_uint8(np.concatenate([np.asarray(i) for i in images])))
            tokens = self._encode["image"](self.params["image_encoder"], jnp.asarray(pixels))
            condition["image"] = tokens.reshape(1, -1, tokens.shape[-1])
        factor = self.vae.config.temporal_factor  # pixel frames per latent frame (4)
        if self.expand_timesteps:
            if last_image is not None:
                raise ValueError("a Wan 2.2 TI2V folder (expand_timesteps) conditions on the first frame only: "
                                 "no last_image")
            condition["first_latent"] = self._encode["video"](self.params["vae"], reference[:, None])  # (1,1,h,w,C)
            return condition
        black = jnp.zeros((1, num_frames - len(images), height, width, 3), jnp.float32)
        video = jnp.concatenate([reference[:, None], black] + ([] if last_image is None else [last_image[:, None]]),
                                axis=1)  # (1, F, H, W, 3): the given frames, black between
        latents = self._encode["video"](self.params["vae"], video)  # (1, F', h, w, C), the posterior's mode
        mask = first_frame_mask(num_frames, factor, last_frame=last_image is not None)  # (F', 4)
        mask = np.broadcast_to(mask[None, :, None, None, :], (*latents.shape[:4], factor))
        condition["concat"] = jnp.concatenate([jnp.asarray(mask), latents], axis=-1)  # (1, F', h, w, 4 + C)
        return condition

    def _transformer_inputs(self, x_stacked, t, condition: dict):
        n = x_stacked.shape[0]
        image = condition.get("image")
        if image is not None:
            image = jnp.broadcast_to(image, (n, *image.shape[1:]))
        if "concat" in condition:  # noisy latents, then mask and condition latents: (n, F', h, w, C + 4 + C)
            given = jnp.broadcast_to(condition["concat"], (n, *condition["concat"].shape[1:]))
            return jnp.concatenate([x_stacked, given.astype(x_stacked.dtype)], axis=-1), jnp.full((n,), t), image
        # expand_timesteps: the first latent frame is the image's (timestep 0 for its tokens), the rest are noisy
        latents = self._finish(x_stacked, condition)
        p_t, p_h, p_w = self.transformer.config.patch_size
        frames, height, width = x_stacked.shape[1] // p_t, x_stacked.shape[2] // p_h, x_stacked.shape[3] // p_w
        noisy = (jnp.arange(frames) > 0).astype(jnp.float32)  # (f,) per latent frame
        per_token = jnp.broadcast_to(noisy[:, None, None] * t, (frames, height, width)).reshape(1, -1)
        return latents, jnp.broadcast_to(per_token, (n, per_token.shape[1])), image

    def _finish(self, latents, condition: dict):
        if "first_latent" not in condition:
            return latents
        first = jnp.broadcast_to(condition["first_latent"], (latents.shape[0], 1, *latents.shape[2:]))
        return jnp.concatenate([first.astype(latents.dtype), latents[:, 1:]], axis=1)
