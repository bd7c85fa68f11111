"""Motion smoothness (specs/METHODS.md, section 0; method (e)'s VBench column): how well the odd frames of a video
are predicted by interpolating between their even neighbours, with AMT-S (``jaxvc.models.amt``, ``amt-s.pth``).

Per video, as VBench's ``motion_smoothness.py`` computes it (every frame; no frame-rate subsampling):

1. the even frames 0, 2, 4, ... are the inputs (uint8 / 255), edge-padded to multiples of 16 (``InputPadder``);
2. for each consecutive pair of inputs AMT-S synthesises the middle frame (t = 1/2); it is cropped back and turned
   into uint8 as ``tensor2img`` does: ``(x * 255).clip(0, 255)`` truncated, not rounded;
3. each synthesised frame is compared with the real odd frame between its inputs: the mean absolute difference over
   pixels and channels (``cv2.absdiff`` then ``np.mean``), averaged over the pairs;
4. the score is (255 - that mean) / 255: 1 for a perfectly interpolable video.

VBench scores its mean over videos. Frames need sides of at least 113 pixels: padded, they must reach 128, else the
coarsest correlation level of AMT's 1/8 features is one pixel wide and the reference's frames are NaN (the same
limit as RAFT's, for the same reason). VBench shrinks frames only when a GPU's memory is short (its ``scale``); jaxvc,
like VBench on a CPU or a large GPU, never does.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # jax and the model load when an Interpolator is made
    from jaxvc.models.amt import AMTConfig

MIN_SIDE = 113  # pads to 128 (16 x 8): every correlation level at least 2 wide


def split_frames(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(inputs: the even frames, targets: the odd frames that lie between two inputs) of a (F, H, W, 3) video."""
    inputs = frames[0::2]
    return inputs, frames[1::2][:max(len(inputs) - 1, 0)]


def to_uint8(frames) -> np.ndarray:
    """VBench's ``tensor2img``: (x * 255) clipped to [0, 255], truncated to uint8."""
    return np.clip(np.asarray(frames, np.float32) * np.float32(255.0), 0, 255).astype(np.uint8)


def mean_absolute_difference(first: np.ndarray, second: np.ndarray) -> float:
    """``np.mean(cv2.absdiff(first, second))`` for uint8 frames."""
    return float(np.mean(np.abs(first.astype(np.int16) - second.astype(np.int16))))


@dataclass
class Interpolator:
    """AMT-S with its parameters and one jitted ``(frames0, frames1) -> middle frames`` per frame size (padding and
    cropping inside); pairs go in batches of ``batch_size`` (the last padded, so a video length is no new compile)."""
    config: AMTConfig
    params: dict
    batch_size: int = 8
    _middle: object = field(init=False, repr=False)

    def __post_init__(self):
        import jax
        import jax.numpy as jnp

        from jaxvc.models.amt import AMT, MULTIPLE
        from jaxvc.models.resample import pad_to_multiple, unpad

        model = AMT(self.config)
        self.params = jax.device_put(self.params)  # once, not with every call

        def middle(params, first, second):  # uint8 (N, H, W, 3) twice -> float (N, H, W, 3) in [0, 1]
            first, pads = pad_to_multiple(jnp.asarray(first, jnp.float32) / 255.0, MULTIPLE)
            second, _ = pad_to_multiple(jnp.asarray(second, jnp.float32) / 255.0, MULTIPLE)
            return unpad(model.apply(params, first, second), pads)

        self._middle = jax.jit(middle)

    @classmethod
    def from_file(cls, path: str | os.PathLike, batch_size: int = 8, allow_pickle: bool = False) -> "Interpolator":
        from jaxvc.convert.amt import load_amt

        config, params = load_amt(path, allow_pickle=allow_pickle)
        return cls(config, params, batch_size)

    def __call__(self, first: np.ndarray, second: np.ndarray) -> np.ndarray:
        """The frames halfway between ``first`` and ``second`` (N, H, W, 3) uint8 -> (N, H, W, 3) float32 in
        [0, 1] (before VBench's truncation to uint8)."""
        from jaxvc.eval.feature_metrics import in_fixed_batches

        return in_fixed_batches(lambda a, b: self._middle(self.params, a, b), (first, second), self.batch_size)


class MotionSmoothness:
    """Scores videos: ``frames (F, H, W, 3) uint8 -> {"motion_smoothness": score in [0, 1], ...}``."""

    def __init__(self, interpolator: Interpolator):
        self.interpolator = interpolator

    def score(self, frames: np.ndarray, fps: float | None = None) -> dict:
        """``fps`` is accepted for symmetry with the other motion metric and unused: VBench takes every frame."""
        del fps
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"a video must be uint8 (frames, H, W, 3), got {frames.dtype} {frames.shape}")
        inputs, targets = split_frames(frames)
        if len(targets) < 1:
            raise ValueError(f"motion smoothness needs at least 3 frames (two to interpolate between, one to "
                             f"compare with), got {len(frames)}")
        height, width = frames.shape[1:3]
        if min(height, width) < MIN_SIDE:
            raise ValueError(f"motion smoothness needs frames of at least {MIN_SIDE} x {MIN_SIDE} pixels, got "
                             f"{height} x {width}: padded to a multiple of 16 they must reach 128, else AMT's "
                             "coarsest correlation level is one pixel wide, where the reference's frames are NaN")
        middles = to_uint8(self.interpolator(inputs[:-1], inputs[1:]))
        errors = [mean_absolute_difference(m, t) for m, t in zip(middles, targets)]
        return {"motion_smoothness": (255.0 - float(np.mean(errors))) / 255.0, "interpolation_errors": errors,
                "frames_used": int(len(frames))}
