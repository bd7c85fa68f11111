"""The training input of the reference-conditioned methods, built from a config (``config.data``).

``config.data.source``: ``"synthetic"`` (the built-in subject world: its video stream, captions that leave the
identity to the reference image) or ``"packed"`` (ArrayRecord shards written by ``jaxvc pack``, paths in
``config.data.paths``). Registered in ``jaxvc/train/cli.py`` so ``jaxvc train`` and ``jaxvc demo`` share it.
"""
from __future__ import annotations

from jaxvc.data import synthetic
from jaxvc.data.build import DataSourceError, check_not_empty, open_packed
from jaxvc.data.pipeline import DataConfig, make_pipeline


def world_from_config(config) -> synthetic.SyntheticWorld:
    return synthetic.SyntheticWorld(image_size=config.model.image_size, num_frames=config.model.num_frames,
                                    num_subjects=config.data.num_subjects, held_out=config.data.held_out,
                                    seed=config.data.seed, placement=config.data.get("placement", "random"),
                                    angle_range=tuple(config.data.get("angle_range", synthetic.FULL_TURN)),
                                    pattern_scale=float(config.data.get("pattern_scale", 1.0)))


def streams_from_config(config) -> dict:
    """{"video": source} of config.data, checked to exist and hold records (errors: DataSourceError naming the key)."""
    source = config.data.source
    if source == "synthetic":
        world = world_from_config(config)
        # captions name the subject generically ("a subject moves left ..."): only the reference shows what it is
        motions = tuple(config.data.get("motions", ())) or None  # () = every motion of the world
        return {"video": synthetic.SyntheticVideoSource(
            world, num_records=max(4096, 64 * len(world.train_subject_ids)), motions=motions, seed=config.data.seed,
            caption_name=config.data.caption_name)}
    if source == "packed":
        from jaxvc.data.sources import ConcatSource

        given = config.data.paths or ()
        paths = [given] if isinstance(given, str) else [str(p) for p in given]
        if not paths:
            raise DataSourceError("config.data.paths is empty: config.data.source='packed' needs it (folders or shard "
                                  "globs from `jaxvc pack`)")
        # each path on its own (a folder, a glob or a shard file), so an error names the one that is wrong
        where = f"config.data.paths = {tuple(paths)}"
        keys = [where] if len(paths) == 1 else [f"config.data.paths[{i}] = {p!r}" for i, p in enumerate(paths)]
        parts = [open_packed(path, ["video"], key) for key, path in zip(keys, paths)]
        return {"video": check_not_empty(parts[0] if len(parts) == 1 else ConcatSource(parts), where)}
    raise DataSourceError(f"config.data.source={source!r}: expected 'synthetic' or 'packed'")


def from_config(config, rows: tuple[int, int], tokenizer=None, streams=None):
    """This host's share (rows [start, stop) of the global batch) of the training stream, with tokens (from
    ``tokenizer``, the method's; by default the one ``config.model.tokenizer`` names). ``streams``: the ones
    streams_from_config(config) opened (``jaxvc train`` opens them before loading the model); None: open them here."""
    from jaxvc.methods.base import model_frame_size
    from jaxvc.models.tokenizer import load_tokenizer

    tokenizer = tokenizer or load_tokenizer(config.model.get("tokenizer"))
    data_config = DataConfig(batch_size=config.batch_size, image_size=model_frame_size(config.model),
                             num_frames=config.model.num_frames, frame_stride=config.data.frame_stride,
                             target_fps=config.data.get("target_fps"),
                             reference=config.data.reference, seed=config.data.seed, with_mask=False,
                             center_reference=bool(config.data.get("center_reference", False)))
    streams = streams_from_config(config) if streams is None else streams
    return make_pipeline(streams, data_config, rows=tuple(rows), tokenizer=tokenizer,
                         worker_count=config.data.workers)
