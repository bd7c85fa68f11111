"""A run folder in a bucket (``--workdir gs://...``, what the TPU launch scripts ask for), against a local GCS
emulator: training writes its checkpoints (Orbax: tensorstore's gcs driver), ``config.json``, TensorBoard events,
sample GIFs and a profiler trace there; a second run resumes from that checkpoint exactly (its losses are those of
an uninterrupted local run), and ``load_trained_run`` (``jaxvc generate --model gs://...``) reads it back.

Before jaxvc/storage.py, ``pathlib.Path("gs://bucket/run")`` turned the URL into the local folder ``gs:/bucket/run``,
so a pod's checkpoints landed on each worker's own disk. The emulator runs in the check's own process, which sets
the endpoints (``STORAGE_EMULATOR_HOST`` for gcsfs and google-cloud-storage, ``TENSORSTORE_GCS_HTTP_URL`` for
tensorstore) before anything reads them."""
import pytest

from tests.multidevice import run_with_devices

pytest.importorskip("gcp_storage_emulator")
pytest.importorskip("gcsfs")

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
    # tensorboardX's GCS writers upload once more at exit and retry for minutes once the emulator is gone: the
    # process ends here, the emulator with it
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if ok else 1)
"""


def test_a_run_folder_in_a_bucket_trains_resumes_and_loads():
    run_with_devices(SCRIPT, devices=1, marker="BUCKET_OK", timeout=300)
