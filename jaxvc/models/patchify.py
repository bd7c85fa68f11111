"""A parameter-free, exactly invertible "autoencoder" for pixel-space diffusion: space-to-depth by ``patch``.

(..., H, W, C) -> (..., H/p, W/p, p*p*C): every p x p pixel block becomes one position with p*p*C channels (the
trick of Hoogeboom et al.'s *simple diffusion* for high resolutions). The UNet then runs at 1/p the resolution with
no learned encoder; decoding is the exact inverse. ``patch=1`` is the identity.
"""
from __future__ import annotations

import jax.numpy as jnp


def to_patches(images, patch: int):
    """(..., H, W, C) -> (..., H/p, W/p, p*p*C), channel order (row in block, column in block, C)."""
    if patch == 1:
        return images
    *lead, height, width, channels = images.shape
    if height % patch or width % patch:
        raise ValueError(f"to_patches: image size {height}x{width} is not divisible by the patch size {patch}")
    x = images.reshape(*lead, height // patch, patch, width // patch, patch, channels)
    x = jnp.moveaxis(x, -4, -3)  # (..., H/p, W/p, p_row, p_col, C)
    return x.reshape(*lead, height // patch, width // patch, patch * patch * channels)


def from_patches(latents, patch: int):
    """Inverse of ``to_patches``: (..., h, w, p*p*C) -> (..., h*p, w*p, C)."""
    if patch == 1:
        return latents
    *lead, height, width, depth = latents.shape
    if depth % (patch * patch):
        raise ValueError(f"from_patches: {depth} channels are not a multiple of patch^2 = {patch * patch}")
    channels = depth // (patch * patch)
    x = latents.reshape(*lead, height, width, patch, patch, channels)
    x = jnp.moveaxis(x, -3, -4)  # (..., h, p_row, w, p_col, C)
    return x.reshape(*lead, height * patch, width * patch, channels)
