"""Run folders on a local disk or in a bucket: ``gs://`` (what every host of a TPU pod sees), ``s3://`` or a path.

Everything a run writes or reads in its folder (checkpoints, ``config.json``, TensorBoard events, sample GIFs,
profiler traces) takes its paths from ``run_path``: an ``etils.epath.Path``, which keeps a ``gs://bucket/run`` URL
whole (``pathlib.Path`` would turn it into the local relative path ``gs:/bucket/run``, and a pod's checkpoints would
land on each worker's own disk) and reaches buckets through ``gcsfs``/``s3fs`` (or TensorFlow's ``gfile``, when
installed). Orbax writes the checkpoint arrays with tensorstore, which talks to GCS itself.
"""
from __future__ import annotations

import os

from etils import epath


def is_remote(path: str | os.PathLike) -> bool:
    """A URL with a scheme (``gs://``, ``s3://``, ...), not a local path."""
    return "://" in os.fspath(path)


def run_path(path: str | os.PathLike) -> epath.Path:
    """``path`` as an ``epath.Path``; a local one made absolute (a run's paths must not move with the cwd)."""
    return epath.Path(path) if is_remote(path) else epath.Path(os.path.abspath(os.fspath(path)))
