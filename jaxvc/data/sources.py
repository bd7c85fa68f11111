"""Random-access data sources yielding examples (`jaxvc.data.records`): shards written by `jaxvc pack`, TFDS
datasets through their ArrayRecord data sources (no TensorFlow needed), folders/manifests read directly, and
concatenations. The synthetic world's sources live in `jaxvc.data.synthetic`.

A source is anything with `__len__` and `__getitem__(i) -> example`; it must pickle (Grain worker processes get a
copy). Reading errors surface as exceptions from `__getitem__`; the pipeline skips and counts them.
"""
from __future__ import annotations

import bisect
import glob
import json
import os
from typing import Mapping, Sequence

import numpy as np

from jaxvc.data.records import KINDS, CorruptRecordError, deserialize_record, validate_example


def _unreadable_shards(paths: Sequence[str]) -> list[str]:
    """The shard files an ArrayRecord reader cannot open on their own."""
    from grain.sources import ArrayRecordDataSource

    bad = []
    for path in paths:
        try:
            ArrayRecordDataSource([path])
        except RuntimeError:
            bad.append(path)
    return bad


class PackedSource:
    """Records packed by `jaxvc pack` in `directory` (kinds: which kinds to read, default all), or an explicit list
    of shard files / a glob pattern."""

    def __init__(self, directory: str | Sequence[str], kinds: Sequence[str] | str | None = None):
        if isinstance(kinds, str):
            kinds = [kinds]
        if isinstance(directory, str) and os.path.isdir(directory):
            info_path = os.path.join(directory, "dataset_info.json")
            if not os.path.isfile(info_path):
                raise FileNotFoundError(f"{directory}: no dataset_info.json (was it written by `jaxvc pack`, and did "
                                        f"the packing finish?)")
            with open(info_path) as f:
                info = json.load(f)
            wanted = list(info["kinds"]) if kinds is None else list(kinds)
            unknown = [k for k in wanted if k not in KINDS]
            if unknown:
                raise ValueError(f"kinds {unknown} are not record kinds {KINDS}")
            paths = [os.path.join(directory, s) for k in wanted for s in info["kinds"].get(k, {}).get("shards", [])]
            self.description = f"{directory} ({', '.join(wanted)})"
        else:
            paths = sorted(glob.glob(directory)) if isinstance(directory, str) else [str(p) for p in directory]
            where = directory if isinstance(directory, str) else (os.path.dirname(paths[0]) if paths else "none")
            self.description = paths[0] if len(paths) == 1 else f"{len(paths)} shards in {where}"
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"shard files missing: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        # Empty shards (every file of a shard was unreadable) would trip the ArrayRecord reader: leave them out.
        self.paths = [p for p in paths if os.path.getsize(p) > 0]
        from grain.sources import ArrayRecordDataSource

        try:
            self._source = ArrayRecordDataSource(self.paths) if self.paths else None
        except RuntimeError as error:  # the reader opens every shard: find which are not whole ArrayRecord files
            raise ValueError(f"unreadable shard(s) {_unreadable_shards(self.paths)[:5]} (truncated or corrupt; "
                             f"copy them again, or pack again): {' '.join(str(error).split())[:200]}") from error
        self._len = len(self._source) if self._source is not None else 0

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict:
        if not 0 <= int(index) < self._len:
            raise IndexError(f"index {index} outside [0, {self._len}) of {self.description}")
        return deserialize_record(self._source[int(index)], where=f"{self.description}[{index}]")

    def __repr__(self) -> str:
        return f"PackedSource({self.description}, {self._len} records)"


def _as_str(value) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray) and value.shape == ():
        return _as_str(value.item())
    return str(value)


