"""Run folders in a bucket (``--workdir gs://...``, what the TPU launch scripts ask for).

Before jaxvc/storage.py, ``pathlib.Path("gs://bucket/run")`` turned the URL into the local folder ``gs:/bucket/run``,
so a pod's checkpoints landed on each worker's own disk.

* In CI: every path a run writes outside Orbax's arrays (the checkpoint folder Orbax creates, ``config.json``, sample
  GIFs, a profiler trace and memory profile, the run-folder check of ``jaxvc generate``) stays a ``gs://`` URL and
  lands in the bucket, with ``gs://`` served by an fsspec filesystem over a local folder (what epath reaches GCS
  through; the emulator below only answers Orbax's bucket-metadata request).
* In CI: TensorBoard events for a bucket folder (``jaxvc/train/bucket_events.py``) arrive whole and in order, with a
  bounded lag, in pieces of about the segment size, a fraction of what whole-file re-uploads would send.
* Opt-in (``JAXVC_GCS_EMULATOR_TEST=1``): a whole run against a local GCS emulator (``gcp-storage-emulator``),
  checkpoints through tensorstore's gcs driver included: train into ``gs://bucket/run``, resume (losses bit-equal to
  an uninterrupted local run), ``load_trained_run``. Not in CI: the emulator implements no generation
  preconditions, and tensorstore's conditional OCDBT manifest writes then fail ("Malformed StorageGeneration") in
  about 1 run in 3 at tensorstore's default request concurrency; with ``TENSORSTORE_GCS_REQUEST_CONCURRENCY=1`` it
  passed 9 of 10 runs here (the failure in a full-suite run, under load).
"""
import os

import pytest

from tests.multidevice import run_with_devices

FAKE_FS = """
import os, sys, tempfile
import fsspec
from fsspec.implementations.local import LocalFileSystem

class FakeGCS(LocalFileSystem):
    \"\"\"gs://bucket/path -> <root>/bucket/path on this disk.\"\"\"
    root = tempfile.mkdtemp()

    @classmethod
    def _strip_protocol(cls, path):
        path = os.fspath(path)
        for prefix in ("gs://", "gcs://"):
            if path.startswith(prefix):
                return os.path.join(cls.root, path[len(prefix):]).rstrip("/")
        return super()._strip_protocol(path)

    def glob(self, path, **kwargs):  # as gcsfs answers: "bucket/path", which epath makes gs://bucket/path again
        found = super().glob(path, **kwargs)
        return [p[len(self.root) + 1:] if p.startswith(self.root + "/") else p for p in found]

fsspec.register_implementation("gs", FakeGCS, clobber=True)
fsspec.register_implementation("gcs", FakeGCS, clobber=True)
bucket = os.path.join(FakeGCS.root, "bucket")
"""

FAKE_GCS = FAKE_FS + """
# Orbax asks google-cloud-storage for the bucket's metadata (hierarchical namespace or not): the emulator answers
import socket
from gcp_storage_emulator.server import create_server
with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
server = create_server("127.0.0.1", port, in_memory=True, default_bucket="bucket")
server.start()
os.environ.update(STORAGE_EMULATOR_HOST=f"http://127.0.0.1:{port}", GOOGLE_CLOUD_PROJECT="test")
"""

