"""The synthetic subject world: procedural subjects, backgrounds, motions and captions with exact ground truth.

A subject is a textured sprite: a shape (circle, square, triangle, star, cross, heart, semicircle), a colour (seven
well separated hues) and a pattern (striped, checkered, dotted, two-tone; the pattern is drawn in a dark shade of the
colour, in the sprite's own frame, so it turns and scales with it). Backgrounds are plain colours chosen far (in RGB)
from every subject colour and shade, which makes segmentation by colour distance exact on rendered frames.

Everything is a pure function of (world seed, subject id, sample seed): the same call gives the same pixels.

Coordinates: a pixel (row i, column j) covers [j, j+1) x [i, i+1), so its centre is (j + 0.5, i + 0.5) as (x, y).
y grows downwards; an angle grows clockwise on screen (degrees). A pose is (centre x, centre y, scale, angle) where the
scale is the radius in pixels of the circle enclosing the shape (shapes are centred on their area centroid).

Both streams the methods need come out of one world:
  - `image_pair(subject_id, seed)`: two views of one subject (different pose and background) with captions;
  - `video(subject_id, motion, seed)`: F frames of the subject moving, its per-frame mask, a caption that says what
    moves and how, and the truth (trajectory, angles, scales) the exact metrics compare against.
`SyntheticVideoSource` / `SyntheticPairSource` expose them as random-access sources for `jaxvc.data.pipeline`.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import zlib
from typing import Sequence

import numpy as np

SHAPES = ("circle", "square", "triangle", "star", "cross", "heart", "semicircle")
COLORS = {  # name -> RGB; pairwise distances >= 70, every colour and its shade far from every background
    "red": (220, 40, 40),
    "orange": (240, 140, 20),
    "yellow": (235, 215, 30),
    "green": (40, 170, 60),
    "cyan": (30, 190, 210),
    "blue": (40, 80, 220),
    "purple": (150, 60, 200),
}
SHADE_FACTOR = 0.4  # pattern colour = SHADE_FACTOR * colour (a dark shade of the same hue)
PATTERNS = ("striped", "checkered", "dotted", "two-tone")
BACKGROUNDS = {
    "gray": (128, 128, 128),
    "beige": (225, 210, 175),
    "sky": (175, 205, 240),
    "pink": (240, 195, 205),
    "mint": (195, 235, 205),
}
WHITE = (255, 255, 255)

MOTIONS = ("left", "right", "up", "down", "bounce", "rotate_cw", "rotate_ccw", "grow", "shrink")
MOTION_PHRASES = {
    "left": "moves left", "right": "moves right", "up": "moves up", "down": "moves down",
    "bounce": "bounces up and down", "rotate_cw": "rotates clockwise", "rotate_ccw": "rotates counterclockwise",
    "grow": "grows bigger", "shrink": "shrinks", "static": "stays still",
}
# Motion magnitudes over one clip, as fractions of the image size (translation distance, bounce height), degrees
# (rotation) and scale factors (grow/shrink go from GROW_RANGE[0] to GROW_RANGE[1] times the base scale).
TRANSLATION_FRACTION = 0.4
BOUNCE_FRACTION = 0.3
ROTATION_DEGREES = 120.0
GROW_RANGE = (0.7, 1.3)
VIDEO_SCALE_RANGE = (0.19, 0.24)  # base sprite radius / image size in videos
PAIR_SCALE_RANGE = (0.19, 0.26)  # in image pairs and reference images
PLACEMENTS = ("random", "centered")  # where a clip's motion path lies: anywhere inside, or about the image centre
FULL_TURN = (0.0, 360.0)  # the orientations a sprite is drawn in (degrees): any, unless a world narrows them
CENTER_JITTER = 0.03  # "centered": the path's midpoint is the image centre +- this fraction of the image size


# ------------------------------------------------------------------------------------------------ shapes and patterns
def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    angles = -np.pi / 2 + np.arange(2 * points) * np.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], -1)


def _raw_polygon(shape: str) -> np.ndarray:
    """Vertices (V, 2) in the sprite frame (x right, y down), before centring and normalisation."""
    if shape == "circle":
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        return np.stack([np.cos(t), np.sin(t)], -1)
    if shape == "square":
        return np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float64)
    if shape == "triangle":  # pointing up
        t = -np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        return np.stack([np.cos(t), np.sin(t)], -1)
    if shape == "star":
        return _star()
    if shape == "cross":
        a, b = 0.33, 1.0
        return np.array([[-a, -b], [a, -b], [a, -a], [b, -a], [b, a], [a, a], [a, b], [-a, b], [-a, a], [-b, a],
                         [-b, -a], [-a, -a]], np.float64)
    if shape == "heart":
        t = np.linspace(0, 2 * np.pi, 40, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        return np.stack([x, y], -1)
    if shape == "semicircle":  # flat side down
        t = np.linspace(np.pi, 2 * np.pi, 25)
        return np.stack([np.cos(t), np.sin(t)], -1)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _polygon_area_centroid(poly: np.ndarray) -> tuple[float, np.ndarray]:
    x, y = poly[:, 0], poly[:, 1]
    xn, yn = np.roll(x, -1), np.roll(y, -1)
    cross = x * yn - xn * y
    area = cross.sum() / 2
    cx = ((x + xn) * cross).sum() / (6 * area)
    cy = ((y + yn) * cross).sum() / (6 * area)
    return abs(area), np.array([cx, cy])


@functools.lru_cache(maxsize=None)
def shape_polygon(shape: str) -> np.ndarray:
    """Unit polygon of a shape: centred on its area centroid, farthest vertex at radius 1."""
    poly = _raw_polygon(shape)
    _, centroid = _polygon_area_centroid(poly)
    poly = poly - centroid
    return poly / np.sqrt((poly ** 2).sum(-1)).max()


@functools.lru_cache(maxsize=None)
def shape_area(shape: str) -> float:
    """Area of the unit polygon (multiply by scale**2 for the area in pixels)."""
    return _polygon_area_centroid(shape_polygon(shape))[0]


def inside_polygon(u: np.ndarray, v: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Even-odd rule point-in-polygon test, vectorised over any array shape of points (u, v)."""
    inside = np.zeros(u.shape, bool)
    x1, y1 = poly[:, 0], poly[:, 1]
    x2, y2 = np.roll(x1, -1), np.roll(y1, -1)
    for a, b, c, d in zip(x1, y1, x2, y2):
        if b == d:
            continue
        crosses = (b > v) != (d > v)
        x_at = a + (v - b) * (c - a) / (d - b)
        inside ^= crosses & (u < x_at)
    return inside


