"""Build the training input from a config: `from_config(config, rows)` is the data-source entry point the trainer
calls (register it as e.g. DATA_SOURCES["grain"] = "jaxvc.data.build:from_config"); `streams_from_config(config)`
opens and checks the streams alone (`jaxvc train` does that before it loads the model: DATA_STREAMS).

It reads `config.batch_size` (global) and `config.data`:
  streams        {name: spec}; spec is one of
                   "synthetic:pairs" | "synthetic:videos"          the built-in world (config.data.synthetic)
                   "packed:DIR" | "packed:DIR:KIND[,KIND]"          shards from `jaxvc pack`
                   "tfds:NAME:SPLIT[:KIND]"                         TFDS ArrayRecord (data_dir = config.data.tfds_dir)
                   "folder:PATH"                                    media folder / JSONL manifest read directly
                   "none"                                           an optional stream switched off (its weight
                                                                    is dropped too)
  weights        {name: weight} (default equal); switch: True for one stream per batch (method (e): p = weight)
  batch_sizes    {name: global batch size} of a switched stream's batches (method (e): 8 image pairs, 6 videos
                 per device); streams not named take config.batch_size
  image_size, num_frames, frame_stride, target_fps, image_frames, reference, reference_candidates, highlight,
  hflip, affine_degrees, affine_translate, affine_scale, random_crop, with_mask, seed, clip_position, swap_pair
                 `DataConfig` fields (only the ones present are read); image_width (tied to model.image_width):
                 frames of image_size x image_width (height x width), square if None; target_fps: each video's
                 clip stride round(its fps / target_fps), frame_stride for records without an fps
  workers, read_threads, prefetch  Grain worker processes / threads / prefetch depth
  synthetic      {image_size, num_frames, num_subjects, held_out, seed, records, split ("train" | "held_out")}
"""
from __future__ import annotations

import dataclasses
import glob
import os

from jaxvc.config_utils import ConfigError
from jaxvc.data.pipeline import BatchDataset, DataConfig, DataIterator, make_pipeline


