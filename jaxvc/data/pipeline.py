"""Grain input pipeline: weighted mixture of named streams (e.g. subject image pairs and videos), batch-level
stochastic switching, per-host sharding of the global batch, workers, and exactly restorable iterator state.

How a batch is made. Batch b of the global batch (size G) is a pure function of (config, b):
  - each global slot j draws its stream with probability proportional to `weights` from a counter-based hash of
    (seed, b, j), or, with `switch=True`, the whole batch draws one stream from a hash of (seed, b) (method (e)'s
    stochastic task switching: a video batch with probability p), or, with `fixed_split=True`, every batch gives
    each stream its share of the slots (weights x G, largest remainders), in stream order (CustomCrafter's batch
    of instance and class images);
  - with `switch=True`, `batch_sizes` may give a stream its own global batch size G_s (method (e): 8 image pairs
    but 6 videos per GPU): a batch that draws stream s has G_s slots, and host h of P builds rows
    [h*G_s/P, (h+1)*G_s/P) of it (the batch says its size in `global_batch_size`);
  - a stream is read in passes (epochs); pass e visits its records in a permutation seeded by (seed, stream, e), and
    consecutive slots given to a stream take consecutive positions of that order (the counts are prefix sums over
    earlier batches), so every record is visited once per pass and the mixture weights hold exactly in expectation;
  - host h of P builds only the slots [h*G/P, (h+1)*G/P): hosts read disjoint records, agree on the switching draw,
    and the global batch does not depend on P (resuming on a different number of hosts gives the same data);
  - a record that fails to read or decode is skipped and counted (`num_skipped` in the batch, `skipped` in the
    iterator), and a deterministic substitute from the same stream takes its place;
  - per-example randomness (clip start, reference frame, crop, flips, affine) is seeded by (seed, stream, position).
Because batch b is a pure function of b, the iterator state is just the next batch index (plus the skip count and
the per-stream slot counts so far, which spare a recount on restore): `DataIterator.get_state()` is a small JSON-able
dict and `set_state()` continues exactly, with or without workers and with any worker count.

Batches are dicts of numpy arrays:
  video (B, T, H, W, 3) float32 in [-1, 1]  T = num_frames (image examples: a frozen video of the target view, or
                                           image_frames frames)
  reference (B, H, W, 3) float32 in [-1, 1]
  mask (B, T, H, W) float32 {0, 1} and has_mask (B,) bool   (with_mask=True; zeros where a record has no mask)
  caption (B,) str, tokens (B, L) int32 if a tokenizer is given, kind (B,) str, stream (B,) str, fps (B,) float32,
  batch_index () int64, num_skipped () int64, global_batch_size () int64 (B summed over the hosts).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import sys
import threading
from typing import Any, Callable, Mapping, Sequence

import grain
import numpy as np

from jaxvc.data import records, transforms

logger = logging.getLogger(__name__)

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    batch_size: int  # global batch size (all hosts)
    image_size: int | tuple[int, int] = 32
    num_frames: int = 8
    frame_stride: int = 1
    # clips at about this many fps: each video record's stride from its own fps (transforms.clip_stride); records
    # without an fps, and None or 0 here, use frame_stride
    target_fps: float | None = None
    image_frames: int | None = None  # target frames for image / image_pair examples (None: num_frames, frozen)
    weights: Mapping[str, float] | None = None  # stream name -> weight (default: equal)
    switch: bool = False  # True: one stream per batch (whole batch of one kind); False: one draw per example
    fixed_split: bool = False  # True: every batch holds each stream's share of the slots (weights x batch_size)
    # stream -> global batch size of the batches that draw it (switch=True only; streams not named: batch_size)
    batch_sizes: Mapping[str, int] | None = None
    shuffle: bool = True
    clip_position: str = "random"  # "random" | "center" | "start"
    reference: str = "random"  # see transforms.REFERENCE_MODES
    reference_candidates: tuple[int, ...] = (0, 9, 18, 27, 36, 45)
    highlight: bool = True  # outside-mask pixels of the reference set to white where a mask exists
    center_reference: bool = False  # shift the highlighted subject to the centre (where a mask exists)
    hflip: float = 0.5  # reference augmentation
    affine_degrees: float = 10.0
    affine_translate: float = 0.1
    affine_scale: tuple[float, float] = (0.9, 1.1)
    reference_fill: int = 255
    random_crop: bool = True
    swap_pair: bool = True  # randomly pick which view of a pair is the reference (else view 0)
    with_mask: bool = True
    target_hflip: float = 0.0  # image examples' targets (and masks) flipped left-right with this probability
    rescale: tuple[str, ...] = ()  # streams whose image targets get CustomCrafter's zoom (transforms.rescale_subject)
    rescale_fill: int = 0  # the zoomed-out image's surround (black)
    rescale_mask_inset: int = 8  # pixels the zoomed-out loss box keeps off its edges (one SD latent cell)
    # stream -> subject phrase: that stream's records without a caption get one of caption_templates with it
    # (CustomCrafter: {"instance": "<new1> dog", "prior": "dog"}); records with captions keep theirs
    caption_phrases: Mapping[str, str] | None = None
    caption_templates: tuple[str, ...] = transforms.CAPTION_TEMPLATES
    seed: int = 0
    max_retries: int = 8  # substitutes tried for an unreadable record before giving up
    num_batches: int | None = None  # None: endless

    @property
    def size(self) -> tuple[int, int]:
        s = self.image_size
        return (int(s), int(s)) if isinstance(s, (int, np.integer)) else (int(s[0]), int(s[1]))


def _splitmix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 arrays (wrapping arithmetic): a counter-based hash."""
    x = x.astype(np.uint64)
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
    return x ^ (x >> np.uint64(31))


