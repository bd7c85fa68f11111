"""The notebooks in notebooks/ run top to bottom on a CPU (tiny config, synthetic world) and show what they promise.

Each notebook is executed with nbclient in a fresh kernel of this interpreter (kernel "python3", which jupyter_client
starts with sys.executable) in a temporary working directory, so nothing is written into the repository. The test
appends one cell that prints the kernel's final state as JSON, and also reads the displayed outputs: the inline MP4
is decoded and compared with the generated frames, the loss plot and contact sheets must be images.
"""
import base64
import importlib.util
import io
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
CELL_TIMEOUT = 900  # seconds per cell: the training cell compiles and runs 30 steps on a (shared) 2-core CPU
CHECK_PREFIX = "NOTEBOOK_CHECK "


def _generator():
    spec = importlib.util.spec_from_file_location("make_notebooks", NOTEBOOKS / "make_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _execute(name: str, workdir: Path, check_source: str):
    """Run notebook ``name`` plus a check cell in ``workdir``; returns (executed notebook, check values, seconds)."""
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    notebook.cells.append(nbformat.v4.new_code_cell(check_source))
    env = dict(os.environ)
    # the kernel imports this checkout's jaxvc whatever is installed
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    client = nbclient.NotebookClient(notebook, timeout=CELL_TIMEOUT, kernel_name="python3",
                                     resources={"metadata": {"path": str(workdir)}})
    start = time.perf_counter()
    client.execute(env=env)  # raises CellExecutionError (with the cell and traceback) on any error
    seconds = time.perf_counter() - start
    printed = "".join(o.get("text", "") for o in notebook.cells[-1].outputs if o.output_type == "stream")
    match = re.search(re.escape(CHECK_PREFIX) + r"(.*)", printed)
    assert match, f"the check cell printed no {CHECK_PREFIX!r} line: {printed!r}"
    return notebook, json.loads(match.group(1)), seconds


def _tagged(notebook, tag: str):
    cells = [c for c in notebook.cells if tag in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"expected one cell tagged {tag!r}, found {len(cells)}"
    return cells[0]


def _mp4_videos(cell) -> list[bytes]:
    html = "".join(o.get("data", {}).get("text/html", "") for o in cell.outputs if o.output_type == "display_data")
    return [base64.b64decode(data) for data in re.findall(r'src="data:video/mp4;base64,([A-Za-z0-9+/=]+)"', html)]


def _decode_mp4(data: bytes) -> np.ndarray:
    import av

    with av.open(io.BytesIO(data)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def _png_sizes(cell) -> list[tuple[int, int]]:
    from PIL import Image

    return [Image.open(io.BytesIO(base64.b64decode(o["data"]["image/png"]))).size
            for o in cell.outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]


def _assert_shows(video_bytes: bytes, frames: np.ndarray) -> None:
    """The inline MP4 holds ``frames`` (nearest-upscaled by jaxvc.media to >= 128 px, then H.264 at crf 18).

    H.264 at crf 18 is lossy and its error depends on the content: the mean absolute error after pooling each
    upscaled block back to one pixel measured 0.6 / 255 on a clean synthetic clip, 3.0 with added noise (std 20) and
    8.1-8.4 per frame on uniform noise, the worst case; a wrong or shifted video is off by tens."""
    decoded = _decode_mp4(video_bytes).astype(np.float64)
    factor = decoded.shape[1] // frames.shape[1]
    assert decoded.shape == (frames.shape[0], frames.shape[1] * factor, frames.shape[2] * factor, 3), decoded.shape
    # average each upscaled block back to one pixel; lossy coding keeps the mean error small
    pooled = decoded.reshape(frames.shape[0], frames.shape[1], factor, frames.shape[2], factor, 3).mean((2, 4))
    errors = np.abs(pooled - frames).mean(axis=(1, 2, 3))  # per frame
    assert errors.max() < 10.0, f"inline video differs from the generated frames by {errors.round(2)} / 255"


def _assert_setup_reported(notebook) -> None:
    """The setup cell printed the interpreter and JAX's devices, and chose fast CPU compiles only without a TPU/GPU."""
    from jaxvc.notebook import accelerator_present

    printed = "".join(o.get("text", "") for o in _tagged(notebook, "setup").outputs if o.output_type == "stream")
    assert f"python {sys.executable}" in printed and "devices [" in printed, printed
    assert ("optimization level 0" in printed) == (not accelerator_present()), printed


def test_stored_notebooks_are_generated_and_have_no_outputs():
    generator = _generator()
    assert set(generator.NOTEBOOKS) == {"colab_tpu_inference.ipynb", "train_tiny.ipynb"}
    for name in generator.NOTEBOOKS:
        stored = nbformat.read(NOTEBOOKS / name, as_version=4)
        nbformat.validate(stored)
        built = generator.build(name)
        assert [(c.cell_type, c.source, c.metadata.get("tags")) for c in stored.cells] == \
               [(c.cell_type, c.source, c.metadata.get("tags")) for c in built.cells], \
            f"{name} differs from notebooks/make_notebooks.py: run `.venv/bin/python notebooks/make_notebooks.py`"
        assert all(not c.get("outputs") and c.get("execution_count") is None
                   for c in stored.cells if c.cell_type == "code"), f"{name} is stored with outputs"
        assert stored.metadata.kernelspec.name == "python3"
        assert _tagged(stored, "parameters").source.lstrip().startswith("# Parameters")


def test_inference_notebook_runs_on_cpu(tmp_path):
    before = sorted(p.name for p in NOTEBOOKS.iterdir())
    check = (f"import json\nprint({CHECK_PREFIX!r} + json.dumps(dict(prefix=sys.prefix, model_path=model_path, "
             "frames=frames.tolist(), dtype=str(frames.dtype), files={k: str(v.resolve()) for k, v in files.items()})))")
    notebook, state, seconds = _execute("colab_tpu_inference.ipynb", tmp_path, check)
    print(f"colab_tpu_inference.ipynb: {seconds:.1f}s")
    assert state["prefix"] == sys.prefix  # the kernel ran this environment's interpreter
    _assert_setup_reported(notebook)
    # MODEL_DIR was empty: a tiny checkpoint in the `jaxvc convert` format, written in the working directory
    assert Path(state["model_path"]) == tmp_path / "tiny_videomaker_checkpoint"
    assert (tmp_path / "tiny_videomaker_checkpoint" / "jaxvc_pipeline.json").is_file()
    frames = np.asarray(state["frames"])
    assert state["dtype"] == "uint8" and frames.shape == (8, 32, 32, 3)
    assert frames.std() > 10 and len(np.unique(frames)) > 100  # an untrained model's video: noise, not constant
    shown = _tagged(notebook, "show-video")
    videos = _mp4_videos(shown)
    assert len(videos) == 1
    _assert_shows(videos[0], frames)
    sheet = _png_sizes(shown)
    assert len(sheet) == 1 and sheet[0][0] > sheet[0][1] > 0  # the contact sheet: reference + 8 frames in a row
    for kind in ("mp4", "gif", "sheet"):
        path = Path(state["files"][kind])
        assert path.parent == tmp_path / "outputs" and path.stat().st_size > 0, kind
    assert sorted(p.name for p in NOTEBOOKS.iterdir()) == before  # nothing written into the repository


def test_training_notebook_runs_on_cpu(tmp_path):
    before = sorted(p.name for p in NOTEBOOKS.iterdir())
    check = (f"import json\nprint({CHECK_PREFIX!r} + json.dumps(dict(prefix=sys.prefix, steps=STEPS, "
             "final_step=int(result.final_step), losses=losses.tolist(), tensorboard_loss=scalars['train/loss'], "
             "with_reference=with_reference.tolist(), without_reference=without_reference.tolist(), "
             "workdir=str(Path(WORKDIR).resolve()), checkpoints=checkpoints, num_frames=config.model.num_frames)))")
    notebook, state, seconds = _execute("train_tiny.ipynb", tmp_path, check)
    print(f"train_tiny.ipynb: {seconds:.1f}s")
    assert state["prefix"] == sys.prefix
    _assert_setup_reported(notebook)
    steps = state["steps"]
    assert state["final_step"] == steps == len(state["losses"]) == 30
    losses = np.asarray(state["losses"])
    assert np.all(np.isfinite(losses))
    # the loss falls (a deterministic run: the means are printed)
    print(f"loss: first 3 steps {losses[:3].mean():.3f}, last 10 {losses[-10:].mean():.3f}")
    assert losses[-10:].mean() < 0.75 * losses[:3].mean(), (losses[:3].mean(), losses[-10:].mean())
    # the TensorBoard log holds the same losses every log_every=5 steps
    logged = dict(state["tensorboard_loss"])
    assert sorted(logged) == list(range(5, steps + 1, 5))
    for step, value in logged.items():
        assert value == pytest.approx(losses[step - 1], rel=1e-6)
    assert Path(state["workdir"]) == tmp_path / "train_tiny_run" and state["checkpoints"] == [str(steps)]
    assert len(_png_sizes(_tagged(notebook, "loss-plot"))) == 1
    with_reference, without_reference = (np.asarray(state[k], np.uint8) for k in ("with_reference",
                                                                                   "without_reference"))
    assert state["num_frames"] >= 2  # the demo config's clip length
    assert with_reference.shape == without_reference.shape == (state["num_frames"], 32, 32, 3)
    # same noise and prompt, only the reference differs: the reference reaches the output
    assert np.abs(with_reference.astype(float) - without_reference).mean() > 1.0
    shown = _tagged(notebook, "show-video")
    videos = _mp4_videos(shown)
    assert len(videos) == 2
    _assert_shows(videos[0], with_reference)
    _assert_shows(videos[1], without_reference)
    assert len(_png_sizes(shown)) == 1
    assert len(_png_sizes(_tagged(notebook, "data"))) == 1  # the first batch's contact sheet
    assert sorted(p.name for p in NOTEBOOKS.iterdir()) == before


def test_notebook_helpers():
    import subprocess

    from jaxvc.notebook import FAST_CPU_COMPILE_FLAGS, accelerator_present, moving_average

    np.testing.assert_allclose(moving_average([1, 2, 3, 4], 2), [1, 1.5, 2.5, 3.5])
    np.testing.assert_allclose(moving_average([4, 2, 6], 10), [4, 3, 4])  # fewer points than the window: running mean
    np.testing.assert_allclose(moving_average([3, 1, 2], 1), [3, 1, 2])
    # in a fresh interpreter: the flags are added once (keeping the user's), and asking after JAX started raises
    script = ("import os\nfrom jaxvc.notebook import use_fast_cpu_compiles\n"
              "print(use_fast_cpu_compiles(), use_fast_cpu_compiles(), os.environ['XLA_FLAGS'])\n"
              "import jax\njax.devices()\n"
              "try:\n    use_fast_cpu_compiles()\nexcept RuntimeError:\n    print('raised')\n")
    env = dict(os.environ, XLA_FLAGS="--xla_cpu_enable_fast_math=false", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    if accelerator_present():
        assert out.stdout.split()[:2] == ["False", "False"]
    else:
        assert out.stdout.split() == ["True", "True", "--xla_cpu_enable_fast_math=false", *FAST_CPU_COMPILE_FLAGS,
                                      "raised"]
