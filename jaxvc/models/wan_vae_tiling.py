"""Spatial tiling for the Wan video VAE (diffusers' ``AutoencoderKLWan.enable_tiling``): large frames coded in
overlapping tiles, each streamed through time on its own, the overlaps blended linearly.

Memory then scales with the tile, not the frame: a 720 x 1280 decode holds 256 x 256 tiles. The tile geometry is
diffusers' (defaults 256 px tiles every 192 px), so results equal ``enable_tiling()``'s:

  encode  the (patchified) video is cut every ``stride`` px into ``tile`` px tiles (Wan 2.2: patchified pixels,
          i.e. 2x the size in the frame); the latents' overlap (tile - stride) / f' is blended, then each tile keeps
          its first stride / f' latents (f' = f / patch);
  decode  the latents are cut every stride / f latents into tile / f latent tiles; the decoded overlap
          (tile - stride) / patch px is blended (in patchified pixels), each tile keeps stride / patch px.

A tile blends with the already blended tile above it, then with the one to its left (diffusers' order, which
matters where both overlap). Each tile is one call of ``encode_wan``/``decode_wan``'s streaming runner: traced into
the caller's jit (the whole grid in one program) or, with ``jit_tiles=True``, one compiled program per tile shape.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxvc.models.wan_vae import (AutoencoderKLWan, _run_chunks, check_latents, check_video, finish_video,
                                  patchify, posterior)


def blend(previous, tile, extent: int, axis: int):
    """``tile`` whose first ``extent`` entries along ``axis`` fade in from ``previous``'s last ones (weights y /
    extent); extent is capped by both sizes, as diffusers' ``blend_v``/``blend_h``."""
    extent = min(previous.shape[axis], tile.shape[axis], extent)
    if extent <= 0:
        return tile
    shape = [1] * tile.ndim
    shape[axis] = extent
    weight = (jnp.arange(extent, dtype=tile.dtype) / extent).reshape(shape)
    tail = jax.lax.slice_in_dim(previous, previous.shape[axis] - extent, previous.shape[axis], axis=axis)
    head = jax.lax.slice_in_dim(tile, 0, extent, axis=axis)
    rest = jax.lax.slice_in_dim(tile, extent, tile.shape[axis], axis=axis)
    return jnp.concatenate([tail * (1 - weight) + head * weight, rest], axis=axis)


def _tiled(run, x, tile: int, stride: int, overlap: int, keep: int, out_height: int, out_width: int):
    """run over (B, T, H, W, C) x in tiles of ``tile`` every ``stride`` (input units); outputs blended over
    ``overlap`` and cut to ``keep`` (output units), stitched and cropped to the output size."""
    rows = []
    for top in range(0, x.shape[2], stride):
        row = []
        for left in range(0, x.shape[3], stride):
            out = run(x[:, :, top:top + tile, left:left + tile])
            if rows:
                out = blend(rows[-1][len(row)], out, overlap, axis=2)
            if row:
                out = blend(row[-1], out, overlap, axis=3)
            row.append(out)
        rows.append(row)
    stitched = jnp.concatenate([jnp.concatenate([t[:, :, :keep, :keep] for t in row], axis=3) for row in rows],
                               axis=2)
    return stitched[:, :, :out_height, :out_width]


def _runner(vae, params, method, chunk, step, jit_tiles: bool):
    if not jit_tiles:
        return lambda x: _run_chunks(vae, params, x, method, chunk, step)
    compiled = jax.jit(lambda p, x: _run_chunks(vae, p, x, method, chunk, step))  # one program per tile shape
    return lambda x: compiled(params, x)


def _check_tiles(cfg, tile: int, stride: int) -> None:
    if not 0 < stride <= tile or tile % cfg.downsample_factor or stride % cfg.downsample_factor:
        raise ValueError(f"Wan VAE tiling: tile={tile} and stride={stride} must be multiples of the downsampling "
                         f"factor {cfg.downsample_factor} with 0 < stride <= tile")


def encode_wan_tiled(vae: AutoencoderKLWan, params, video, *, tile: int = 256, stride: int = 192,
                     chunk_frames: int | None = None, jit_tiles: bool = False):
    """``encode_wan`` in spatial tiles: video (B, 1 + 4k, H, W, 3) -> (mean, logvar) (B, 1 + k, H/f, W/f, z)."""
    cfg = vae.config
    check_video(cfg, video)
    _check_tiles(cfg, tile, stride)
    factor = cfg.downsample_factor // (cfg.patch_size or 1)  # latent cells per patchified pixel
    patched = patchify(video, cfg.patch_size)
    run = _runner(vae, params, AutoencoderKLWan.encode_chunk, chunk_frames, cfg.temporal_factor, jit_tiles)
    moments = _tiled(run, patched, tile, stride, (tile - stride) // factor, stride // factor,
                     patched.shape[2] // factor, patched.shape[3] // factor)
    return posterior(moments)


def decode_wan_tiled(vae: AutoencoderKLWan, params, latents, *, tile: int = 256, stride: int = 192,
                     chunk_frames: int | None = None, jit_tiles: bool = False):
    """``decode_wan`` in spatial tiles: latents (B, 1 + k, h, w, z) -> video (B, 1 + 4k, h*f, w*f, 3) in [-1, 1]."""
    cfg = vae.config
    check_latents(cfg, latents)
    _check_tiles(cfg, tile, stride)
    factor, patch = cfg.downsample_factor, cfg.patch_size or 1
    run = _runner(vae, params, AutoencoderKLWan.decode_chunk, chunk_frames, 1, jit_tiles)
    decoded = _tiled(run, latents, tile // factor, stride // factor, (tile - stride) // patch, stride // patch,
                     latents.shape[2] * factor // patch, latents.shape[3] * factor // patch)
    return finish_video(decoded, cfg)
