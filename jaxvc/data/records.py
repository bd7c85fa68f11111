"""The example format every source yields and the packed record format `jaxvc pack` writes.

An *example* is a dict:
  kind      "video" | "image" | "image_pair"
  frames    np.ndarray (N, H, W, 3) uint8, or a list of per-frame entries (encoded JPEG/PNG bytes, or a raw entry
            {"shape": [H, W, 3], "data": bytes}); decoded lazily by `decode_frames`, so a pipeline decodes only the
            frames it samples. image: N = 1; image_pair: N = 2 (the two views); video: N frames.
  mask      None, np.ndarray (N, H, W) bool, or a list of per-frame packed masks {"shape": [H, W], "bits": bytes}
  captions  list[str] (a video may have several; an image pair has one per view; may be empty: unannotated)
  fps       float (0 for images)
  source    str (file path or generator description)
  references  optional: reference images that come with the example (a list like `frames`, one entry per image),
            e.g. the VideoBooth dataset's segmented subject images; the pipeline's reference="provided" reads one

A *record* is one example serialised with msgpack (`serialize_example` / `deserialize_record`), frames stored as
JPEG (compact), PNG (lossless) or raw uint8, masks bit-packed. `deserialize_record` raises `CorruptRecordError`
for anything that is not a well-formed record, so pipelines can skip and count it.
"""
from __future__ import annotations

from typing import Sequence

import msgpack
import numpy as np

from jaxvc.data import media

RECORD_FORMAT = "jaxvc.record/1"
KINDS = ("video", "image", "image_pair")
FRAME_FORMATS = ("jpeg", "png", "raw")


class CorruptRecordError(ValueError):
    """A record or example that cannot be read (bad bytes, missing fields, undecodable frames)."""


# ---------------------------------------------------------------------------------------------------- frames
def _encode_frame(frame: np.ndarray, fmt: str, quality: int):
    frame = np.ascontiguousarray(frame, np.uint8)
    if frame.ndim != 3 or frame.shape[-1] != 3:
        raise ValueError(f"frames must be (H, W, 3) uint8, got {frame.shape}")
    if fmt == "raw":
        return {"shape": list(frame.shape), "data": frame.tobytes()}
    return media.encode_image(frame, fmt, quality)


def _pack_mask(mask: np.ndarray) -> dict:
    mask = np.asarray(mask, bool)
    return {"shape": list(mask.shape), "bits": np.packbits(mask.ravel()).tobytes()}


def _unpack_mask(entry: dict) -> np.ndarray:
    shape = tuple(entry["shape"])
    bits = np.frombuffer(entry["bits"], np.uint8)
    return np.unpackbits(bits, count=int(np.prod(shape))).reshape(shape).astype(bool)


def num_frames(example: dict) -> int:
    return len(example["frames"])


def decode_frames(example: dict, indices: Sequence[int] | None = None,
                  min_size: tuple[int, int] | None = None) -> np.ndarray:
    """The example's frames at `indices` (default all) as (K, H, W, 3) uint8. Frames of different sizes (possible
    across the two views of a pair) come back as a list instead. min_size lets JPEG decode at a reduced scale."""
    frames = example["frames"]
    indices = range(len(frames)) if indices is None else indices
    if isinstance(frames, np.ndarray):
        return frames[np.asarray(indices, np.int64)]
    out = []
    for i in indices:
        entry = frames[int(i)]
        try:
            if isinstance(entry, dict):
                arr = np.frombuffer(entry["data"], np.uint8).reshape(entry["shape"])
            elif isinstance(entry, np.ndarray):
                arr = entry
            else:
                arr = media.decode_image(entry, min_size)
        except Exception as e:
            raise CorruptRecordError(f"{example.get('source', '?')}: frame {i} cannot be decoded "
                                     f"({type(e).__name__}: {e})") from e
        out.append(arr)
    if len({a.shape for a in out}) == 1:
        return np.stack(out)
    return out