def hash_uniform(*keys) -> np.ndarray:
    """Uniform [0, 1) numbers from integer keys (arrays broadcast): same keys, same numbers, on every host."""
    arrays = np.broadcast_arrays(*[np.asarray(k, np.int64).astype(np.uint64) for k in keys])
    h = np.full(arrays[0].shape, 0x243F6A8885A308D3, np.uint64)
    for a in arrays:
        h = _splitmix(h ^ a)
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


class _Schedule:
    """Which stream and which stream position every global slot of every batch reads (see module docstring).

    Stream positions need the prefix counts of slots per stream over all earlier batches; they are cached at anchor
    batches (every CHECKPOINT batches from batch 0 or from an anchor given by `anchor`, e.g. a restored iterator
    state), so a long sequential run costs O(G) per batch and a restore costs O(1) when its state carries counts.
    """

    CHECKPOINT = 1024

    def __init__(self, config: DataConfig, weights: np.ndarray, sizes: np.ndarray):
        """sizes: (num_streams,) the global batch size of a batch of each stream (all config.batch_size unless
        switch=True with batch_sizes)."""
        self.config = config
        self.cumulative = np.cumsum(weights / weights.sum())
        self.cumulative[-1] = 1.0
        self.num_streams = len(weights)
        self.sizes = np.asarray(sizes, np.int64)
        self._anchors = {0: np.zeros(self.num_streams, np.int64)}  # batch -> counts before it
        self._lock = threading.Lock()

    def _draw(self, u: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.cumulative, u, side="right").clip(0, self.num_streams - 1)

    def fixed_slots(self) -> np.ndarray:
        """(G,) the stream of each slot under ``fixed_split``: weights x G slots each (largest remainders; ties to
        the earlier stream), in stream order."""
        g = self.config.batch_size
        shares = np.diff(np.concatenate([[0.0], self.cumulative])) * g
        counts = np.floor(shares).astype(np.int64)
        order = sorted(range(self.num_streams), key=lambda s: (-(shares[s] - counts[s]), s))
        for s in order[:g - int(counts.sum())]:
            counts[s] += 1
        return np.repeat(np.arange(self.num_streams), counts)

    def switch_draws(self, start: int, stop: int) -> np.ndarray:
        """(stop - start,) the stream of each whole batch of [start, stop) under ``switch``."""
        return self._draw(hash_uniform(self.config.seed, 1, np.arange(start, stop, dtype=np.int64)))

    def streams(self, start: int, stop: int) -> np.ndarray:
        """(stop - start, G) stream index of every global slot of batches [start, stop) (all of one size G)."""
        g = self.config.batch_size
        b = np.arange(start, stop, dtype=np.int64)[:, None]
        if self.config.fixed_split:
            return np.broadcast_to(self.fixed_slots(), (stop - start, g))
        if self.config.switch:
            if np.any(self.sizes != g):
                raise ValueError("streams(): the batches have per-stream sizes; use batch_streams(b)")
            return np.repeat(self.switch_draws(start, stop)[:, None], g, axis=1)
        return self._draw(hash_uniform(self.config.seed, 2, b, np.arange(g, dtype=np.int64)[None, :]))

    def batch_streams(self, batch: int) -> np.ndarray:
        """(G_b,) the stream of every global slot of ``batch`` (G_b: the drawn stream's size under switch)."""
        if self.config.switch:
            stream = int(self.switch_draws(batch, batch + 1)[0])
            return np.full(int(self.sizes[stream]), stream, np.int64)
        return self.streams(batch, batch + 1)[0]

    def _counts(self, start: int, stop: int) -> np.ndarray:
        if stop <= start:
            return np.zeros(self.num_streams, np.int64)
        if self.config.fixed_split:  # the same slots every batch
            return np.bincount(self.fixed_slots(), minlength=self.num_streams).astype(np.int64) * (stop - start)
        if self.config.switch:  # one draw per batch, G_s slots each
            draws = self.switch_draws(start, stop)
            return np.bincount(draws, minlength=self.num_streams).astype(np.int64) * self.sizes
        return np.bincount(self.streams(start, stop).ravel(), minlength=self.num_streams).astype(np.int64)

    def anchor(self, batch: int, counts) -> None:
        """Record known prefix counts (from a saved state) so positions after `batch` need no recount."""
        counts = np.asarray(counts, np.int64)
        if self.config.switch:  # whole batches: each count is a number of its stream's batches
            fits = counts.shape == (self.num_streams,) and np.all(counts % self.sizes == 0) and (
                (counts // self.sizes).sum() == batch)
        else:
            fits = counts.shape == (self.num_streams,) and counts.sum() == batch * self.config.batch_size
        if not fits:
            raise ValueError(f"stream counts {counts.tolist()} do not fit batch {batch} of size(s) "
                             f"{self.sizes.tolist()} over {self.num_streams} streams")
        with self._lock:
            self._anchors[int(batch)] = counts

    def counts_before(self, batch: int) -> np.ndarray:
        """(num_streams,) slots each stream served in batches [0, batch)."""
        with self._lock:
            start = max(a for a in self._anchors if a <= batch)
            while batch - start >= self.CHECKPOINT:  # cache anchors along the way
                nxt = start + self.CHECKPOINT
                if nxt not in self._anchors:
                    self._anchors[nxt] = self._anchors[start] + self._counts(start, nxt)
                start = nxt
            base = self._anchors[start].copy()
        return base + self._counts(start, batch)

    def slots(self, batch: int) -> list[tuple[int, int]]:
        """(stream, position) for every global slot of `batch`."""
        streams = self.batch_streams(batch)
        next_pos = self.counts_before(batch)
        out = []
        for s in streams:
            out.append((int(s), int(next_pos[s])))
            next_pos[s] += 1
        return out


class BatchDataset(grain.MapDataset):
    """grain.MapDataset whose element b is this host's share of global batch b (a dict of numpy arrays)."""

    def __init__(self, streams: Mapping[str, Any], config: DataConfig, process_index: int | None = None,
                 process_count: int | None = None, tokenizer: Callable[[Sequence[str]], np.ndarray] | None = None,
                 rows: tuple[int, int] | None = None):
        """This host's share of each global batch: `rows` [start, stop) if given (the trainer's host rows), else
        the process_index-th of process_count equal parts (default: jax.process_index() / process_count())."""
        super().__init__()
        if not streams:
            raise ValueError("BatchDataset needs at least one stream")
        if rows is None:
            if process_index is None or process_count is None:
                import jax

                process_index, process_count = jax.process_index(), jax.process_count()
            if config.batch_size % process_count:
                raise ValueError(f"global batch_size {config.batch_size} is not divisible by process_count "
                                 f"{process_count}")
            if not 0 <= process_index < process_count:
                raise ValueError(f"process_index {process_index} outside [0, {process_count})")
            local = config.batch_size // process_count
            rows = (process_index * local, (process_index + 1) * local)
        if not 0 <= rows[0] < rows[1] <= config.batch_size:
            raise ValueError(f"rows {tuple(rows)} are not a non-empty part of the global batch "
                             f"[0, {config.batch_size})")
        self.names = list(streams)
        self.sources = [streams[n] for n in self.names]
        empty = [n for n, s in zip(self.names, self.sources) if len(s) == 0]
        if empty:
            raise ValueError(f"streams {empty} are empty")
        weights = dict.fromkeys(self.names, 1.0) if config.weights is None else dict(config.weights)
        unknown = sorted(set(weights) - set(self.names))
        if unknown or any(n not in weights for n in self.names):
            raise ValueError(f"weights name streams {sorted(weights)}, streams are {self.names}")
        w = np.array([float(weights[n]) for n in self.names])
        if np.any(w < 0) or w.sum() <= 0:
            raise ValueError(f"weights must be >= 0 with a positive sum, got {weights}")
        if config.fixed_split and config.switch:
            raise ValueError("fixed_split (each stream's share in every batch) and switch (one stream per batch) "
                             "exclude each other")
        image_frames = config.image_frames or config.num_frames
        if not config.switch and image_frames != config.num_frames and len(self.names) > 1:
            raise ValueError(f"image_frames={config.image_frames} differs from num_frames={config.num_frames}: "
                             f"examples of different kinds could share a batch; use switch=True or image_frames=None")
        unknown_rescale = sorted(set(config.rescale) - set(self.names))
        if unknown_rescale:
            raise ValueError(f"rescale names streams {unknown_rescale}; the streams are {self.names}")
        unknown_phrases = sorted(set(config.caption_phrases or {}) - set(self.names))
        if unknown_phrases:
            raise ValueError(f"caption_phrases names streams {unknown_phrases}; the streams are {self.names}")
        if config.caption_phrases and not all("{}" in t for t in config.caption_templates):
            raise ValueError(f"caption_templates {tuple(config.caption_templates)}: each needs a {{}} for the "
                             "subject phrase")
        if config.target_fps is not None and config.target_fps < 0:
            raise ValueError(f"target_fps={config.target_fps}: expected frames per second > 0 (None or 0: off)")
        if config.reference not in transforms.REFERENCE_MODES:
            raise ValueError(f"reference={config.reference!r}: expected one of {transforms.REFERENCE_MODES}")
        self.config = config
        self.weights = w / w.sum()
        self.rows = (int(rows[0]), int(rows[1]))
        self.local_batch_size = self.rows[1] - self.rows[0]
        self.sizes = self._stream_batch_sizes(config)
        # this host's rows of a batch of each stream: the same share of G_s as `rows` is of batch_size
        self.stream_rows = [self._scaled_rows(int(g)) for g in self.sizes]
        self.tokenizer = tokenizer
        self._schedule = _Schedule(config, self.weights, self.sizes)
        if config.fixed_split:  # a stream given a weight but no slot would never be read (prior preservation off)
            slots = np.bincount(self._schedule.fixed_slots(), minlength=len(self.names))
            starved = [n for n, weight, count in zip(self.names, w, slots) if weight > 0 and count == 0]
            if starved:
                raise ValueError(f"fixed_split: batch_size {config.batch_size} gives stream(s) {starved} no slot of "
                                 f"a batch (weights {weights}, slots per batch "
                                 f"{dict(zip(self.names, slots.tolist()))}); raise batch_size or the weight")

    def _stream_batch_sizes(self, config: DataConfig) -> np.ndarray:
        """(num_streams,) the global size of a batch of each stream (config.batch_sizes, else batch_size)."""
        sizes = dict(config.batch_sizes or {})
        if not sizes:
            return np.full(len(self.names), config.batch_size, np.int64)
        unknown = sorted(set(sizes) - set(self.names))
        if unknown:
            raise ValueError(f"batch_sizes names streams {unknown}; the streams are {self.names}")
        if not config.switch:
            raise ValueError(f"batch_sizes {sizes} needs switch=True (one stream per batch): with per-example draws "
                             "or fixed_split the streams share each batch")
        bad = {n: g for n, g in sizes.items() if int(g) != g or int(g) < 1}
        if bad:
            raise ValueError(f"batch_sizes {bad}: each stream's global batch size must be a positive integer")
        return np.array([int(sizes.get(n, config.batch_size)) for n in self.names], np.int64)

    def _scaled_rows(self, size: int) -> tuple[int, int]:
        """This host's rows of a global batch of ``size``: rows x size / batch_size, which must be whole."""
        g = self.config.batch_size
        start, stop = self.rows[0] * size, self.rows[1] * size
        if start % g or stop % g:
            raise ValueError(f"a global batch of {size} does not split over the hosts as batch_size {g} does (this "
                             f"host has rows {list(self.rows)} of {g}); make every stream's batch size a multiple "
                             f"of the number of hosts")
        return start // g, stop // g

    # ------------------------------------------------------------------------------------------------ grain API
    def __len__(self) -> int:
        return sys.maxsize if self.config.num_batches is None else int(self.config.num_batches)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self.batch(int(index))

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_schedule"] = None  # holds a lock; rebuilt on the other side with its cached counts
        state["_anchors"] = dict(self._schedule._anchors)
        return state

    def __setstate__(self, state):
        anchors = state.pop("_anchors")
        self.__dict__.update(state)
        self._schedule = _Schedule(self.config, self.weights, self.sizes)
        self._schedule._anchors.update(anchors)

    def stream_counts(self, batch: int) -> list[int]:
        """Slots each stream served before `batch` (saved with the iterator state to make restoring O(1))."""
        return self._schedule.counts_before(batch).tolist()

    def fingerprint(self) -> str:
        """Identifies the data order: config and streams (not the host or worker layout)."""
        config = dataclasses.asdict(self.config)
        for key in ("batch_sizes", "target_fps"):  # unset (target_fps 0: off too): as runs saved before the fields
            if not config[key]:
                del config[key]
        desc = {"config": config, "streams": [[n, len(s)] for n, s in zip(self.names, self.sources)]}
        return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()[:16]

    # --------------------------------------------------------------------------------------------------- batches
    def record_index(self, stream: int, position: int, attempt: int = 0) -> int:
        """Record read at a stream position: pass e = position // N in a permutation seeded by (seed, stream, e);
        attempt > 0 picks a deterministic substitute for an unreadable record."""
        n = len(self.sources[stream])
        epoch, i = divmod(position, n)
        if attempt:
            return int(hash_uniform(self.config.seed, 3, stream, position, attempt) * n) % n
        if not self.config.shuffle or n == 1:
            return i
        seed = int(hash_uniform(self.config.seed, 4, stream, epoch) * (1 << 31))
        return int(grain.experimental.index_shuffle(i, max_index=n - 1, seed=seed, rounds=4))

    def batch(self, index: int) -> dict:
        slots = self._schedule.slots(index)
        start, stop = self.stream_rows[slots[0][0]]  # self.rows unless a switched stream has its own size
        examples, skipped = [], 0
        for stream, position in slots[start:stop]:
            example, failures = self._example(stream, position)
            examples.append(example)
            skipped += failures
        out = {key: np.stack([e[key] for e in examples]) for key in examples[0] if key not in ("caption", "kind",
                                                                                             "stream")}
        for key in ("caption", "kind", "stream"):
            out[key] = np.array([e[key] for e in examples])
        if self.tokenizer is not None:
            out["tokens"] = np.asarray(self.tokenizer(list(out["caption"])))
        out["batch_index"] = np.int64(index)
        out["num_skipped"] = np.int64(skipped)
        out["global_batch_size"] = np.int64(len(slots))
        return out

    def _example(self, stream: int, position: int) -> tuple[dict, int]:
        source = self.sources[stream]
        error = None
        for attempt in range(self.config.max_retries + 1):
            idx = self.record_index(stream, position, attempt)
            try:
                example = source[idx]
                rng = np.random.default_rng([self.config.seed, stream, position, attempt])
                out = self.transform(example, rng, self.names[stream])
                out["stream"] = self.names[stream]
                return out, attempt
            except Exception as e:  # a bad record is skipped, never fatal
                error = e
                logger.warning("skipping unreadable record %d of stream %r: %s: %s", idx, self.names[stream],
                               type(e).__name__, e)
        raise records.CorruptRecordError(
            f"stream {self.names[stream]!r}: {self.config.max_retries + 1} records in a row could not be read "
            f"(around position {position}); the data looks broken. Last error: {type(error).__name__}: {error}"
        ) from error

    def transform(self, example: dict, rng: np.random.Generator, stream: str = "") -> dict:
        """One example of ``stream`` -> {video, reference, mask, has_mask, caption, kind, fps}."""
        cfg = self.config
        size = cfg.size
        kind = example["kind"]
        n = records.num_frames(example)
        captions = list(example.get("captions") or [])
        phrase = (cfg.caption_phrases or {}).get(stream)
        if not captions and phrase:  # an uncaptioned image of a templated stream (CustomCrafter's instances)
            captions = [transforms.templated_caption(phrase, rng, tuple(cfg.caption_templates))]
        has_mask = example.get("mask") is not None
        provided = self._provided_reference(example, rng) if cfg.reference == "provided" else None
        if kind == "video":
            stride = transforms.clip_stride(example.get("fps"), cfg.frame_stride, cfg.target_fps)
            clip = transforms.sample_clip(n, cfg.num_frames, stride, rng, cfg.clip_position)
            ref_index = int(clip[0]) if provided is not None else transforms.choose_reference(
                clip, n, rng, cfg.reference, cfg.reference_candidates)
            unique, inverse = np.unique(np.append(clip, ref_index), return_inverse=True)
            frames = records.decode_frames(example, unique, min_size=size)
            if isinstance(frames, list):
                raise records.CorruptRecordError(f"{example.get('source')}: video frames differ in size")
            masks = records.decode_mask(example, unique) if has_mask else None
            frames_hw = frames.shape[1:3]
            box = transforms.crop_box(frames.shape[1], frames.shape[2], size, rng, cfg.random_crop)
            frames = transforms.resize_crop(frames, size, box)
            if has_mask:  # frames may have been decoded at a reduced scale: map the box onto the mask's grid
                mask_box = transforms.scale_box(box, frames_hw, masks.shape[1:3])
                masks = transforms.resize_crop_mask(masks, size, mask_box)
            target, reference = frames[inverse[:-1]], frames[inverse[-1]]
            target_mask = masks[inverse[:-1]] if has_mask else None
            ref_mask = masks[inverse[-1]] if has_mask else None
            caption = captions[int(rng.integers(len(captions)))] if captions else ""
        elif kind in ("image", "image_pair"):
            views = [0, 0] if kind == "image" else ([1, 0] if cfg.swap_pair and rng.random() < 0.5 else [0, 1])
            ref_view, target_view = views
            decoded, decoded_masks = [], []
            for v in sorted(set(views)):
                img = records.decode_frames(example, [v], min_size=size)[0]
                box = transforms.crop_box(img.shape[0], img.shape[1], size, rng, cfg.random_crop)
                decoded.append((v, transforms.resize_crop(img[None], size, box)[0]))
                if has_mask:
                    m = records.decode_mask(example, [v])[0]
                    m_box = transforms.scale_box(box, img.shape[:2], m.shape)
                    decoded_masks.append((v, transforms.resize_crop_mask(m[None], size, m_box)[0]))
            images, view_masks = dict(decoded), dict(decoded_masks)
            reference, ref_mask = images[ref_view], view_masks.get(ref_view)
            prefix = ""
            if cfg.target_hflip and rng.random() < cfg.target_hflip:
                images[target_view] = np.ascontiguousarray(images[target_view][:, ::-1])
                if target_view in view_masks:
                    view_masks[target_view] = np.ascontiguousarray(view_masks[target_view][:, ::-1])
            if stream in cfg.rescale:  # the loss mask becomes the rescaled subject's region (every record has one)
                images[target_view], view_masks[target_view], prefix = transforms.rescale_subject(
                    images[target_view], view_masks.get(target_view), rng, fill=cfg.rescale_fill,
                    inset=cfg.rescale_mask_inset)
                has_mask = True
            t = cfg.image_frames or cfg.num_frames
            target = transforms.frozen_video(images[target_view], t)
            target_mask = transforms.frozen_video(view_masks[target_view], t) if has_mask else None
            if kind == "image_pair" and len(captions) >= 2:
                caption = captions[target_view]
            else:
                caption = captions[int(rng.integers(len(captions)))] if captions else ""
            caption = prefix + caption
        else:
            raise records.CorruptRecordError(f"{example.get('source')}: unknown kind {kind!r}")
        if provided is not None:  # already the subject alone (no mask: neither highlighted nor centred again)
            reference, ref_mask = provided, None
        if cfg.highlight and ref_mask is not None:
            reference = transforms.highlight_subject(reference, ref_mask)
        if cfg.center_reference and ref_mask is not None:
            reference = transforms.center_subject(reference, ref_mask, cfg.reference_fill)
        reference = transforms.augment_reference(reference, rng, cfg.hflip, cfg.affine_degrees, cfg.affine_translate,
                                                 tuple(cfg.affine_scale), cfg.reference_fill)
        out = {"video": transforms.to_signed_float(target), "reference": transforms.to_signed_float(reference),
               "caption": caption, "kind": kind, "fps": np.float32(example.get("fps", 0.0))}
        if cfg.with_mask:
            out["mask"] = (target_mask.astype(np.float32) if has_mask
                           else np.zeros(target.shape[:3], np.float32))
            out["has_mask"] = np.bool_(has_mask)
        return out


    def _provided_reference(self, example: dict, rng: np.random.Generator) -> np.ndarray:
        """(H, W, 3) uint8: a random one of the record's own reference images, resized to cover the frame size and
        centre-cropped, as `jaxvc generate` prepares a reference (a random crop could cut the subject off)."""
        count = len(example.get("references") or [])
        if not count:
            raise records.CorruptRecordError(
                f"{example.get('source')}: no reference images (data.reference='provided' reads each record's own: "
                f"`jaxvc pack` takes them from <stem>.ref.<ext> files or a manifest's \"references\")")
        image = records.decode_references(example, [int(rng.integers(count))], min_size=self.config.size)[0]
        box = transforms.crop_box(image.shape[0], image.shape[1], self.config.size, rng, random=False)
        return transforms.resize_crop(image[None], self.config.size, box)[0]


def _ensure_absl_flags() -> None:
    """Grain's worker code reads absl flags; a program that never parsed them (pytest, a notebook) would fail."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class DataIterator:
    """Iterator over a BatchDataset with grain threads/workers and an exactly restorable, JSON-able state."""

    STATE_VERSION = 1

    def __init__(self, dataset: BatchDataset, worker_count: int = 0, worker_buffer_size: int = 2,
                 read_threads: int = 1, prefetch: int = 2, start_batch: int = 0):
        self.dataset = dataset
        self.worker_count = int(worker_count)
        self.worker_buffer_size = int(worker_buffer_size)
        self.read_threads = int(read_threads)
        self.prefetch = int(prefetch)
        self.skipped = 0
        self._iterator = None
        self._start(start_batch)

    def _start(self, batch: int) -> None:
        self.close()
        _ensure_absl_flags()
        self._next_batch = int(batch)
        ds = self.dataset[batch:] if batch else self.dataset
        ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=self.read_threads, prefetch_buffer_size=self.prefetch))
        if self.worker_count > 0:
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.worker_count,
                                                             per_worker_buffer_size=self.worker_buffer_size))
        self._iterator = iter(ds)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self._iterator)
        if self.worker_count > 0:
            # Worker outputs are views of shared-memory blocks released when the view dies; a plain copy (cheap next
            # to decoding) keeps a consumer that holds batches from pinning them.
            batch = {k: np.array(v) for k, v in batch.items()}
        self._next_batch = int(batch["batch_index"]) + 1
        self.skipped += int(batch["num_skipped"])
        return batch

    def get_state(self) -> dict:
        return {"version": self.STATE_VERSION, "next_batch": self._next_batch, "skipped": self.skipped,
                "fingerprint": self.dataset.fingerprint(),
                "stream_counts": self.dataset.stream_counts(self._next_batch)}

    def set_state(self, state: Mapping) -> None:
        if state.get("version") != self.STATE_VERSION:
            raise ValueError(f"data iterator state version {state.get('version')!r}, expected {self.STATE_VERSION}")
        if state.get("fingerprint") != self.dataset.fingerprint():
            raise ValueError("data iterator state was saved for a different data config or different streams "
                             f"(fingerprint {state.get('fingerprint')} != {self.dataset.fingerprint()}); restoring it "
                             "would not continue the same sequence")
        self.skipped = int(state["skipped"])
        if "stream_counts" in state:
            self.dataset._schedule.anchor(int(state["next_batch"]), state["stream_counts"])
        self._start(int(state["next_batch"]))

    def close(self) -> None:
        if self._iterator is not None and hasattr(self._iterator, "close"):
            self._iterator.close()
        self._iterator = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def make_pipeline(streams: Mapping[str, Any], config: DataConfig, *, process_index: int | None = None,
                  process_count: int | None = None, rows: tuple[int, int] | None = None,
                  tokenizer: Callable | None = None, worker_count: int = 0, worker_buffer_size: int = 2,
                  read_threads: int = 1, prefetch: int = 2) -> DataIterator:
    """The training input: streams (name -> source) mixed per `config`, this host's share of each global batch
    (rows, or process_index of process_count). tokenizer: captions -> int array; with workers it must pickle."""
    dataset = BatchDataset(streams, config, process_index, process_count, tokenizer, rows)
    return DataIterator(dataset, worker_count, worker_buffer_size, read_threads, prefetch)
