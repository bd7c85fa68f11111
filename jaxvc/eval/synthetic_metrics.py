"""Exact metrics for videos of the synthetic subject world (`jaxvc.data.synthetic`), from pixels and the truth.

No learned network is involved: the subject is segmented by colour distance to the background, its appearance is
classified by matching renderings of every candidate (shape, pattern, colour, angle) made with the world's own
renderer, and its motion is read off the tracked trajectory. Works at 32x32 and 64x64.

Per video (`evaluate_video`):
  subject_presence      fraction of frames with a tracked subject
  subject_accuracy      fraction of frames whose nearest candidate subject (shape, colour, pattern) is the reference
                        subject; shape_/color_/pattern_accuracy for each attribute alone  ("fidelity")
  appearance_similarity mean histogram intersection of the subject's palette-quantised colours with the truth's
                        (the reference subject's histogram averaged over several rendered views)
  motion_predicted      motion class of the trajectory (one of MOTIONS or "static"); motion_alignment = 1 if it is
                        the captioned motion; motion_score = cosine of the motion feature vector with the captioned
                        motion's prototype (0 when nothing moves)
  temporal_consistency  mean histogram intersection of the subject's colours between consecutive frames
  copy_paste            1 if at least half of the frames repeat the reference (subject mask IoU >= 0.75 with the
                        reference's and mean absolute difference inside the overlap <= 20/255); copy_paste_frames is
                        the fraction of such frames
`evaluate_videos` averages them (fidelity = subject_accuracy, alignment = motion_alignment, copy_paste_rate).

Frames are (F, H, W, 3) uint8, or float in [-1, 1] (the pipeline's range).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import numpy as np
from scipy import ndimage

from jaxvc.data import synthetic as syn

DISTANCE_THRESHOLD = 60.0  # RGB distance from the background above which a pixel belongs to the subject
MIN_AREA = 4  # pixels; smaller blobs are noise
COARSE_ANGLE_STEP, FINE_ANGLE_STEP = 10.0, 2.5  # degrees between candidate angles in appearance matching
REFINE_CANDIDATES = 4  # (shape, pattern) pairs refined at the fine angle step
ROTATION_SEARCH = np.arange(-40.0, 40.5, 2.0)  # candidate per-frame rotations (degrees)
COPY_IOU, COPY_DIFF, COPY_FRACTION = 0.75, 20.0, 0.5


def to_uint8(frames) -> np.ndarray:
    """uint8 stays; float is read as [-1, 1] (the pipeline's range)."""
    frames = np.asarray(frames)
    if frames.dtype == np.uint8:
        return frames
    if not np.issubdtype(frames.dtype, np.floating):
        raise ValueError(f"frames must be uint8 or float in [-1, 1], got dtype {frames.dtype}")
    return np.clip(np.round((frames.astype(np.float64) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def _check_frames(frames) -> np.ndarray:
    frames = to_uint8(frames)
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected frames (F, H, W, 3), got shape {frames.shape}")
    return frames


# --------------------------------------------------------------------------------------------------------- tracking
def estimate_background(frame: np.ndarray) -> np.ndarray:
    """Median colour of the one-pixel border (the sprite covers little of it)."""
    border = np.concatenate([frame[0], frame[-1], frame[1:-1, 0], frame[1:-1, -1]]).astype(np.float64)
    return np.median(border, axis=0)


@dataclasses.dataclass
class Track:
    masks: np.ndarray  # (F, H, W) bool
    centroids: np.ndarray  # (F, 2) (x, y) in pixel units (pixel centres at +0.5); NaN where absent
    areas: np.ndarray  # (F,) pixels
    backgrounds: np.ndarray  # (F, 3)

    @property
    def present(self) -> np.ndarray:
        return self.areas >= MIN_AREA


def segment(frame: np.ndarray, background=None, threshold: float = DISTANCE_THRESHOLD) -> tuple[np.ndarray, np.ndarray]:
    """The subject mask of one frame (largest 8-connected blob of pixels far from the background) and the background."""
    bg = estimate_background(frame) if background is None else np.asarray(background, np.float64)
    far = np.linalg.norm(frame.astype(np.float64) - bg, axis=-1) > threshold
    labels, count = ndimage.label(far, structure=np.ones((3, 3)))
    if count == 0:
        return far, bg
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (1 + int(np.argmax(sizes))), bg


def track_subject(frames, background=None, threshold: float = DISTANCE_THRESHOLD) -> Track:
    """Segment the subject in every frame; background None: estimated per frame from the border."""
    frames = _check_frames(frames)
    masks, bgs = zip(*(segment(f, background, threshold) for f in frames))
    masks = np.stack(masks)
    areas = masks.sum(axis=(1, 2)).astype(np.float64)
    ys, xs = np.mgrid[0:frames.shape[1], 0:frames.shape[2]]
    with np.errstate(invalid="ignore", divide="ignore"):
        cx = (masks * (xs + 0.5)).sum(axis=(1, 2)) / areas
        cy = (masks * (ys + 0.5)).sum(axis=(1, 2)) / areas
    centroids = np.stack([cx, cy], -1)
    centroids[areas < MIN_AREA] = np.nan
    return Track(masks, centroids, areas, np.stack(bgs))


# ---------------------------------------------------------------------------------------------------- appearance
@functools.lru_cache(maxsize=None)
def _palette() -> tuple[np.ndarray, list[str]]:
    names, rgbs = [], []
    for name, rgb in syn.COLORS.items():
        names += [name, name + "_shade"]
        rgbs += [rgb, syn.shade_of(rgb)]
    return np.asarray(rgbs, np.float64), names


def palette_histogram(frame: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Normalised histogram of the subject's core pixels over the palette (colours and shades) plus an 'other' bin.
    Core = mask eroded by one pixel (drops anti-aliased rims whose colour depends on the background)."""
    core = ndimage.binary_erosion(mask)
    if core.sum() < MIN_AREA:
        core = mask
    palette, _ = _palette()
    pixels = frame[core].astype(np.float64)
    hist = np.zeros(len(palette) + 1)
    if len(pixels) == 0:
        return hist
    dist = np.linalg.norm(pixels[:, None, :] - palette[None], axis=-1)
    nearest = np.where(dist.min(1) <= DISTANCE_THRESHOLD, dist.argmin(1), len(palette))
    hist += np.bincount(nearest, minlength=len(palette) + 1)
    return hist / hist.sum()


def expected_histogram(world: "syn.SyntheticWorld", subject_id: int, views: int = 8) -> np.ndarray:
    """The subject's palette histogram averaged over `views` truth renderings (poses and backgrounds vary), so the
    comparison does not hinge on one pose's share of pattern pixels."""
    hists = []
    backgrounds = list(syn.BACKGROUNDS)
    for k in range(views):
        image, mask, _ = world.reference(subject_id, seed=10_000 + k, background=backgrounds[k % len(backgrounds)])
        hists.append(palette_histogram(image, mask))
    return np.mean(hists, axis=0)


def _intersection(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.minimum(a, b).sum()) if a.sum() > 0 and b.sum() > 0 else 0.0


def half_coverage_area(frame: np.ndarray, mask: np.ndarray, background) -> float:
    """Subject area in pixels counting pixels at least half covered: contrast to the background >= half the median
    contrast of the mask's interior (the tracking mask also takes thinly covered rim pixels, ~10 % too many)."""
    dist = np.linalg.norm(frame.astype(np.float64) - np.asarray(background, np.float64), axis=-1)
    core = ndimage.binary_erosion(mask)
    full = np.median(dist[core]) if core.any() else np.median(dist[mask])
    region = ndimage.binary_dilation(mask)
    return float(max((dist[region] >= 0.5 * full).sum(), 1))


def _colour_sse(residual: np.ndarray, bg: np.ndarray, main: np.ndarray, dark: np.ndarray,
                colors: np.ndarray) -> np.ndarray:
    """Squared error of crop = bg + (c - bg)*main + (SHADE*c - bg)*dark for every template and palette colour c.
    residual = crop - bg (P, 3); main, dark (A, P) coverages; colors (C, 3). Returns (A, C)."""
    q = residual[None] + bg * (main + dark)[..., None]  # (A, P, 3): what c*(main + SHADE*dark) must explain
    wgt = main + syn.SHADE_FACTOR * dark  # (A, P)
    return ((q ** 2).sum((1, 2))[:, None] - 2 * (wgt[..., None] * q).sum(1) @ colors.T
            + (wgt ** 2).sum(1)[:, None] * (colors ** 2).sum(1)[None])


def classify_appearance(frame: np.ndarray, mask: np.ndarray, background, supersample: int = 2,
                        gallery: Sequence[tuple[str, str, str]] | None = None, pattern_scale: float = 1.0) -> dict:
    """Nearest candidate subject by rendering: every (shape, pattern, angle) is rendered at the tracked centroid with
    the scale its half-covered area implies, every palette colour is fitted in closed form, the least squared error
    wins. Coarse to fine: all angles every COARSE degrees without anti-aliasing, then the best few (shape, pattern)
    around their best angle every FINE degrees, anti-aliased like the renderer.
    gallery: allowed (shape, color, pattern) triples (default: every combination). pattern_scale: the world's.
    Returns {shape, color, pattern, angle, scale}."""
    frame = frame.astype(np.float32)
    h, w = mask.shape
    area = half_coverage_area(frame, mask, background)
    ys, xs = np.nonzero(mask)
    center = np.array([xs.mean() + 0.5, ys.mean() + 0.5])
    scales = {s: np.sqrt(area / syn.shape_area(s)) for s in syn.SHAPES}
    half = int(np.ceil(1.15 * max(scales.values()))) + 1
    x0, y0 = int(np.floor(center[0])) - half, int(np.floor(center[1])) - half
    grid_x, grid_y = np.arange(x0, x0 + 2 * half), np.arange(y0, y0 + 2 * half)
    valid = ((grid_y >= 0) & (grid_y < h))[:, None] & ((grid_x >= 0) & (grid_x < w))[None, :]  # (h', w')
    crop = frame[np.clip(grid_y, 0, h - 1)][:, np.clip(grid_x, 0, w - 1)][valid]  # (P, 3)
    bg = np.asarray(background, np.float32)
    residual = crop - bg
    colors = np.asarray(list(syn.COLORS.values()), np.float32)
    color_names = list(syn.COLORS)
    allowed = None if gallery is None else set(gallery)

    def search(shape, patterns, angles, ss):
        """{pattern: (A, C) sse} for one shape at the given angles."""
        k = len(angles)
        u, v = syn.sprite_coordinates(np.tile(center, (k, 1)), np.full(k, scales[shape]), angles, grid_x, grid_y, ss)
        inside = syn.inside_polygon(u, v, syn.shape_polygon(shape))
        out = {}
        for pattern in patterns:
            dark = inside & syn.pattern_shade(pattern, u, v, pattern_scale)
            sse = _colour_sse(residual, bg, syn.pool_samples(inside & ~dark, ss)[:, valid],
                              syn.pool_samples(dark, ss)[:, valid], colors)
            if allowed is not None:
                sse[:, [(shape, c, pattern) not in allowed for c in color_names]] = np.inf
            out[pattern] = sse
        return out

    coarse_angles = np.arange(0.0, 360.0, COARSE_ANGLE_STEP)
    coarse = []  # (sse, shape, pattern, angle)
    for shape in syn.SHAPES:
        patterns = [p for p in syn.PATTERNS
                    if allowed is None or any((shape, c, p) in allowed for c in color_names)]
        for pattern, sse in search(shape, patterns, coarse_angles, 1).items():
            a = int(np.argmin(sse.min(1)))
            coarse.append((float(sse[a].min()), shape, pattern, float(coarse_angles[a])))
    coarse.sort(key=lambda c: c[0])
    best = (np.inf, None)
    offsets = np.arange(-COARSE_ANGLE_STEP / 2, COARSE_ANGLE_STEP / 2 + 1e-6, FINE_ANGLE_STEP)
    for _, shape, pattern, angle in coarse[:REFINE_CANDIDATES]:
        angles = angle + offsets
        sse = search(shape, [pattern], angles, supersample)[pattern]
        a, c = np.unravel_index(np.argmin(sse), sse.shape)
        if sse[a, c] < best[0]:
            best = (sse[a, c], {"shape": shape, "color": color_names[c], "pattern": pattern,
                                "angle": float(angles[a] % 360), "scale": float(scales[shape])})
    return best[1]


# --------------------------------------------------------------------------------------------------------- motion
def estimate_rotations(frames: np.ndarray, track: Track) -> np.ndarray:
    """Per-step rotation (degrees clockwise) between consecutive frames with a subject: warp frame t about its
    centroid (with the scale change the areas imply) onto frame t+1 for each candidate angle, keep the best match."""
    frames = frames.astype(np.float64)
    out = np.full(len(frames) - 1, np.nan)
    h, w = frames.shape[1:3]
    for t in range(len(frames) - 1):
        if not (track.present[t] and track.present[t + 1]):
            continue
        region = ndimage.binary_dilation(track.masks[t + 1])
        ys, xs = np.nonzero(region)
        px, py = xs + 0.5 - track.centroids[t + 1, 0], ys + 0.5 - track.centroids[t + 1, 1]
        ratio = np.sqrt(track.areas[t] / track.areas[t + 1])
        target = frames[t + 1][ys, xs]  # (P, 3)
        errors = []
        for delta in ROTATION_SEARCH:
            r = np.deg2rad(delta)
            # frame_{t+1}(p) = frame_t(c_t + ratio * R(-delta) (p - c_{t+1}))
            sx = track.centroids[t, 0] + ratio * (np.cos(r) * px + np.sin(r) * py) - 0.5
            sy = track.centroids[t, 1] + ratio * (-np.sin(r) * px + np.cos(r) * py) - 0.5
            warped = np.stack([ndimage.map_coordinates(frames[t][..., ch], [sy, sx], order=1, mode="nearest")
                               for ch in range(3)], -1)
            errors.append(((warped - target) ** 2).sum())
        out[t] = ROTATION_SEARCH[int(np.argmin(errors))]
    return out


MOTION_PROTOTYPES = {  # feature order: dx, dy, bounce, log-scale, rotation (each normalised to 1 for its motion)
    "static": (0, 0, 0, 0, 0), "left": (-1, 0, 0, 0, 0), "right": (1, 0, 0, 0, 0), "up": (0, -1, 0, 0, 0),
    "down": (0, 1, 0, 0, 0), "bounce": (0, 0, 1, 0, 0), "grow": (0, 0, 0, 1, 0), "shrink": (0, 0, 0, -1, 0),
    "rotate_cw": (0, 0, 0, 0, 1), "rotate_ccw": (0, 0, 0, 0, -1),
}


def motion_features(track: Track, rotations: np.ndarray, image_size: int) -> np.ndarray:
    """(5,) features: net x and y displacement (line fit, / translation distance), vertical bounce (peak-to-peak of
    y about its line fit, / bounce height), log area change (line fit, / the grow range's), total rotation (/ its
    degrees). NaN if fewer than two frames have a subject."""
    present = track.present
    if present.sum() < 2:
        return np.full(5, np.nan)
    t = np.nonzero(present)[0].astype(np.float64)
    span = t[-1] - t[0]
    x, y = track.centroids[present, 0], track.centroids[present, 1]
    fit_x, fit_y = np.polyfit(t, x, 1), np.polyfit(t, y, 1)
    fit_a = np.polyfit(t, np.log(track.areas[present]), 1)
    residual_y = y - np.polyval(fit_y, t)
    # Rescale to the whole clip when frames are missing (slopes are per frame).
    frames = len(track.areas) - 1
    distance = syn.TRANSLATION_FRACTION * image_size
    log_range = 2 * np.log(syn.GROW_RANGE[1] / syn.GROW_RANGE[0])
    rot = np.nansum(rotations) * (frames / max(span, 1.0)) if np.isfinite(rotations).any() else 0.0
    return np.array([fit_x[0] * frames / distance, fit_y[0] * frames / distance,
                     np.ptp(residual_y) / (syn.BOUNCE_FRACTION * image_size), fit_a[0] * frames / log_range,
                     rot / syn.ROTATION_DEGREES])


def classify_motion(features: np.ndarray) -> str:
    """Nearest motion prototype ('static' included); 'none' when the subject was not tracked."""
    if not np.all(np.isfinite(features)):
        return "none"
    names = list(MOTION_PROTOTYPES)
    protos = np.asarray([MOTION_PROTOTYPES[n] for n in names], np.float64)
    return names[int(np.argmin(((protos - features) ** 2).sum(1)))]


def motion_score(features: np.ndarray, motion: str) -> float:
    """max(0, cosine(features, prototype of motion)); 0 for no motion (|features| < 0.25) or no track."""
    proto = np.asarray(MOTION_PROTOTYPES[motion], np.float64)
    norm = np.linalg.norm(features) if np.all(np.isfinite(features)) else 0.0
    if norm < 0.25 or not proto.any():
        return 0.0
    return float(max(0.0, features @ proto / (norm * np.linalg.norm(proto))))


# -------------------------------------------------------------------------------------------------------- metrics
def copy_paste_frames(frames: np.ndarray, track: Track, reference: np.ndarray) -> np.ndarray:
    """(F,) bool: frame repeats the reference (same subject placement and colours inside the overlap)."""
    ref_mask, _ = segment(reference)
    ref = reference.astype(np.float64)
    out = np.zeros(len(frames), bool)
    for t, frame in enumerate(frames):
        inter = track.masks[t] & ref_mask
        union = (track.masks[t] | ref_mask).sum()
        if union == 0 or inter.sum() == 0:
            continue
        diff = np.abs(frame.astype(np.float64)[inter] - ref[inter]).mean()
        out[t] = inter.sum() / union >= COPY_IOU and diff <= COPY_DIFF
    return out


def evaluate_video(world: "syn.SyntheticWorld", frames, subject_id: int, motion: str | None = None,
                   reference=None, fidelity_frames: int | None = None,
                   gallery: Sequence[int] | None = None) -> dict:
    """All metrics of one generated video against subject `subject_id` (the reference's subject) and the captioned
    motion. reference: the (H, W, 3) reference image given to the generator (default: the world's reference view).
    fidelity_frames: classify appearance on this many evenly spaced frames (default all). gallery: subject ids the
    nearest-subject classification chooses among (default: every shape x colour x pattern combination)."""
    frames = _check_frames(frames)
    subject = world.subject(subject_id)
    reference = world.reference_image(subject_id) if reference is None else _check_frames(reference)[0]
    track = track_subject(frames)
    present = track.present
    result = {"subject_presence": float(present.mean())}

    idx = np.nonzero(present)[0]
    if fidelity_frames is not None and len(idx) > fidelity_frames:
        idx = idx[np.round(np.linspace(0, len(idx) - 1, fidelity_frames)).astype(int)]
    triples = None if gallery is None else [(s.shape, s.color, s.pattern) for s in map(world.subject, gallery)]
    hits = {"subject": [], "shape": [], "color": [], "pattern": []}
    for t in idx:
        guess = classify_appearance(frames[t], track.masks[t], track.backgrounds[t], world.supersample, triples,
                                    world.pattern_scale)
        for attr in ("shape", "color", "pattern"):
            hits[attr].append(guess[attr] == getattr(subject, attr))
        hits["subject"].append(all(hits[a][-1] for a in ("shape", "color", "pattern")))
    scale = float(present.mean())  # frames without a subject count as misses
    for key, vals in hits.items():
        result[f"{key}_accuracy"] = float(np.mean(vals)) * scale if vals else 0.0

    ref_hist = expected_histogram(world, subject_id)
    hists = [palette_histogram(f, m) if p else np.zeros_like(ref_hist)
             for f, m, p in zip(frames, track.masks, present)]
    result["appearance_similarity"] = float(np.mean([_intersection(h, ref_hist) for h in hists]))
    result["temporal_consistency"] = float(np.mean([_intersection(a, b) for a, b in zip(hists[:-1], hists[1:])]))

    features = motion_features(track, estimate_rotations(frames, track), frames.shape[1])
    result["motion_features"] = features.tolist()
    result["motion_predicted"] = classify_motion(features)
    if motion is not None:
        result["motion_alignment"] = float(result["motion_predicted"] == motion)
        result["motion_score"] = motion_score(features, motion)

    copies = copy_paste_frames(frames, track, reference)
    result["copy_paste_frames"] = float(copies.mean())
    result["copy_paste"] = float(copies.mean() >= COPY_FRACTION)
    return result


SUMMARY_KEYS = {"fidelity": "subject_accuracy", "shape_accuracy": "shape_accuracy",
                "color_accuracy": "color_accuracy", "pattern_accuracy": "pattern_accuracy",
                "appearance_similarity": "appearance_similarity", "alignment": "motion_alignment",
                "motion_score": "motion_score", "temporal_consistency": "temporal_consistency",
                "copy_paste_rate": "copy_paste", "subject_presence": "subject_presence"}


def evaluate_videos(world: "syn.SyntheticWorld", videos: Sequence, subject_ids: Sequence[int],
                    motions: Sequence[str | None] | None = None, references: Sequence | None = None,
                    fidelity_frames: int | None = None, gallery: Sequence[int] | None = None) -> dict:
    """Mean of `evaluate_video` over videos: fidelity, shape/color/pattern_accuracy, appearance_similarity,
    alignment, motion_score, temporal_consistency, copy_paste_rate, subject_presence; 'per_video' holds each."""
    n = len(videos)
    if len(subject_ids) != n or (motions is not None and len(motions) != n) or (
            references is not None and len(references) != n):
        raise ValueError(f"videos ({n}), subject_ids ({len(subject_ids)}), motions and references must match in length")
    per_video = [evaluate_video(world, videos[i], subject_ids[i], None if motions is None else motions[i],
                                None if references is None else references[i], fidelity_frames, gallery)
                 for i in range(n)]
    summary = {}
    for out_key, key in SUMMARY_KEYS.items():
        vals = [r[key] for r in per_video if key in r]
        if vals:
            summary[out_key] = float(np.mean(vals))
    summary["num_videos"] = n
    summary["per_video"] = per_video
    return summary