class TfdsSource:
    """A TFDS dataset through `tfds.data_source` (ArrayRecord file format, read without TensorFlow).

    Give `name` (+ `data_dir`) or `builder_dir` (a prepared dataset's version folder). `kind` says what the records
    are; `fields` maps our example fields to feature keys:
      video: {"frames": "video", "captions": "caption", "mask": None}   (video feature (N, H, W, 3))
      image: {"frames": "image", "captions": "caption"}                 (image feature (H, W, 3))
      image_pair: {"frames": ["image_0", "image_1"], "captions": ["description_0", "description_1"]}
    A caption field may hold one string or a sequence of strings; fps comes from `fps_field` or `fps`.
    """

    DEFAULT_FIELDS = {"video": {"frames": "video", "captions": "caption"},
                      "image": {"frames": "image", "captions": "caption"},
                      "image_pair": {"frames": ["image_0", "image_1"], "captions": ["description_0", "description_1"]}}

    def __init__(self, name: str | None = None, split: str = "train", data_dir: str | None = None,
                 builder_dir: str | None = None, kind: str = "video", fields: Mapping | None = None,
                 fps: float = 0.0, fps_field: str | None = None):
        import tensorflow_datasets as tfds

        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if builder_dir is not None:
            self._source = tfds.builder_from_directory(builder_dir).as_data_source(split=split)
            self.description = f"tfds:{builder_dir}:{split}"
        elif name is not None:
            self._source = tfds.data_source(name, split=split, data_dir=data_dir)
            self.description = f"tfds:{name}:{split}"
        else:
            raise ValueError("TfdsSource needs a dataset name or a builder_dir")
        self.kind = kind
        self.fields = dict(self.DEFAULT_FIELDS[kind] if fields is None else fields)
        self.fps, self.fps_field = float(fps), fps_field

    def __len__(self) -> int:
        return len(self._source)

    def _get(self, raw: dict, key: str, index: int):
        if key not in raw:
            raise CorruptRecordError(f"{self.description}[{index}]: no feature {key!r} (has {sorted(raw)}); "
                                     f"set TfdsSource(fields=...)")
        return raw[key]

    def __getitem__(self, index: int) -> dict:
        raw = self._source[int(index)]
        frames_key = self.fields["frames"]
        if isinstance(frames_key, (list, tuple)):
            frames = [np.asarray(self._get(raw, k, index), np.uint8) for k in frames_key]
        else:
            frames = np.asarray(self._get(raw, frames_key, index), np.uint8)
            if frames.ndim == 3:
                frames = frames[None]
        caption_key = self.fields.get("captions")
        captions: list[str] = []
        for key in ([caption_key] if isinstance(caption_key, str) else list(caption_key or [])):
            value = self._get(raw, key, index)
            if isinstance(value, (list, tuple)) or (isinstance(value, np.ndarray) and value.ndim > 0):
                captions += [_as_str(v) for v in value]
            else:
                captions.append(_as_str(value))
        mask = None
        if self.fields.get("mask"):
            mask = np.asarray(self._get(raw, self.fields["mask"], index)).astype(bool)
            if mask.ndim == 4:
                mask = mask[..., 0]
        fps = float(self._get(raw, self.fps_field, index)) if self.fps_field else self.fps
        return validate_example({"kind": self.kind, "frames": frames, "mask": mask, "captions": captions,
                                 "fps": fps, "source": f"{self.description}[{index}]"})


class FolderSource:
    """Media files read directly (no packing): a folder or JSONL manifest, interpreted like `jaxvc pack` does.
    Decoding happens in `__getitem__`, so it suits small datasets; pack large ones."""

    def __init__(self, path: str, split_panels: bool = False, max_frames: int | None = None, frame_stride: int = 1,
                 short_side: int | None = None):
        from jaxvc.data import pack

        self.items = pack.scan_folder(path, split_panels) if os.path.isdir(path) else pack.read_manifest(
            path, split_panels)
        self.options = {"max_frames": max_frames, "frame_stride": frame_stride, "short_side": short_side}
        self.description = path

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        from jaxvc.data import pack

        return validate_example(pack.load_item(self.items[int(index)], self.options))


class ConcatSource:
    """Several sources read as one (indices run through them in order)."""

    def __init__(self, sources: Sequence):
        self.sources = list(sources)
        self._starts = list(np.cumsum([0] + [len(s) for s in self.sources]))

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} outside [0, {len(self)})")
        k = bisect.bisect_right(self._starts, index) - 1
        return self.sources[k][index - int(self._starts[k])]


class ListSource:
    """Examples held in memory (a list of example dicts), e.g. a handful of reference videos or a test fixture."""

    def __init__(self, examples: Sequence[dict]):
        self.examples = [validate_example(e) for e in examples]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        return self.examples[int(index)]
