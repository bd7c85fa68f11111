"""Dynamic degree (specs/METHODS.md, section 0): the fraction of videos that move, judged by RAFT optical flow.

Per video, as VBench's ``dynamic_degree.py`` and Tao Wu's eval code (VideoMaker, CustomCrafter) compute it:

1. keep every ``round(fps / 8)``-th frame (about 8 fps; every frame when the rate is unknown or at most 8);
2. for each pair of consecutive kept frames, RAFT's flow (``raft-things.pth``, 20 refinement steps) on the frames
   edge-padded to multiples of 8 (``InputPadder``, "sintel" split); the pair's score is the mean of the largest 5 %
   of the flow magnitudes (over the padded frame);
3. a pair moves if its score > ``scale * min(H, W) / 256`` (H, W of the unpadded frame). ``scale`` is 6.0 in VBench
   and method (e)'s evaluator, 4.0 in Tao Wu's code: the two papers' figures are not comparable;
4. the video is dynamic if at least ``round(4 * n / 16)`` pairs move, n the number of kept frames (Python's
   round: halves go to even, so 2 frames need 0 moving pairs and any pair makes the video dynamic).

The dynamic degree of a set is the mean over its videos of 1 (dynamic) or 0. Frames need sides of at least 121
pixels: below that the reference's flow is NaN (its coarsest correlation level is one pixel wide), and jaxvc refuses.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

# jax and the model load when a FlowEstimator is made: `jaxvc eval --help` reads the constants below without them
if TYPE_CHECKING:
    from jaxvc.models.raft import RAFTConfig

VBENCH_SCALE = 6.0  # VBench and method (e)'s evaluator
TAO_WU_SCALE = 4.0  # VideoMaker / CustomCrafter's eval code
TARGET_FPS = 8.0


def subsample_to_fps(frames: np.ndarray, fps: float | None, target_fps: float = TARGET_FPS) -> np.ndarray:
    """Every ``max(1, round(fps / target_fps))``-th frame, starting with the first (VBench's ``extract_frame``)."""
    if not fps or fps <= 0:
        return frames
    return frames[::max(1, round(fps / target_fps))]


def top_magnitude_score(flow: np.ndarray) -> float:
    """Mean of the largest 5 % (``int(H * W * 0.05)``) of the flow magnitudes of one (H, W, 2) flow."""
    magnitude = np.sqrt(np.sum(np.square(np.asarray(flow, np.float64)), axis=-1)).ravel()
    count = int(magnitude.size * 0.05)
    if count < 1:
        raise ValueError(f"a flow of {flow.shape[0]}x{flow.shape[1]} pixels has no top 5 % (needs >= 20 pixels)")
    return float(np.mean(-np.sort(-magnitude)[:count]))


def moving_threshold(height: int, width: int, scale: float = VBENCH_SCALE) -> float:
    return scale * min(height, width) / 256.0


def pairs_needed(frame_count: int) -> int:
    return round(4 * frame_count / 16)


def is_dynamic(pair_scores, threshold: float, needed: int) -> bool:
    """VBench's ``check_move``: True as soon as ``needed`` pairs score above ``threshold`` (never for no pairs)."""
    moving = 0
    for score in pair_scores:
        moving += score > threshold
        if moving >= needed:
            return True
    return False


@dataclass
class FlowEstimator:
    """RAFT with its parameters and one jitted ``(frames1, frames2) -> flow`` per padded frame size; pairs go in
    batches of ``batch_size`` (the last padded, so a video length does not cause a new compile)."""
    config: RAFTConfig
    params: dict
    batch_size: int = 8
    _flow: object = field(init=False, repr=False)

    def __post_init__(self):
        import jax

        from jaxvc.models.raft import RAFT

        model = RAFT(self.config)
        self.params = jax.device_put(self.params)  # once, not with every call
        self._flow = jax.jit(lambda params, first, second: model.apply(params, first, second))

    @classmethod
    def from_file(cls, path: str | os.PathLike, batch_size: int = 8, allow_pickle: bool = False,
                  iters: int = 20) -> "FlowEstimator":
        from jaxvc.convert.raft import load_raft

        config, params = load_raft(path, allow_pickle=allow_pickle, iters=iters)
        return cls(config, params, batch_size)

    def __call__(self, first: np.ndarray, second: np.ndarray) -> np.ndarray:
        """Flows from ``first`` to ``second`` (N, H, W, 3) uint8 -> (N, H', W', 2), H' and W' padded to
        multiples of 8 as RAFT's ``InputPadder`` does (the flow is not cropped back, as in VBench)."""
        import jax.numpy as jnp

        from jaxvc.eval.feature_metrics import in_fixed_batches
        from jaxvc.models.raft import pad_to_multiple_of_8

        first, _ = pad_to_multiple_of_8(jnp.asarray(first, jnp.float32))
        second, _ = pad_to_multiple_of_8(jnp.asarray(second, jnp.float32))
        return in_fixed_batches(lambda a, b: self._flow(self.params, a, b), (first, second), self.batch_size)


class DynamicDegree:
    """Scores videos: ``(frames (F, H, W, 3) uint8, fps) -> {"dynamic_degree": 0.0 or 1.0, ...}``."""

    def __init__(self, flow: FlowEstimator, scale: float = VBENCH_SCALE, target_fps: float = TARGET_FPS):
        if scale <= 0:
            raise ValueError(f"the dynamic-degree threshold scale must be > 0, got {scale}")
        self.flow, self.scale, self.target_fps = flow, scale, target_fps

    def score(self, frames: np.ndarray, fps: float | None = None) -> dict:
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"a video must be (frames, H, W, 3), got shape {frames.shape}")
        kept = subsample_to_fps(frames, fps, self.target_fps)
        height, width = kept.shape[1:3]
        if min(height, width) <= 120:
            raise ValueError(f"dynamic degree needs frames of at least 121 x 121 pixels, got {height} x {width}: "
                             "below that (128 after padding) RAFT's coarsest correlation level is one pixel wide, "
                             "where the reference's flow is NaN")
        threshold, needed = moving_threshold(height, width, self.scale), pairs_needed(len(kept))
        scores = []
        if len(kept) > 1:
            flows = self.flow(kept[:-1], kept[1:])
            scores = [top_magnitude_score(flow) for flow in flows]
        return {"dynamic_degree": float(is_dynamic(scores, threshold, needed)), "flow_scores": scores,
                "moving_pairs": int(sum(s > threshold for s in scores)), "pairs_needed": needed,
                "threshold": threshold, "frames_used": int(len(kept))}
