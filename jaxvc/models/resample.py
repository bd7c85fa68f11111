"""Resampling that reproduces the reference code's kernels, for the metric networks whose scores are compared with
it: torch's bilinear resizing (``F.interpolate(mode="bilinear", align_corners=False)``, no antialiasing), OpenCV's
bicubic resizing (``cv2.resize(..., INTER_CUBIC)`` of float frames) and edge padding to a multiple (the
``InputPadder`` of RAFT and AMT). Channels last."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) float32 weights of torch's 1-D bilinear resize with ``align_corners=False``: source
    coordinate (i + 0.5) * in / out - 0.5 clamped at 0, floor index i0, neighbour min(i0 + 1, in - 1), weights
    1 - frac and frac (``area_pixel_compute_source_index``).

    The rounding is torch's CPU kernel's, bit for bit (checked against ``F.interpolate`` for every input size 1..699
    to 224): the scale is float32(in / out), and scale * (i + 0.5) - 0.5 is rounded to float32 once (a fused
    multiply-add), not after each operation; per-operation float32 rounding moves some weights by an ulp of the
    coordinate (1.5e-5 at 256), up to 4e-3 grey levels. With ``scale_factor=`` instead of a size, torch uses
    1 / scale_factor as the scale: the same number whenever out = in * scale_factor exactly (powers of two)."""
    scale = np.float64(np.float32(in_size) / np.float32(out_size))
    # exact in float64 (a 24-bit scale times a half-integer), then one rounding to float32
    source = (scale * (np.arange(out_size) + 0.5) - 0.5).astype(np.float32)
    source = np.maximum(source, np.float32(0))
    lower = np.minimum(np.floor(source).astype(np.int64), in_size - 1)
    upper = lower + (lower < in_size - 1)
    frac = np.clip(source - lower.astype(np.float32), 0, 1).astype(np.float32)
    weights = np.zeros((out_size, in_size), np.float32)
    rows = np.arange(out_size)
    np.add.at(weights, (rows, lower), 1 - frac)
    np.add.at(weights, (rows, upper), frac)  # upper == lower at the last pixel: the weights add up to 1 there
    return weights


def cubic_matrix(in_size: int, out_size: int, a: float = -0.75) -> np.ndarray:
    """(out_size, in_size) float32 weights of OpenCV's 1-D ``INTER_CUBIC`` resize: source coordinate
    (i + 0.5) * in / out - 0.5, floor index s, the four taps s - 1 .. s + 2 clamped to the edge (replicated border),
    Keys' cubic with a = -0.75 on the fraction, the last weight 1 minus the others (``interpolateCubic``). No
    antialiasing when shrinking. Float frames match ``cv2.resize`` to float32 rounding (5e-5 of 255); OpenCV's uint8
    path (fixed-point weights, rounded output) is not this."""
    # OpenCV keeps the source coordinate in double and rounds only its fractional part to float (checked with
    # impulse images: t = 0.1 exactly where a float coordinate 516.1 would give 0.0999756)
    coordinate = (np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5
    start = np.floor(coordinate).astype(np.int64)
    t = (coordinate - start).astype(np.float32)
    w0 = ((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a
    w1 = ((a + 2) * t - (a + 3)) * t * t + 1
    w2 = ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1
    taps = np.stack([w0, w1, w2, 1 - w0 - w1 - w2], axis=1)  # (out, 4)
    weights = np.zeros((out_size, in_size), np.float32)
    rows = np.repeat(np.arange(out_size), 4)
    columns = np.clip(start[:, None] + np.arange(-1, 3)[None], 0, in_size - 1).ravel()
    np.add.at(weights, (rows, columns), taps.ravel())  # clamped taps at the edges add onto the edge pixel
    return weights


def resize_bilinear(x, size: tuple[int, int]):
    """(..., H, W, C) -> (..., size[0], size[1], C): separable, rows then columns, at full float32 precision (no
    bf16 passes on accelerators)."""
    return resize_separable(x, bilinear_matrix(x.shape[-3], size[0]), bilinear_matrix(x.shape[-2], size[1]))


def resize_cubic(x, size: tuple[int, int]):
    """``cv2.resize(frame, (size[1], size[0]), interpolation=cv2.INTER_CUBIC)`` of float frames (..., H, W, C)."""
    return resize_separable(x, cubic_matrix(x.shape[-3], size[0]), cubic_matrix(x.shape[-2], size[1]))


def resize_separable(x, rows: np.ndarray, cols: np.ndarray):
    """(..., H, W, C) -> (..., R, S, C) with row weights (R, H) and column weights (S, W), at full precision."""
    rows, cols = jnp.asarray(rows), jnp.asarray(cols)
    highest = jax.lax.Precision.HIGHEST
    x = jnp.einsum("oh,...hwc->...owc", rows, x, precision=highest)
    return jnp.einsum("pw,...owc->...opc", cols, x, precision=highest)


def rescale_bilinear(x, factor: float):
    """``F.interpolate(x, scale_factor=factor, mode="bilinear")`` for (N, H, W, C): sides floor(side * factor)."""
    height, width = x.shape[-3:-1]
    return resize_bilinear(x, (int(height * factor), int(width * factor)))


def pad_to_multiple(images, multiple: int, bottom_only: bool = False):
    """RAFT's and AMT's ``InputPadder``: edge-replicate (N, H, W, C) images up to multiples of ``multiple``, the
    extra rows split evenly top/bottom (the odd one at the bottom) and columns left/right; ``bottom_only``: all
    rows at the bottom (RAFT's "kitti" mode). Returns (padded, (top, bottom, left, right))."""
    height, width = images.shape[1:3]
    pad_h, pad_w = (-height) % multiple, (-width) % multiple
    top = 0 if bottom_only else pad_h // 2
    pads = (top, pad_h - top, pad_w // 2, pad_w - pad_w // 2)
    padded = jnp.pad(images, ((0, 0), pads[:2], pads[2:], (0, 0)), mode="edge")
    return padded, pads


def unpad(images, pads: tuple[int, int, int, int]):
    """Crop what ``pad_to_multiple`` added: (N, H', W', C) -> (N, H, W, C)."""
    top, bottom, left, right = pads
    height, width = images.shape[1:3]
    return images[:, top:height - bottom, left:width - right]
