"""Per-example transforms: clip sampling, reference selection, resize and crop, subject highlight, reference
augmentation, frozen videos, and the conversion to float in [-1, 1].

All randomness comes from the `np.random.Generator` passed in, so an example is a pure function of its seed.
Images are uint8 (H, W, 3) until `to_signed_float`.
"""
from __future__ import annotations

import numpy as np
from PIL import Image


def clip_stride(record_fps: float | None, frame_stride: int, target_fps: float | None = None) -> int:
    """The frame stride of a video record's clip. With ``target_fps`` set (> 0) and the record's fps known (> 0):
    round(record_fps / target_fps), at least 1, so clips play at about target_fps whatever each video's rate (a
    24 fps and a 30 fps video both give 8 fps clips at stride 3 and 4 where one fixed stride would not); otherwise
    ``frame_stride``. A function of the record alone (no randomness), so a resumed run samples the same clips."""
    if target_fps and record_fps and record_fps > 0:
        return max(1, int(round(float(record_fps) / float(target_fps))))
    return int(frame_stride)


def sample_clip(num_available: int, clip_length: int, stride: int, rng: np.random.Generator | None,
                position: str = "random") -> np.ndarray:
    """Frame indices (clip_length,) of a clip with the given stride. Too-short videos use the largest stride that
    fits, and if even stride 1 does not fit, repeat their last frame. position: "random" start, "center" or "start"."""
    if num_available < 1 or clip_length < 1 or stride < 1:
        raise ValueError(f"sample_clip: num_available={num_available}, clip_length={clip_length}, stride={stride}")
    if clip_length > 1 and (clip_length - 1) * stride + 1 > num_available:
        stride = max(1, (num_available - 1) // (clip_length - 1))
    span = (clip_length - 1) * stride + 1
    if span > num_available:
        return np.minimum(np.arange(clip_length), num_available - 1)
    if position == "random":
        start = int(rng.integers(0, num_available - span + 1))
    elif position == "center":
        start = (num_available - span) // 2
    elif position == "start":
        start = 0
    else:
        raise ValueError(f"clip position must be 'random', 'center' or 'start', got {position!r}")
    return start + stride * np.arange(clip_length)


# where a video example's reference comes from: a frame (choose_reference), or "provided": one of the images the
# record comes with (records' `references`: VideoBooth's segmented subjects), for every kind of example
REFERENCE_MODES = ("random", "video", "candidates", "first", "center", "last", "provided")


def choose_reference(clip: np.ndarray, num_available: int, rng: np.random.Generator, mode: str = "random",
                     candidates: tuple[int, ...] = (0, 9, 18, 27, 36, 45)) -> int:
    """Index (into the record's frames) of the reference frame for a video example.
    random: a random frame of the clip; video: any frame of the record; candidates: a random one of the given
    positions within the clip (those inside it); first / center / last: that frame of the clip."""
    if mode == "random":
        return int(clip[rng.integers(len(clip))])
    if mode == "video":
        return int(rng.integers(num_available))
    if mode == "candidates":
        inside = [c for c in candidates if 0 <= c < len(clip)] or [0]
        return int(clip[inside[int(rng.integers(len(inside)))]])
    if mode == "first":
        return int(clip[0])
    if mode == "center":
        return int(clip[len(clip) // 2])
    if mode == "last":
        return int(clip[-1])
    if mode == "provided":
        raise ValueError("reference mode 'provided' takes the record's own reference images, not a frame")
    raise ValueError(f"reference mode must be one of {REFERENCE_MODES}, got {mode!r}")


def crop_box(height: int, width: int, size: tuple[int, int], rng: np.random.Generator | None,
             random: bool = True) -> tuple[float, float, float, float]:
    """The (left, top, right, bottom) source box that, resized to `size` (H, W), fills it without distortion
    (resize the short side, then crop; random or centred offset)."""
    out_h, out_w = size
    scale = max(out_h / height, out_w / width)
    box_w, box_h = out_w / scale, out_h / scale
    if random and rng is not None:
        left = rng.uniform(0, width - box_w) if width - box_w > 1e-6 else 0.0
        top = rng.uniform(0, height - box_h) if height - box_h > 1e-6 else 0.0
    else:
        left, top = (width - box_w) / 2, (height - box_h) / 2
    return (left, top, left + box_w, top + box_h)


def scale_box(box, from_hw: tuple[int, int], to_hw: tuple[int, int]):
    """The same region on a grid of another resolution (a JPEG decoded at reduced scale vs its full-size mask)."""
    if tuple(from_hw) == tuple(to_hw):
        return box
    sy, sx = to_hw[0] / from_hw[0], to_hw[1] / from_hw[1]
    return (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)


def resize_crop(frames: np.ndarray, size: tuple[int, int], box) -> np.ndarray:
    """(K, h, w, 3) uint8 -> (K, H, W, 3): crop `box` and resize (bilinear, antialiased when downscaling)."""
    out_h, out_w = size
    if frames.shape[1:3] == (out_h, out_w) and tuple(round(b, 6) for b in box) == (0, 0, out_w, out_h):
        return frames
    return np.stack([np.asarray(Image.fromarray(f).resize((out_w, out_h), Image.BILINEAR, box=box))
                     for f in frames])


def resize_crop_mask(masks: np.ndarray, size: tuple[int, int], box) -> np.ndarray:
    """(K, h, w) bool -> (K, H, W) bool, nearest neighbour with the same box as the frames."""
    out_h, out_w = size
    if masks.shape[1:3] == (out_h, out_w) and tuple(round(b, 6) for b in box) == (0, 0, out_w, out_h):
        return masks.astype(bool)
    return np.stack([np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((out_w, out_h), Image.NEAREST,
                                                                                 box=box)) > 127 for m in masks])


def highlight_subject(image: np.ndarray, mask: np.ndarray, fill: int = 255) -> np.ndarray:
    """Subject highlight (VideoMaker): pixels outside the subject mask set to `fill` (white)."""
    out = image.copy()
    out[~mask.astype(bool)] = fill
    return out


def center_subject(image: np.ndarray, mask: np.ndarray, fill: int = 255) -> np.ndarray:
    """Shift the image (whole pixels) so the centre of the subject mask's bounding box lands on the image centre;
    uncovered pixels get `fill`. A reference cut from a video frame otherwise tells the model where the subject is in
    that frame, and a small model learns to paint the subject there in every frame instead of following the motion
    the caption asks for. An empty mask leaves the image as it is. (H, W, C) -> (H, W, C)."""
    rows, cols = np.nonzero(mask)
    if len(rows) == 0:
        return image
    h, w = image.shape[:2]
    dy = int(round(h / 2 - (rows.min() + rows.max() + 1) / 2))
    dx = int(round(w / 2 - (cols.min() + cols.max() + 1) / 2))
    out = np.full_like(image, fill)
    src_y, dst_y = slice(max(0, -dy), min(h, h - dy)), slice(max(0, dy), min(h, h + dy))
    src_x, dst_x = slice(max(0, -dx), min(w, w - dx)), slice(max(0, dx), min(w, w + dx))
    out[dst_y, dst_x] = image[src_y, src_x]
    return out


def augment_reference(image: np.ndarray, rng: np.random.Generator, hflip: float = 0.5, degrees: float = 10.0,
                      translate: float = 0.1, scale: tuple[float, float] = (0.9, 1.1), fill: int = 255) -> np.ndarray:
    """Random horizontal flip, then a random affine map (rotation within +-degrees, translation within +-translate
    of the size, scale in the range) about the centre; uncovered pixels get `fill`."""
    if rng.random() < hflip:
        image = image[:, ::-1]
    if degrees == 0 and translate == 0 and scale == (1.0, 1.0):
        return np.ascontiguousarray(image)
    h, w = image.shape[:2]
    angle = np.deg2rad(rng.uniform(-degrees, degrees))
    tx, ty = rng.uniform(-translate, translate, 2) * (w, h)
    s = rng.uniform(*scale)
    cx, cy = w / 2, h / 2
    # Output pixel p' comes from input p = c + R(-angle) (p' - c - t) / s  (PIL wants this inverse map).
    cos, sin = np.cos(angle) / s, np.sin(angle) / s
    a, b, d, e = cos, sin, -sin, cos
    c = cx - a * (cx + tx) - b * (cy + ty)
    f = cy - d * (cx + tx) - e * (cy + ty)
    out = Image.fromarray(np.ascontiguousarray(image)).transform(
        (w, h), Image.AFFINE, (a, b, c, d, e, f), resample=Image.BILINEAR, fillcolor=(fill,) * 3)
    return np.asarray(out)


ZOOM_OUT_PREFIXES = ("a far away ", "very small ")
ZOOM_IN_PREFIXES = ("zoomed in ", "close up ")
# CustomCrafter's caption templates (its customdata_new.py), "{}" standing for the subject, e.g. "<new1> dog"
CAPTION_TEMPLATES = ("video of a {}", "{}", "a static video of a {}", "a {}")


def templated_caption(phrase: str, rng: np.random.Generator, templates=CAPTION_TEMPLATES) -> str:
    """One of ``templates`` (uniformly) with ``phrase`` in its "{}": the caption of an image that has none."""
    return templates[int(rng.integers(len(templates)))].format(phrase)


def rescale_subject(image: np.ndarray, mask: np.ndarray | None, rng: np.random.Generator, *, fill: int = 0,
                    inset: int = 8, zoom_out_prob: float = 0.66) -> tuple[np.ndarray, np.ndarray, str]:
    """CustomCrafter's (Custom Diffusion's) subject rescale: image (H, W, 3) uint8 and its subject mask (H, W) or
    None -> (image, loss mask (H, W) bool, caption prefix).

    With probability ``zoom_out_prob`` a scale s in [1/3, 1]: the image shrunk by s is pasted at a random place on
    ``fill`` (black), the loss mask is the pasted box inset by ``inset`` pixels on each side (one latent cell of the
    SD VAE; a record's own mask shrinks along instead), and below s = 0.6 the prompt gets "a far away " or
    "very small ". Otherwise s in [1.2, 1.4): a random crop of the enlarged image, the mask all ones (or the record's
    mask cropped along), prefix "zoomed in " or "close up "."""
    h, w = image.shape[:2]
    zoom_out = rng.random() < zoom_out_prob
    s = rng.uniform(1 / 3, 1.0) if zoom_out else rng.uniform(1.2, 1.4)
    inner_h, inner_w = max(1, int(round(h * s))), max(1, int(round(w * s)))
    scaled = np.asarray(Image.fromarray(image).resize((inner_w, inner_h), Image.BILINEAR))
    scaled_mask = None
    if mask is not None:
        scaled_mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((inner_w, inner_h),
                                                                                      Image.NEAREST)) > 127
    top = int(rng.integers(0, abs(h - inner_h) + 1))
    left = int(rng.integers(0, abs(w - inner_w) + 1))
    if not zoom_out:  # crop the enlarged image
        window = (slice(top, top + h), slice(left, left + w))
        loss_mask = np.ones((h, w), bool) if scaled_mask is None else scaled_mask[window]
        return np.ascontiguousarray(scaled[window]), loss_mask, str(rng.choice(ZOOM_IN_PREFIXES))
    out = np.full_like(image, fill)
    out[top:top + inner_h, left:left + inner_w] = scaled
    loss_mask = np.zeros((h, w), bool)
    if scaled_mask is None:
        loss_mask[top + inset:top + inner_h - inset, left + inset:left + inner_w - inset] = True
    else:
        loss_mask[top:top + inner_h, left:left + inner_w] = scaled_mask
    prefix = str(rng.choice(ZOOM_OUT_PREFIXES)) if s < 0.6 else ""
    return out, loss_mask, prefix


def frozen_video(image: np.ndarray, num_frames: int) -> np.ndarray:
    """A still image repeated over time: (H, W, C) -> (num_frames, H, W, C)."""
    return np.repeat(image[None], num_frames, axis=0)


def to_signed_float(images: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return images.astype(np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)