def pattern_shade(pattern: str, u: np.ndarray, v: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """True where the pattern's dark shade is drawn, in unit sprite coordinates (radius 1). scale > 1 draws the
    pattern coarser (stripes, checks and dots `scale` times wider; two-tone is unchanged)."""
    if scale != 1.0:
        u, v = u / scale, v / scale
    if pattern == "striped":  # horizontal stripes, period 0.6 sprite radii
        return np.floor(v / 0.3).astype(np.int64) % 2 == 1
    if pattern == "checkered":
        return (np.floor(u / 0.5).astype(np.int64) + np.floor(v / 0.5).astype(np.int64)) % 2 == 1
    if pattern == "dotted":
        cu = u - 0.55 * np.round(u / 0.55)
        cv = v - 0.55 * np.round(v / 0.55)
        return cu ** 2 + cv ** 2 < 0.19 ** 2
    if pattern == "two-tone":  # right half dark
        return u > 0
    raise ValueError(f"unknown pattern {pattern!r}; expected one of {PATTERNS}")


def sprite_coordinates(centers, scales, angles, grid_x: np.ndarray, grid_y: np.ndarray,
                       supersample: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Unit sprite coordinates (u, v) of every sub-pixel sample for K poses, each (K, H*s, W*s).

    centers (K, 2) as (x, y) pixels, scales (K,) radius in pixels, angles (K,) degrees clockwise on screen; grid_x
    (W,) and grid_y (H,) the integer pixel columns/rows to sample, s = supersample samples per pixel side.
    """
    centers = np.asarray(centers, np.float64).reshape(-1, 2)
    scales = np.asarray(scales, np.float64).reshape(-1)
    angles = np.deg2rad(np.asarray(angles, np.float64).reshape(-1))
    offsets = (np.arange(supersample) + 0.5) / supersample
    xs = (np.asarray(grid_x, np.float64)[:, None] + offsets[None, :]).reshape(-1)  # (W*s,)
    ys = (np.asarray(grid_y, np.float64)[:, None] + offsets[None, :]).reshape(-1)  # (H*s,)
    dx = xs[None, None, :] - centers[:, 0, None, None]  # (K, 1, W*s)
    dy = ys[None, :, None] - centers[:, 1, None, None]  # (K, H*s, 1)
    cos, sin = np.cos(angles)[:, None, None], np.sin(angles)[:, None, None]
    # p - c = scale * R(angle) (u, v) with the standard rotation matrix, which turns clockwise when y points down.
    u = (cos * dx + sin * dy) / scales[:, None, None]
    v = (-sin * dx + cos * dy) / scales[:, None, None]
    return u, v


def pool_samples(samples: np.ndarray, supersample: int) -> np.ndarray:
    """(..., H*s, W*s) boolean samples -> (..., H, W) fractional coverage."""
    *lead, hs, ws = samples.shape
    h, w = hs // supersample, ws // supersample
    counts = samples.reshape(*lead, h, supersample, w, supersample).sum(axis=(-3, -1), dtype=np.int32)
    return counts.astype(np.float32) / np.float32(supersample * supersample)


def render_coverage(shape: str, pattern: str, centers, scales, angles, grid_x: np.ndarray, grid_y: np.ndarray,
                    supersample: int = 2, pattern_scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Fractional coverage of the sprite's main colour and of its pattern shade for K poses: (main, shade), each
    (K, H, W) float in [0, 1], every pixel averaged over supersample**2 sub-pixel samples (anti-aliasing)."""
    u, v = sprite_coordinates(centers, scales, angles, grid_x, grid_y, supersample)
    inside = inside_polygon(u, v, shape_polygon(shape))
    shade = inside & pattern_shade(pattern, u, v, pattern_scale)
    return pool_samples(inside & ~shade, supersample), pool_samples(shade, supersample)


def composite(background, color, shade_color, main: np.ndarray, shade: np.ndarray) -> np.ndarray:
    """Blend coverages onto a background: (K, H, W) coverages -> (K, H, W, 3) uint8."""
    bg = np.asarray(background, np.float64)
    c = np.asarray(color, np.float64)
    sc = np.asarray(shade_color, np.float64)
    img = bg * (1 - main - shade)[..., None] + c * main[..., None] + sc * shade[..., None]
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def shade_of(rgb) -> tuple[int, int, int]:
    return tuple(int(round(SHADE_FACTOR * c)) for c in rgb)


# ------------------------------------------------------------------------------------------------------------ world
@dataclasses.dataclass(frozen=True)
class Subject:
    id: int
    shape: str
    color: str
    pattern: str

    @property
    def rgb(self) -> tuple[int, int, int]:
        return COLORS[self.color]

    @property
    def shade_rgb(self) -> tuple[int, int, int]:
        return shade_of(COLORS[self.color])

    @property
    def name(self) -> str:
        return f"{self.color} {self.pattern} {self.shape}"


def caption(subject: Subject, motion: str | None = None, background: str | None = None,
            name: str | None = None) -> str:
    """'a red striped star moves left on a gray background' (motion None: no verb; background None: no place).
    name replaces the subject's description (e.g. "the subject", "<cls> object") for prompts that leave the identity
    to the reference image; None or "" keeps the description."""
    text = name if name else ("an " if subject.name[0] in "aeiou" else "a ") + subject.name
    if motion is not None:
        if motion not in MOTION_PHRASES:
            raise ValueError(f"unknown motion {motion!r}; expected one of {tuple(MOTION_PHRASES)}")
        text += " " + MOTION_PHRASES[motion]
    if background is not None:
        text += f" on a {background} background"
    return text


def _rng(*keys) -> np.random.Generator:
    """A generator keyed by integers and strings (strings hashed with crc32, stable across processes)."""
    ints = [zlib.crc32(k.encode()) if isinstance(k, str) else int(k) % (2 ** 63) for k in keys]
    return np.random.default_rng(ints)


def _seed_of(seed) -> int:
    """An int seed, or one drawn from a numpy Generator (so callers may pass either)."""
    if isinstance(seed, np.random.Generator):
        return int(seed.integers(2 ** 62))
    return int(seed)


class SyntheticWorld:
    """Subjects, renderings and the two data streams. See the module docstring for conventions."""

    def __init__(self, image_size: int = 32, num_frames: int = 8, num_subjects: int = 64,
                 held_out: int | Sequence[int] = 8, seed: int = 0, supersample: int = 2, placement: str = "random",
                 angle_range: Sequence[float] = FULL_TURN, pattern_scale: float = 1.0):
        """placement: "random" puts each clip's motion path anywhere it fits; "centered" centres it on the image
        (the middle of the path at the centre, +- CENTER_JITTER), so what the caption says (which way it moves)
        decides where the subject is in every frame, which a tiny model learns from far fewer clips.
        angle_range: (low, high) degrees, the orientation every view and clip starts in is drawn uniformly from it
        (rotation motions still turn from there); (0, 0) draws every sprite upright, so each subject has one look
        up to its scale, which a tiny model learns to draw from far fewer clips.
        pattern_scale: how much coarser than the default the patterns are drawn (stripes, checks and dots; 1: bands
        about 2 pixels wide at 32x32, finer than a 4x4-pixel token; 2: about one token wide)."""
        if placement not in PLACEMENTS:
            raise ValueError(f"placement={placement!r}: expected one of {PLACEMENTS}")
        self.placement = placement
        low, high = (float(a) for a in angle_range)
        if not 0.0 <= high - low <= 360.0:
            raise ValueError(f"angle_range={tuple(angle_range)}: expected (low, high) degrees with 0 <= high - low "
                             f"<= 360")
        self.angle_range = (low, high)
        if not 0.25 <= float(pattern_scale) <= 8.0:
            raise ValueError(f"pattern_scale={pattern_scale}: expected a factor in [0.25, 8]")
        self.pattern_scale = float(pattern_scale)
        combos = list(itertools.product(SHAPES, COLORS, PATTERNS))
        if not 1 <= num_subjects <= len(combos):
            raise ValueError(f"num_subjects={num_subjects}: must be in [1, {len(combos)}] (distinct attribute combos)")
        if image_size < 16 or num_frames < 2:
            raise ValueError(f"image_size={image_size} (>= 16) and num_frames={num_frames} (>= 2) are too small")
        self.image_size = int(image_size)
        self.num_frames = int(num_frames)
        self.seed = int(seed)
        self.supersample = int(supersample)
        order = _rng(self.seed, "subjects").permutation(len(combos))[:num_subjects]
        self._subjects = [Subject(i, *combos[j]) for i, j in enumerate(order)]
        if isinstance(held_out, (int, np.integer)):
            self.held_out_subject_ids = self._choose_held_out(int(held_out))
        else:
            ids = sorted({int(i) for i in held_out})
            bad = [i for i in ids if not 0 <= i < num_subjects]
            if bad:
                raise ValueError(f"held_out ids {bad} are outside [0, {num_subjects})")
            self.held_out_subject_ids = tuple(ids)
        held = set(self.held_out_subject_ids)
        self.train_subject_ids = tuple(i for i in range(num_subjects) if i not in held)
        if not self.train_subject_ids:
            raise ValueError("held_out leaves no training subjects")

    def _choose_held_out(self, count: int) -> tuple[int, ...]:
        """Pick held-out subjects whose every attribute value still appears among the training subjects
        (evaluation then tests new combinations of known parts, not unseen colours or shapes)."""
        if count < 0 or count >= len(self._subjects):
            raise ValueError(f"held_out={count} must be in [0, num_subjects={len(self._subjects)})")
        chosen: list[int] = []
        for i in _rng(self.seed, "held_out").permutation(len(self._subjects)):
            if len(chosen) == count:
                break
            rest = [s for s in self._subjects if s.id != i and s.id not in chosen]
            s = self._subjects[i]
            if all(any(getattr(r, a) == getattr(s, a) for r in rest) for a in ("shape", "color", "pattern")):
                chosen.append(int(i))
        if len(chosen) < count:  # tiny worlds: fall back to any subjects
            extra = [i for i in range(len(self._subjects)) if i not in chosen]
            chosen += extra[:count - len(chosen)]
        return tuple(sorted(chosen))

    # -------------------------------------------------------------------------------------------------- queries
    @property
    def num_subjects(self) -> int:
        return len(self._subjects)

    @property
    def motions(self) -> list[str]:
        return list(MOTIONS)

    def subject(self, subject_id: int) -> Subject:
        if not 0 <= int(subject_id) < len(self._subjects):
            raise ValueError(f"subject_id={subject_id} outside [0, {len(self._subjects)})")
        return self._subjects[int(subject_id)]

    def caption(self, subject: Subject | int, motion: str | None = None, background: str | None = None,
                name: str | None = None) -> str:
        if not isinstance(subject, Subject):
            subject = self.subject(subject)
        return caption(subject, motion, background, name)

    # ------------------------------------------------------------------------------------------------ rendering
    def render(self, subject: Subject | int, centers, scales, angles,
               background=WHITE) -> tuple[np.ndarray, np.ndarray]:
        """Frames (K, H, W, 3) uint8 and masks (K, H, W) bool (coverage >= 0.5) of a subject at K poses."""
        if not isinstance(subject, Subject):
            subject = self.subject(subject)
        grid = np.arange(self.image_size)
        main, shade = render_coverage(subject.shape, subject.pattern, centers, scales, angles, grid, grid,
                                      self.supersample, self.pattern_scale)
        frames = composite(background, subject.rgb, subject.shade_rgb, main, shade)
        return frames, (main + shade) >= 0.5

    def _random_pose(self, rng: np.random.Generator, scale_range, centered: bool = False):
        size = self.image_size
        scale = rng.uniform(*scale_range) * size
        angle = rng.uniform(*self.angle_range)
        if centered:
            center = size / 2 + rng.uniform(-0.05, 0.05, 2) * size
        else:
            center = rng.uniform(scale + 1, size - scale - 1, 2)
        return center, scale, angle

    def reference(self, subject_id: int, seed=0, background: str | tuple = "white"):
        """A reference view: the subject near the centre on a plain (default white) background. seed: int or a
        numpy Generator (as for every sampling method here).
        Returns (image (H, W, 3) uint8, mask (H, W) bool, truth dict)."""
        rgb = WHITE if background == "white" else BACKGROUNDS.get(background, background)
        rng = _rng(self.seed, "reference", subject_id, _seed_of(seed))
        center, scale, angle = self._random_pose(rng, PAIR_SCALE_RANGE, centered=True)
        frames, masks = self.render(subject_id, center[None], [scale], [angle], rgb)
        truth = {"subject_id": int(subject_id), "center": center.tolist(), "scale": float(scale),
                 "angle": float(angle), "background_rgb": tuple(int(c) for c in rgb)}
        return frames[0], masks[0], truth

    def reference_image(self, subject_id: int, seed: int = 0, background: str | tuple = "white") -> np.ndarray:
        """The subject on a white (or given plain) background, (H, W, 3) uint8."""
        return self.reference(subject_id, seed, background)[0]

    def image_pair(self, subject_id: int, seed: int = 0):
        """Two views of one subject with different pose and background.
        Returns (images (2, H, W, 3) uint8, masks (2, H, W) bool, captions [str, str], truth dict)."""
        subject = self.subject(subject_id)
        rng = _rng(self.seed, "pair", subject_id, _seed_of(seed))
        bg_names = list(rng.choice(list(BACKGROUNDS), size=2, replace=False))
        images, masks, poses = [], [], []
        for bg in bg_names:
            center, scale, angle = self._random_pose(rng, PAIR_SCALE_RANGE)
            f, m = self.render(subject, center[None], [scale], [angle], BACKGROUNDS[bg])
            images.append(f[0])
            masks.append(m[0])
            poses.append({"center": center.tolist(), "scale": float(scale), "angle": float(angle)})
        captions = [caption(subject, None, bg) for bg in bg_names]
        truth = {"subject_id": int(subject_id), "backgrounds": bg_names, "poses": poses}
        return np.stack(images), np.stack(masks), captions, truth

    def trajectory(self, motion: str, rng: np.random.Generator):
        """Per-frame (centers (F, 2), scales (F,), angles (F,)) of one motion, placed so the sprite stays inside."""
        size, frames = self.image_size, self.num_frames
        t = np.linspace(0.0, 1.0, frames)
        scale = rng.uniform(*VIDEO_SCALE_RANGE) * size
        angle0 = rng.uniform(*self.angle_range)
        scales = np.full(frames, scale)
        angles = np.full(frames, angle0)
        lo = scale + 1.0
        if motion in ("left", "right", "up", "down"):
            dist = TRANSLATION_FRACTION * size
            start = rng.uniform(lo, size - lo - dist)
            across = rng.uniform(lo, size - lo)
            along = start + dist * t
            if motion in ("left", "up"):
                along = along[::-1].copy()
            xy = (along, np.full(frames, across)) if motion in ("left", "right") else (np.full(frames, across), along)
            centers = np.stack(xy, -1)
        elif motion == "bounce":
            height = BOUNCE_FRACTION * size
            floor = rng.uniform(lo + height, size - lo)
            x = rng.uniform(lo, size - lo)
            y = floor - height * np.abs(np.sin(2 * np.pi * t))
            centers = np.stack([np.full(frames, x), y], -1)
        elif motion in ("rotate_cw", "rotate_ccw", "static"):
            centers = np.tile(rng.uniform(lo, size - lo, 2), (frames, 1))
            if motion != "static":
                sign = 1.0 if motion == "rotate_cw" else -1.0
                angles = angle0 + sign * ROTATION_DEGREES * t
        elif motion in ("grow", "shrink"):
            lo_big = scale * GROW_RANGE[1] + 1.0
            centers = np.tile(rng.uniform(lo_big, size - lo_big, 2), (frames, 1))
            factor = GROW_RANGE[0] + (GROW_RANGE[1] - GROW_RANGE[0]) * t
            scales = scale * (factor if motion == "grow" else factor[::-1])
        else:
            raise ValueError(f"unknown motion {motion!r}; expected one of {MOTIONS + ('static',)}")
        if self.placement == "centered":  # move the path's bounding-box middle to the (jittered) centre
            middle = (centers.min(axis=0) + centers.max(axis=0)) / 2
            centers = centers + (size / 2 + rng.uniform(-CENTER_JITTER, CENTER_JITTER, 2) * size - middle)
        return centers, scales, angles

    def video(self, subject_id: int, motion: str | None = None, seed: int = 0, background: str | None = None):
        """A clip of the subject moving. motion None: drawn from the seed; background None: drawn from the seed.
        Returns (frames (F, H, W, 3) uint8, mask (F, H, W) bool, caption str, truth dict)."""
        subject = self.subject(subject_id)
        rng = _rng(self.seed, "video", subject_id, _seed_of(seed))
        if motion is None:
            motion = MOTIONS[int(rng.integers(len(MOTIONS)))]
        if background is None:
            background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
        elif background not in BACKGROUNDS:
            raise ValueError(f"unknown background {background!r}; expected one of {tuple(BACKGROUNDS)}")
        centers, scales, angles = self.trajectory(motion, rng)
        frames, masks = self.render(subject, centers, scales, angles, BACKGROUNDS[background])
        text = caption(subject, motion, background)
        truth = {"subject_id": int(subject_id), "shape": subject.shape, "color": subject.color,
                 "pattern": subject.pattern, "motion": motion, "background": background,
                 "background_rgb": BACKGROUNDS[background], "centers": centers, "scales": scales, "angles": angles,
                 "caption": text}
        return frames, masks, text, truth


# ----------------------------------------------------------------------------------- random-access data sources
class SyntheticVideoSource:
    """Random-access source of synthetic videos for the Grain pipeline (no packing needed).

    Record i shows subject `subject_ids[i % S]` with motion `motions[(i // S) % M]` and a per-record seed, so one pass
    covers every (subject, motion) pair evenly. Records are examples as `jaxvc.data.records` defines them.
    """

    def __init__(self, world: SyntheticWorld, subject_ids: Sequence[int] | None = None, num_records: int = 4096,
                 motions: Sequence[str] | None = None, seed: int = 0, caption_name: str | None = None):
        """caption_name: name the subject with these words instead of its description ("a subject moves left on a
        gray background"), leaving its identity to the reference image."""
        self.world = world
        self.subject_ids = tuple(world.train_subject_ids if subject_ids is None else subject_ids)
        self.motions = tuple(world.motions if motions is None else motions)
        self.num_records = int(num_records)
        self.seed = int(seed)
        self.caption_name = caption_name
        if not self.subject_ids or not self.motions or self.num_records <= 0:
            raise ValueError("SyntheticVideoSource needs subjects, motions and num_records > 0")

    def __len__(self) -> int:
        return self.num_records

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        s = len(self.subject_ids)
        subject_id = self.subject_ids[index % s]
        motion = self.motions[(index // s) % len(self.motions)]
        frames, masks, text, truth = self.world.video(subject_id, motion, seed=self.seed * 1_000_003 + index)
        if self.caption_name is not None:
            text = caption(self.world.subject(subject_id), motion, truth["background"], self.caption_name)
        return {"kind": "video", "frames": frames, "mask": masks, "captions": [text], "fps": 8.0,
                "source": f"synthetic:video:{subject_id}:{motion}:{index}"}


class SyntheticPairSource:
    """Random-access source of synthetic subject image pairs (record i shows subject `subject_ids[i % S]`)."""

    def __init__(self, world: SyntheticWorld, subject_ids: Sequence[int] | None = None, num_records: int = 4096,
                 seed: int = 0, caption_name: str | None = None):
        self.world = world
        self.subject_ids = tuple(world.train_subject_ids if subject_ids is None else subject_ids)
        self.num_records = int(num_records)
        self.seed = int(seed)
        self.caption_name = caption_name
        if not self.subject_ids or self.num_records <= 0:
            raise ValueError("SyntheticPairSource needs subjects and num_records > 0")

    def __len__(self) -> int:
        return self.num_records

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        subject_id = self.subject_ids[index % len(self.subject_ids)]
        images, masks, captions, truth = self.world.image_pair(subject_id, seed=self.seed * 1_000_003 + index)
        if self.caption_name is not None:
            captions = [caption(self.world.subject(subject_id), None, bg, self.caption_name)
                        for bg in truth["backgrounds"]]
        return {"kind": "image_pair", "frames": images, "mask": masks, "captions": captions, "fps": 0.0,
                "source": f"synthetic:pair:{subject_id}:{index}"}