def decode_references(example: dict, indices: Sequence[int], min_size: tuple[int, int] | None = None) -> list:
    """The example's provided reference images at `indices`, each (H, W, 3) uint8 (sizes may differ)."""
    references = example.get("references") or []
    frames = decode_frames({"frames": references, "source": f"{example.get('source', '?')} (references)"},
                           indices, min_size)
    return list(frames)


def decode_mask(example: dict, indices: Sequence[int] | None = None):
    """The example's masks at `indices` as (K, H, W) bool, or None when the example has no mask."""
    masks = example.get("mask")
    if masks is None:
        return None
    indices = range(len(masks)) if indices is None else indices
    if isinstance(masks, np.ndarray):
        return masks[np.asarray(indices, np.int64)].astype(bool)
    out = [m if isinstance(m, np.ndarray) else _unpack_mask(m) for m in (masks[int(i)] for i in indices)]
    return np.stack(out) if len({m.shape for m in out}) == 1 else out


def validate_example(example: dict) -> dict:
    """Check an example's fields; raises CorruptRecordError naming the source and the problem."""
    source = example.get("source", "?")
    kind = example.get("kind")
    if kind not in KINDS:
        raise CorruptRecordError(f"{source}: kind {kind!r} is not one of {KINDS}")
    n = len(example.get("frames", ()))
    expected = {"image": 1, "image_pair": 2}.get(kind)
    if n == 0 or (expected is not None and n != expected):
        raise CorruptRecordError(f"{source}: {kind} has {n} frames (expected {expected or '>= 1'})")
    mask = example.get("mask")
    if mask is not None and len(mask) != n:
        raise CorruptRecordError(f"{source}: {len(mask)} masks for {n} frames")
    captions = example.get("captions", [])
    if not isinstance(captions, (list, tuple)) or not all(isinstance(c, str) for c in captions):
        raise CorruptRecordError(f"{source}: captions must be a list of strings, got {captions!r}")
    references = example.get("references")
    if references is not None and not isinstance(references, (list, tuple, np.ndarray)):
        raise CorruptRecordError(f"{source}: references must be a list of images, got {type(references).__name__}")
    return example


# ------------------------------------------------------------------------------------------- serialisation
def serialize_example(example: dict, frame_format: str = "jpeg", quality: int = 90) -> bytes:
    """Example -> record bytes. Frames already encoded (bytes) are kept as they are."""
    if frame_format not in FRAME_FORMATS:
        raise ValueError(f"frame_format must be one of {FRAME_FORMATS}, got {frame_format!r}")
    validate_example(example)
    frames = [f if isinstance(f, (bytes, dict)) else _encode_frame(f, frame_format, quality)
              for f in example["frames"]]
    mask = example.get("mask")
    if mask is not None:
        mask = [m if isinstance(m, dict) else _pack_mask(m) for m in mask]
    record = {"format": RECORD_FORMAT, "kind": example["kind"], "frames": frames, "mask": mask,
              "captions": list(example.get("captions", [])), "fps": float(example.get("fps", 0.0)),
              "source": str(example.get("source", ""))}
    if example.get("references") is not None and len(example["references"]):  # optional: older records lack it
        record["references"] = [r if isinstance(r, (bytes, dict)) else _encode_frame(r, frame_format, quality)
                                for r in example["references"]]
    return msgpack.packb(record, use_bin_type=True)


def deserialize_record(data: bytes, where: str = "record") -> dict:
    """Record bytes -> example (frames still encoded). Raises CorruptRecordError naming `where`."""
    try:
        record = msgpack.unpackb(data, raw=False)
    except Exception as e:
        raise CorruptRecordError(f"{where}: not a msgpack record ({type(e).__name__}: {e})") from e
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        got = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise CorruptRecordError(f"{where}: record format {got!r}, expected {RECORD_FORMAT!r}")
    for key in ("kind", "frames", "captions", "fps", "source"):
        if key not in record:
            raise CorruptRecordError(f"{where}: record has no {key!r} field")
    record.pop("format")
    record["source"] = record["source"] or where
    return validate_example(record)