PATHS = FAKE_GCS + """
try:
    import jax, jax.numpy as jnp, numpy as np
    from ml_collections import ConfigDict
    from jaxvc.config_utils import get_config, write_config
    from jaxvc.methods.toy_denoiser import ToyDenoiser
    from jaxvc.train.loop import Trainer
    from jaxvc.train.metrics import MetricWriter
    from jaxvc.train.profiling import StepProfiler
    from jaxvc.train.trained_run import is_run_folder

    config = get_config("configs/toy.py:tiny", ["progress_bar=false"])
    trainer = Trainer(config, ToyDenoiser(config), "gs://bucket/run")
    assert str(trainer.workdir) == "gs://bucket/run", trainer.workdir
    assert str(trainer.checkpointer.directory) == "gs://bucket/run/checkpoints", trainer.checkpointer.directory
    assert os.path.isdir(os.path.join(bucket, "run", "checkpoints"))  # Orbax created it, through epath
    write_config(config, trainer.workdir)
    assert is_run_folder("gs://bucket/run")
    local_tensorboard = tempfile.mkdtemp()
    writer = MetricWriter(local_tensorboard)
    videos = {"samples": np.zeros((2, 3, 8, 8, 3), np.uint8)}
    written = writer.videos(1, videos, trainer.workdir / "samples" / "step_00000001")
    writer.close()
    assert [str(p) for p in written] == [f"gs://bucket/run/samples/step_00000001/samples_{i}.gif" for i in range(2)]
    with open(os.path.join(bucket, "run", "samples", "step_00000001", "samples_0.gif"), "rb") as f:
        assert f.read(6) == b"GIF89a"
    profiler = StepProfiler(ConfigDict({"steps": 1, "skip_steps": 0, "memory": True}), trainer.workdir).start(0)
    with profiler:
        profiler.before_step(0)
        with profiler.annotation(0):
            x = jax.jit(lambda a: a @ a)(jnp.ones((8, 8)))
        message = profiler.after_step(0, x)
    assert "gs://bucket/run/tensorboard" in message, message
    traces = [os.path.join(d, f) for d, _, files in os.walk(os.path.join(bucket, "run", "tensorboard"))
              for f in files if f.endswith(".xplane.pb")]
    assert len(traces) == 1 and "/run/tensorboard/plugins/profile/" in traces[0], traces
    assert os.path.getsize(os.path.join(bucket, "run", "tensorboard", "memory_step_00000001.prof")) > 0
    assert sorted(os.listdir(os.path.join(bucket, "run"))) == ["checkpoints", "config.json", "samples", "tensorboard"]
    assert not os.path.exists("gs:")  # nothing went to a local folder named after the URL
    print("PATHS_OK", flush=True)
finally:
    server.stop()
"""


def test_run_folder_paths_stay_bucket_urls():
    pytest.importorskip("gcp_storage_emulator")
    run_with_devices(PATHS, devices=1, marker="PATHS_OK", timeout=300)


EVENTS = FAKE_FS + """
import numpy as np
from jaxvc.notebook import read_scalars
from jaxvc.train.bucket_events import BucketEvents
from jaxvc.train.metrics import MetricWriter

url, folder = "gs://bucket/run/tensorboard", os.path.join(bucket, "run", "tensorboard")
assert isinstance(MetricWriter(url).writer, BucketEvents)  # what the trainer writes a bucket run's scalars with
now = [0.0]
events = BucketEvents(url, segment_bytes=4096, sync_secs=10, clock=lambda: now[0])
whole_file_uploads = 0  # what re-uploading the whole file at every sync (tensorboardX's gs:// writer) would send
for step in range(400):
    now[0] = float(step)  # a step a second
    events.add_scalar("loss", step / 8, step)
    if step % 100 == 50:
        events.add_image("samples/strip", np.full((16, 64, 3), step % 256, np.uint8), step, dataformats="HWC")
    if now[0] == events._last_sync:  # it synced just now
        whole_file_uploads += sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
        assert len(os.listdir(events.staging)) == 1  # the local disk holds the file being written, no more
    if step == 237:  # the bucket lags the run by less than sync_secs
        assert read_scalars(url)["loss"][-1][0] > 237 - 10
events.close()
assert read_scalars(url)["loss"] == [(step, step / 8) for step in range(400)]  # every point, in order
pieces = sorted(os.listdir(folder))
sizes = [os.path.getsize(os.path.join(folder, name)) for name in pieces]
assert len(pieces) >= 4 and all(name.endswith(f".{i:05d}") for i, name in enumerate(pieces)), pieces
assert max(sizes) < 4096 + 1024, sizes  # a segment is closed once past 4096 bytes: every upload is about that
assert events.uploaded_bytes < whole_file_uploads / 3, (events.uploaded_bytes, whole_file_uploads)
assert not os.path.exists(events.staging)
print("EVENTS_OK", events.uploaded_bytes, whole_file_uploads, len(pieces), flush=True)
"""