def _get(cfg, key, default=None):
    if cfg is None:
        return default
    if hasattr(cfg, "get"):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def _plain(value):
    """ConfigDict / FrozenConfigDict / tuples -> plain dicts and tuples."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_plain(v) for v in value)
    return value


class DataSourceError(ConfigError):
    """A training stream that cannot be used: a malformed spec, or a source that does not exist or holds no records.
    The message names the config key (``config.data.streams.video = 'folder:/x': no such folder or manifest``), so
    ``jaxvc train`` reports it in one line, and before it loads any weights."""


SPEC_FORMS = "synthetic:pairs|videos, packed:DIR[:KIND,...], tfds:NAME:SPLIT[:KIND], folder:PATH or none"


def open_packed(path: str, kinds, where: str):
    """PackedSource(path, kinds) with its input errors (no such folder, no dataset_info.json, missing shards, unknown
    kinds) as DataSourceError prefixed by ``where`` (the config key and value)."""
    from jaxvc.data.sources import PackedSource

    if not os.path.isdir(path) and not glob.glob(path):  # a PackedSource of no shards would just be empty
        raise DataSourceError(f"{where}: no such folder, and no shard files match it")
    try:
        return PackedSource(path, kinds)
    except (OSError, ValueError) as err:  # what it raises for a folder `jaxvc pack` did not (fully) write
        raise DataSourceError(f"{where}: {err}") from err


def build_source(spec: str, data_cfg=None, key: str | None = None):
    """One source from a spec string (see the module docstring). ``key``: the config key the spec came from, named
    in the DataSourceError of a malformed spec or a missing or unreadable folder."""
    where = f"{key} = {spec!r}" if key else f"stream spec {spec!r}"
    kind, _, rest = str(spec).partition(":")
    if kind == "synthetic":
        from jaxvc.data.synthetic import SyntheticPairSource, SyntheticVideoSource, SyntheticWorld

        syn = _plain(_get(data_cfg, "synthetic", None)) or {}
        world = SyntheticWorld(image_size=syn.get("image_size", _get(data_cfg, "image_size", 32)),
                               num_frames=syn.get("num_frames", _get(data_cfg, "num_frames", 8)),
                               num_subjects=syn.get("num_subjects", 64), held_out=syn.get("held_out", 8),
                               seed=syn.get("seed", 0))
        ids = world.held_out_subject_ids if syn.get("split", "train") == "held_out" else world.train_subject_ids
        records = syn.get("records", 4096)
        if rest == "pairs":
            return SyntheticPairSource(world, ids, records, seed=syn.get("seed", 0))
        if rest == "videos":
            return SyntheticVideoSource(world, ids, records, seed=syn.get("seed", 0))
        raise DataSourceError(f"{where}: expected synthetic:pairs or synthetic:videos")
    if kind == "packed":
        path, _, kinds = rest.partition(":")
        return open_packed(path, kinds.split(",") if kinds else None, where)
    if kind == "tfds":
        from jaxvc.data.sources import TfdsSource

        from jaxvc.data.records import KINDS

        parts = rest.split(":")
        if len(parts) < 2 or not parts[0] or not parts[1]:
            raise DataSourceError(f"{where}: expected tfds:NAME:SPLIT[:KIND]")
        # a split may hold colons itself (TFDS slicing: train[:90%]): KIND only when the last part is one
        kind = parts[-1] if len(parts) > 2 and parts[-1] in KINDS else "video"
        split = ":".join(parts[1:-1] if len(parts) > 2 and parts[-1] in KINDS else parts[1:])
        try:
            return TfdsSource(parts[0], split=split, data_dir=_get(data_cfg, "tfds_dir", None), kind=kind)
        except Exception as error:  # tfds' own errors (no such dataset, split, folder) list hundreds of names
            reason = " ".join(str(error).split())
            raise DataSourceError(f"{where}: {type(error).__name__}: "
                                  f"{reason[:300] + ' ...' if len(reason) > 300 else reason}") from error
    if kind == "folder":
        from jaxvc.data.sources import FolderSource

        if not os.path.exists(rest):
            raise DataSourceError(f"{where}: no such folder or manifest")
        try:
            return FolderSource(rest)
        except (OSError, ValueError) as err:  # an unreadable folder, a malformed manifest line
            raise DataSourceError(f"{where}: {err}") from err
    raise DataSourceError(f"{where}: expected {SPEC_FORMS}")


def check_not_empty(source, where: str):
    """``source`` if it holds records, else a DataSourceError saying so (the pipeline would refuse it later)."""
    from jaxvc.data.sources import FolderSource, PackedSource

    if len(source) == 0:
        what = ("no images or videos in it" if isinstance(source, FolderSource) else
                "its shards hold no records" if isinstance(source, PackedSource) else "no records")
        raise DataSourceError(f"{where}: {what}")
    return source


def stream_specs(data_cfg) -> dict[str, str]:
    """The named streams of config.data.streams that are on (spec "none" switches an optional one off)."""
    specs = _plain(_get(data_cfg, "streams", None)) or {"image": "synthetic:pairs", "video": "synthetic:videos"}
    return {name: spec for name, spec in specs.items() if spec != "none"}


def data_config(config) -> DataConfig:
    """DataConfig from config.batch_size and the DataConfig fields present in config.data."""
    data_cfg = config.data
    fields = {}
    for f in dataclasses.fields(DataConfig):
        if f.name == "batch_size":
            continue
        value = _get(data_cfg, f.name, None)
        if value is not None:
            fields[f.name] = _plain(value)
    width = _get(data_cfg, "image_width", None)
    if width is not None:  # frames of image_size x image_width (height x width)
        fields["image_size"] = (int(fields.get("image_size", 32)), int(width))
    on = stream_specs(data_cfg)  # the weights and rescale entries of streams switched off go with them
    if "weights" in fields:
        fields["weights"] = {name: weight for name, weight in fields["weights"].items() if name in on}
    if "rescale" in fields:
        fields["rescale"] = tuple(name for name in fields["rescale"] if name in on)
    if "batch_sizes" in fields:
        fields["batch_sizes"] = {name: int(size) for name, size in fields["batch_sizes"].items() if name in on}
    if "caption_phrases" in fields:
        fields["caption_phrases"] = {name: phrase for name, phrase in fields["caption_phrases"].items() if name in on}
    return DataConfig(batch_size=int(config.batch_size), **fields)


def streams_from_config(config) -> dict:
    """{name: source} of the streams of config.data that are on, each checked to exist and hold records (cheap: a
    folder is scanned, a packed one's dataset_info.json read); errors are DataSourceErrors naming the key."""
    streams = {}
    for name, spec in stream_specs(config.data).items():
        where = f"config.data.streams.{name} = {spec!r}"
        streams[name] = check_not_empty(build_source(spec, config.data, key=f"config.data.streams.{name}"), where)
    if not streams:
        raise DataSourceError("config.data.streams: every stream is 'none'; at least one must be on")
    try:  # the mixture's settings against these streams (weights, batch sizes, rescale...): building reads nothing
        BatchDataset(streams, data_config(config), rows=(0, int(config.batch_size)))
    except ValueError as error:
        raise DataSourceError(f"config.data: {error}") from None
    return streams


def from_config(config, rows: tuple[int, int] | None = None, tokenizer=None, streams=None) -> DataIterator:
    """The data iterator for this host's `rows` of every global batch (see the module docstring). Captions are
    tokenized with ``tokenizer``, by default the one ``config.model.tokenizer`` names (jaxvc's CLIP BPE if empty),
    as ``jaxvc train`` does for the other sources. ``streams``: the ones streams_from_config(config) opened (``jaxvc
    train`` opens them before loading the model, to report bad data at once); None: open them here."""
    if tokenizer is None and "model" in config:
        from jaxvc.models.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(config.model.get("tokenizer") or None)
    data_cfg = config.data
    streams = streams_from_config(config) if streams is None else streams
    return make_pipeline(streams, data_config(config), rows=rows, tokenizer=tokenizer,
                         worker_count=int(_get(data_cfg, "workers", 0) or 0),
                         read_threads=int(_get(data_cfg, "read_threads", 1) or 1),
                         prefetch=int(_get(data_cfg, "prefetch", 2) or 2))
