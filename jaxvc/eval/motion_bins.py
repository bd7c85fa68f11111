"""Method (e)'s motion-binned "temporal FVD" split (specs/METHODS.md, method (e), Evaluation): real clips sorted into
small / medium / large foreground motion by RAFT optical flow inside and outside a foreground mask.

Followed from the paper (method (e), the disentangled identity/motion S2V paper):

- per held-out real clip, a foreground mask of its **first frame** (the paper segments it with Grounded-SAM2; here
  the user supplies the masks, one file per clip) and **RAFT** optical flow at the first frame;
- a clip whose mean background flow magnitude exceeds **10 px** is dropped (camera motion);
- the others are binned by the mean foreground flow magnitude: **small <= 25 px, medium 25-50 px, large > 50 px**;
- **300 clips per bin**; videos are then generated from each clip's first frame and FVD is computed per bin
  (``jaxvc eval --i3d-model ... --real-videos BIN.jsonl``).

Project guesses, marked [G]:

- [G] the flow is measured at a fixed working size, by default the paper's generation size 480 x 720 (H x W): the
  thresholds are in pixels, so they only mean something at a known size. Frames are stretched to it (no crop) with
  torch's bilinear resize without antialiasing (``jaxvc.models.resample.resize_bilinear``) and rounded to uint8;
- [G] "first-frame flow" is the flow from decoded frame 0 to decoded frame K (K = 1 by default), counted in the
  file's own frames (no frame-rate normalisation);
- [G] magnitudes are per-pixel Euclidean norms of RAFT's (dx, dy) (``raft-things.pth``, 20 refinement steps, frames
  edge-padded to multiples of 8 and the flow cropped back), averaged over the mask's pixels (foreground) and the
  rest (background), the mask resized nearest-neighbour to the working size;
- [G] bin edges are inclusive at the top (25 is small, 50 is medium) and a background of exactly 10 px is kept;
- [G] where a bin holds more than 300 clips, which 300 is not said: a seeded random choice.

Mask files: PNG/JPEG (a pixel > 127 in grey is foreground, as ``jaxvc.data.media.read_mask``) or ``.npy`` (non-zero
is foreground), 2-D or with one singleton axis. RAFT needs frames of at least 121 x 121 pixels (dynamic_degree.py).
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

BINS = ("small", "medium", "large")
EDGES = (25.0, 50.0)  # px: small <= 25 < medium <= 50 < large
MAX_BACKGROUND = 10.0  # px: a larger mean background flow is camera motion
WORKING_SIZE = (480, 720)  # (H, W): the paper's generation size
FLOW_FRAME = 1
PER_BIN = 300
MIN_SIDE = 121  # RAFT's coarsest correlation level is one pixel wide below this (NaN flow in the reference)
MASK_EXTENSIONS = (".png", ".jpg", ".jpeg", ".npy")
ASPECT_TOLERANCE = 0.02  # relative: a mask whose aspect ratio differs more is for some other frame


class MaskError(ValueError):
    """A mask file that cannot be used (unreadable, empty, all foreground, another frame's shape)."""


def _resize_nearest(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(H, W) bool -> shape (H', W') bool, nearest neighbour as Pillow does it (as ``jaxvc.data.media.read_mask``)."""
    from PIL import Image

    if mask.shape == tuple(shape):
        return mask
    return np.asarray(Image.fromarray(mask).resize((shape[1], shape[0]), Image.NEAREST)).astype(bool)


def read_mask(path: str | os.PathLike, shape: tuple[int, int]) -> np.ndarray:
    """The foreground mask in ``path`` as (H, W) bool at ``shape`` (H, W), the size of the frame it belongs to.

    PNG/JPEG: non-zero is foreground (``jaxvc.data.media.mask_pixels``: 0/255 with JPEG noise, 0/1 labels, palette
    labels); ``.npy``: non-zero is foreground. A mask of another size is resized
    nearest-neighbour; one with another aspect ratio, or empty, or all foreground (after resizing) is refused with a
    ``MaskError`` naming the file."""
    from jaxvc.data.media import MediaError, read_mask as read_image_mask

    path = str(path)
    if path.lower().endswith(".npy"):
        if not os.path.isfile(path):
            raise MaskError(f"{path}: no such file")
        try:
            array = np.load(path, allow_pickle=False)
        except Exception as error:  # a truncated file, a pickle, not .npy at all
            raise MaskError(f"{path}: cannot read the mask ({type(error).__name__}: {error})") from error
        if array.ndim == 3 and 1 in (array.shape[0], array.shape[-1]):
            array = array.reshape(array.shape[:2] if array.shape[-1] == 1 else array.shape[1:])
        if array.ndim != 2 or array.dtype.kind not in "biuf":
            raise MaskError(f"{path}: a mask array must be (H, W) of numbers or booleans, got {array.dtype} "
                            f"{array.shape}")
        mask = array != 0
        if mask.shape[0] < 1 or mask.shape[1] < 1:
            raise MaskError(f"{path}: the mask is empty ({array.shape})")
    elif path.lower().endswith(MASK_EXTENSIONS):
        try:
            mask = read_image_mask(path)[0]  # (H, W) bool
        except MediaError as error:
            raise MaskError(str(error)) from error
    else:
        raise MaskError(f"{path}: a mask must be one of {', '.join(MASK_EXTENSIONS)}")
    height, width = mask.shape
    ratio, frame_ratio = width / height, shape[1] / shape[0]
    if abs(ratio / frame_ratio - 1) > ASPECT_TOLERANCE:
        raise MaskError(f"{path}: the mask is {height}x{width} but its frame is {shape[0]}x{shape[1]} (H x W): "
                        "another aspect ratio, so it is not a mask of this clip's first frame")
    mask = _resize_nearest(mask, shape)
    check_mask(mask, path)
    return mask


def check_mask(mask: np.ndarray, source: str) -> None:
    """Both a foreground and a background are needed to measure the flow in each."""
    if not mask.any():
        raise MaskError(f"{source}: the mask has no foreground pixel at {mask.shape[0]}x{mask.shape[1]}")
    if mask.all():
        raise MaskError(f"{source}: the mask is foreground everywhere at {mask.shape[0]}x{mask.shape[1]}: no "
                        "background to tell camera motion by")


def region_flow(flow: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """(mean foreground, mean background) flow magnitude in pixels of one (H, W, 2) flow and (H, W) bool mask."""
    flow, mask = np.asarray(flow, np.float64), np.asarray(mask, bool)
    if flow.ndim != 3 or flow.shape[-1] != 2 or flow.shape[:2] != mask.shape:
        raise ValueError(f"region_flow needs a flow (H, W, 2) and a mask (H, W) of the same H, W; got flow "
                         f"{flow.shape} and mask {mask.shape}")
    check_mask(mask, "region_flow")
    magnitude = np.sqrt(np.sum(np.square(flow), axis=-1))
    return float(magnitude[mask].mean()), float(magnitude[~mask].mean())


def check_edges(edges: Sequence[float], max_background: float) -> tuple[float, float]:
    edges = tuple(float(e) for e in edges)
    if len(edges) != 2 or not 0 < edges[0] < edges[1] or not all(np.isfinite(edges)):
        raise ValueError(f"the bin edges must be two increasing positive numbers of pixels (small <= first < medium "
                         f"<= second < large), got {list(edges)}")
    if not max_background >= 0:
        raise ValueError(f"the background-flow limit must be >= 0 pixels, got {max_background}")
    return edges


def motion_bin(fg: float, bg: float, edges: Sequence[float] = EDGES,
               max_background: float = MAX_BACKGROUND) -> str | None:
    """"small" (fg <= edges[0]), "medium" (<= edges[1]), "large", or None: dropped as camera motion
    (bg > max_background)."""
    lower, upper = check_edges(edges, max_background)
    if not (np.isfinite(fg) and np.isfinite(bg)):
        raise ValueError(f"flow magnitudes must be finite, got foreground {fg} and background {bg}")
    if bg > max_background:
        return None
    return BINS[0] if fg <= lower else BINS[1] if fg <= upper else BINS[2]


def choose(indices: Sequence[int], count: int, seed: int, salt: int = 0) -> list[int]:
    """At most ``count`` of ``indices`` (all when ``count`` is 0), chosen by a seeded shuffle, in their order."""
    indices = list(indices)
    if count == 0 or len(indices) <= count:
        return indices
    order = np.random.default_rng([seed, salt]).permutation(len(indices))[:count]
    return [indices[i] for i in sorted(order)]


class MotionBinner:
    """RAFT flow of a clip's first frame pair at a fixed working size, split by the clip's foreground mask.

    ``flow``: a ``jaxvc.eval.dynamic_degree.FlowEstimator`` (or any ``(first, second) (N, H, W, 3) uint8 -> (N, H',
    W', 2)`` with H', W' the sides padded to multiples of 8 as RAFT's ``InputPadder`` does)."""

    def __init__(self, flow, size: tuple[int, int] = WORKING_SIZE, flow_frame: int = FLOW_FRAME):
        size = tuple(int(s) for s in size)
        if len(size) != 2 or min(size) < MIN_SIDE:
            raise ValueError(f"the working size must be H W of at least {MIN_SIDE} pixels each, got {list(size)}: "
                             "below that (128 after padding) RAFT's coarsest correlation level is one pixel wide, "
                             "where the reference's flow is NaN")
        if flow_frame < 1:
            raise ValueError(f"the flow frame must be >= 1 (the flow goes from frame 0 to it), got {flow_frame}")
        self.flow, self.size, self.flow_frame = flow, size, flow_frame

    def frame_pair(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Frames 0 and K of a (F, H, W, 3) uint8 video, resized to the working size: two (H, W, 3) uint8."""
        from jaxvc.models.resample import resize_bilinear

        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"a video must be (frames, H, W, 3), got shape {frames.shape}")
        if len(frames) <= self.flow_frame:
            raise ValueError(f"{len(frames)} frame(s): the flow to frame {self.flow_frame} needs at least "
                             f"{self.flow_frame + 1}")
        pair = frames[[0, self.flow_frame]]
        if pair.shape[1:3] != self.size:
            pair = np.asarray(resize_bilinear(pair.astype(np.float32), self.size))  # (2, H, W, 3)
            pair = np.clip(np.round(pair), 0, 255).astype(np.uint8)
        return pair[0], pair[1]

    def working_mask(self, mask: np.ndarray, source: str = "mask") -> np.ndarray:
        mask = _resize_nearest(np.asarray(mask, bool), self.size)
        check_mask(mask, source)
        return mask

    def flows(self, firsts: np.ndarray, seconds: np.ndarray) -> np.ndarray:
        """(N, H, W, 2) flows at the working size: RAFT's padded output cropped back."""
        from jaxvc.models.raft import pad_to_multiple_of_8
        from jaxvc.models.resample import unpad

        flows = np.asarray(self.flow(firsts, seconds))
        _, pads = pad_to_multiple_of_8(np.zeros((1, *self.size, 1), np.float32))  # where the padder put the frame
        expected = (self.size[0] + pads[0] + pads[1], self.size[1] + pads[2] + pads[3])
        if flows.shape[1:] != (*expected, 2):
            raise ValueError(f"the flow estimator returned {flows.shape[1:]} per pair for {self.size} frames; "
                             f"expected the padded {(*expected, 2)}")
        return np.asarray(unpad(flows, pads))

    def score_pairs(self, firsts: np.ndarray, seconds: np.ndarray, masks: np.ndarray) -> list[tuple[float, float]]:
        """(foreground, background) mean flow magnitudes of N pairs at the working size with their (N, H, W) masks."""
        return [region_flow(flow, mask) for flow, mask in zip(self.flows(firsts, seconds), masks)]

    def score(self, frames: np.ndarray, mask: np.ndarray) -> dict:
        """One clip: (F, H, W, 3) uint8 frames, the first frame's (H', W') bool mask (any size) -> {"fg_flow",
        "bg_flow"} in pixels at the working size."""
        first, second = self.frame_pair(frames)
        [(fg, bg)] = self.score_pairs(first[None], second[None], self.working_mask(mask)[None])
        return {"fg_flow": fg, "bg_flow": bg}