def test_tensorboard_events_reach_a_bucket_in_bounded_pieces():
    """A bucket run's scalars and images: staged locally, uploaded at most every sync_secs, in files of about
    segment_bytes (tensorboardX's own gs:// writer uploads the whole growing file at every flush)."""
    run_with_devices(EVENTS, devices=1, marker="EVENTS_OK", timeout=120)


SCRIPT = """
import os, socket, sys, tempfile
ok = False
with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
from gcp_storage_emulator.server import create_server
server = create_server("127.0.0.1", port, in_memory=True, default_bucket="bucket")
server.start()
url = f"http://127.0.0.1:{port}"
# one request at a time: with tensorstore's default concurrency the emulator sometimes answers a conditional write
# with a generation tensorstore cannot parse ("Malformed StorageGeneration"; 1 run in 3 here)
os.environ.update(STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url, GOOGLE_CLOUD_PROJECT="test",
                  TENSORSTORE_GCS_REQUEST_CONCURRENCY="1")
try:
    from etils import epath
    from jaxvc.config_utils import get_config
    from jaxvc.methods.toy_denoiser import ToyDenoiser
    from jaxvc.train import toy_data
    from jaxvc.train.loop import train
    from jaxvc.train.profiling import trace_files
    from jaxvc.train.trained_run import load_trained_run

    def run(workdir, steps, *extra):
        config = get_config("configs/toy.py:tiny", [
            "compiler_options={'xla_backend_optimization_level': 0}", "model.num_blocks=1", "progress_bar=false",
            "checkpoint.every=2", "sample_every=2", f"steps={steps}", *extra])
        return train(config, ToyDenoiser(config), lambda rows: toy_data.from_config(config, rows), workdir)

    first = run("gs://bucket/run", 2, "profile.steps=1", "profile.skip_steps=1")
    assert str(first.workdir) == "gs://bucket/run", first.workdir
    resumed = run("gs://bucket/run", 4)
    straight = run(os.path.join(tempfile.mkdtemp(), "run"), 4)
    assert resumed.start_step == 2
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history][2:]
    root = epath.Path("gs://bucket/run")
    assert sorted(p.name for p in root.iterdir()) == ["checkpoints", "config.json", "samples", "tensorboard"]
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["2", "4"]
    assert sorted(p.name for p in (root / "samples").iterdir()) == ["step_00000002", "step_00000004"]
    assert (root / "samples" / "step_00000004" / "samples_0.gif").read_bytes()[:6] == b"GIF89a"
    assert len([p for p in (root / "tensorboard").iterdir() if p.name.startswith("events.out.tfevents")]) == 2
    assert len(trace_files(root / "tensorboard")) == 1
    assert not os.path.exists("gs:")  # nothing went to a local folder named after the URL
    loaded = load_trained_run("gs://bucket/run")
    assert loaded.step == 4 and loaded.config.steps == 4
    ok = True
    print("BUCKET_OK", flush=True)
except BaseException:
    import traceback
    traceback.print_exc()
finally:
    # storage clients may retry for minutes once the emulator is gone (an upload at exit): the
    # process ends here, the emulator with it
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if ok else 1)
"""


@pytest.mark.skipif(os.environ.get("JAXVC_GCS_EMULATOR_TEST") != "1",
                    reason="opt-in (JAXVC_GCS_EMULATOR_TEST=1): the GCS emulator fails tensorstore's conditional "
                           "writes in about 1 run in 3 (see the module docstring)")
def test_a_run_folder_in_a_bucket_trains_resumes_and_loads():
    pytest.importorskip("gcp_storage_emulator")
    pytest.importorskip("gcsfs")
    run_with_devices(SCRIPT, devices=1, marker="BUCKET_OK", timeout=300)
