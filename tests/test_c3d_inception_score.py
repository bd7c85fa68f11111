"""The UCF-101 video Inception Score (jaxvc/eval/inception_score.py, jaxvc/models/c3d.py, jaxvc/convert/c3d.py)
against its reference: TGANv2's C3D and ``calc_is.py`` pipeline run in chainer (tests/chainer_c3d_reference.py, in
its own process), with random weights saved in chainer's own .npz format; OpenCV's bicubic resize; the score
formulas of TGANv2 and StyleGAN-V."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxvc.convert.state_dict import WeightFileError
from jaxvc.convert.torch_to_flax import CheckpointMismatchError

REFERENCE = Path(__file__).with_name("chainer_c3d_reference.py")


def moving_patterns(count: int, frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """(count, frames, H, W, 3) uint8: a different drifting sine grating per clip, with noise (so that the bicubic
    resize has detail to get right and the clips are told apart)."""
    rng = np.random.default_rng(seed)
    t = np.arange(frames)[:, None, None]
    y, x = np.arange(height)[None, :, None], np.arange(width)[None, None, :]
    clips = []
    for i in range(count):
        base = 127 + 100 * np.sin((0.05 + 0.04 * i) * x + 0.3 * i * y + 0.4 * t * (i - 1.5))
        rgb = np.stack([base, np.roll(base, 7 * i, axis=2), 255 - base], -1)
        clips.append(np.clip(rgb + rng.normal(0, 20, rgb.shape), 0, 255).astype(np.uint8))
    return np.stack(clips)


@pytest.fixture(scope="module")
def chainer_run(tmp_path_factory):
    """The reference's files: random C3D weights (chainer's save_npz), mean2.npz, the videos, and the probabilities
    and score chainer computes for them."""
    folder = tmp_path_factory.mktemp("c3d_chainer")
    videos = moving_patterns(4, 16, 96, 160)  # rows are enlarged to 128, columns shrunk
    np.save(folder / "videos.npy", videos)
    done = subprocess.run([sys.executable, str(REFERENCE), str(folder)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"chainer reference failed:\n{done.stderr[-3000:]}"
    return folder, videos


def test_cubic_resize_matches_opencv():
    cv2 = pytest.importorskip("cv2")
    from jaxvc.models.resample import cubic_matrix, resize_cubic

    rng = np.random.default_rng(1)
    worst = 0.0
    for height, width in [(96, 160), (320, 512), (64, 64), (100, 77), (480, 720), (3, 5), (128, 128)]:
        for size in [(128, 128), (112, 200)]:
            frame = (rng.random((height, width, 3)) * 255).astype(np.float32)
            expected = cv2.resize(frame, size[::-1], interpolation=cv2.INTER_CUBIC)
            worst = max(worst, float(np.abs(np.asarray(resize_cubic(frame, size)) - expected).max()))
    # float32 sums in a different order: measured 3.4e-4 of 0..255 at most (1.3e-6 relative)
    assert worst < 5e-4, worst
    # the weights themselves, read off OpenCV by resizing impulses (identity rows): float32 rounding only
    impulses = cv2.resize(np.eye(720, dtype=np.float32), (200, 720), interpolation=cv2.INTER_CUBIC)
    np.testing.assert_allclose(cubic_matrix(720, 200), impulses.T, atol=3e-7)
    np.testing.assert_array_equal(cubic_matrix(128, 128), np.eye(128, dtype=np.float32))  # same size: a copy


def test_probabilities_and_score_match_chainer(chainer_run):
    from jaxvc.eval.inception_score import C3DProbabilities, inception_score

    folder, videos = chainer_run
    expected = np.load(folder / "probabilities.npy")
    entropy = -np.sum(expected * np.log(expected), axis=1)
    assert expected.max() < 0.9 and np.all((entropy > 0.5) & (entropy < 3))  # neither one-hot nor uniform
    network = C3DProbabilities.from_files(folder / "c3d.npz", folder / "mean2.npz", batch_size=2)
    probabilities = network(videos)
    assert probabilities.shape == (4, 101)
    # float32 through 11 layers (logits about 1e-6 relative): measured 3.2e-6 absolute, 1.7e-5 relative at most
    np.testing.assert_allclose(probabilities, expected, rtol=2e-5, atol=1e-6)
    reference_score = float(np.load(folder / "score.npy"))  # calc_inception, float32 arithmetic
    np.testing.assert_allclose(inception_score(expected)[0], reference_score, rtol=1e-7)  # measured 1.1e-8
    score, spread = inception_score(probabilities)
    assert spread == 0.0
    np.testing.assert_allclose(score, reference_score, rtol=2e-6)  # measured 5.4e-7 (the probabilities' 1e-5)
    # a list of clips of another size goes through FeatureStream (grouped by shape, order kept)
    small = moving_patterns(2, 16, 64, 64, seed=3)
    mixed = network([videos[0], small[0], videos[1], small[1]], "mixed clips")
    np.testing.assert_allclose(mixed[[0, 2]], probabilities[:2], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(mixed[[1, 3]], network(small), rtol=1e-6, atol=1e-9)


def test_named_endpoints_and_cover_all_pooling(chainer_run):
    import jax
    import jax.numpy as jnp

    from jaxvc.convert.c3d import load_c3d
    from jaxvc.models.c3d import C3D, max_pool_cover_all

    folder, _ = chainer_run
    _, params = load_c3d(folder / "c3d.npz")
    clips = jax.random.normal(jax.random.key(0), (1, 16, 112, 112, 3)) * 50
    logits, endpoints = C3D().apply(params, clips, return_endpoints=True)
    shapes = {name: endpoints[name].shape for name in ("pool1", "pool2", "pool3", "pool4", "pool5", "fc7")}
    assert shapes == {"pool1": (1, 16, 56, 56, 64), "pool2": (1, 8, 28, 28, 128), "pool3": (1, 4, 14, 14, 256),
                      "pool4": (1, 2, 7, 7, 512), "pool5": (1, 1, 4, 4, 512), "fc7": (1, 4096)}
    assert logits.shape == (1, 101)
    # cover_all: 7 -> 4, the last window holds only the 7th value
    ramp = jnp.arange(7.0)[None, None, :, None, None] * jnp.ones((1, 2, 7, 7, 1))
    pooled = max_pool_cover_all(ramp, (2, 2, 2))
    assert pooled.shape == (1, 1, 4, 4, 1)
    np.testing.assert_array_equal(pooled[0, 0, :, 0, 0], [1, 3, 5, 6])
    with pytest.raises(ValueError, match=r"\(batch, 16, 112, 112, 3\)"):
        C3D().apply(params, jnp.zeros((1, 8, 112, 112, 3)))


def test_inception_score_formulas():
    from jaxvc.eval.inception_score import inception_score

    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (50, 101))
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    # TGANv2's calc_inception
    p_all = p.mean(0, keepdims=True)
    tgan2 = np.exp(np.sum(p * np.log(p + 1e-7) - p * np.log(p_all + 1e-7)) / len(p))
    assert inception_score(p) == pytest.approx((tgan2, 0.0), rel=1e-12)
    # StyleGAN-V's compute_isv (10 splits of the shuffled rows, no epsilon)
    shuffled = p.copy()
    np.random.RandomState(42).shuffle(shuffled)
    parts = [shuffled[i * 50 // 10:(i + 1) * 50 // 10] for i in range(10)]
    scores = [np.exp(np.mean(np.sum(q * (np.log(q) - np.log(q.mean(0, keepdims=True))), axis=1))) for q in parts]
    unshuffled = p.copy()
    mean, std = inception_score(p, splits=10, eps=0.0)
    assert (mean, std) == pytest.approx((np.mean(scores), np.std(scores)), rel=1e-12)
    np.testing.assert_array_equal(p, unshuffled)  # a copy was shuffled, not the caller's rows
    # the bounds: one class for all -> 1; N distinct confident classes -> N (eps = 0 would make 0 log 0 a NaN here,
    # as in StyleGAN-V's formula; TGANv2's eps moves the score by about eps)
    assert inception_score(np.tile(np.eye(101)[3], (8, 1)))[0] == pytest.approx(1.0, rel=1e-6)
    assert inception_score(np.eye(101)[:8])[0] == pytest.approx(8.0, rel=1e-5)
    with pytest.raises(ValueError, match="splits"):
        inception_score(p[:3], splits=4)
    with pytest.raises(ValueError, match="finite"):
        inception_score(np.full((2, 3), np.nan))


def test_loader_formats_and_errors(chainer_run, tmp_path):
    from safetensors.numpy import save_file

    from jaxvc.convert.c3d import load_c3d, load_c3d_mean

    folder, _ = chainer_run
    chainer_keys = dict(np.load(folder / "c3d.npz"))
    _, params = load_c3d(folder / "c3d.npz")
    # the same weights as torch-style keys in safetensors, and under a prefix (a chainer Classifier's predictor/)
    torch_keys = {key.replace("/W", ".weight").replace("/b", ".bias"): value for key, value in chainer_keys.items()}
    save_file(torch_keys, str(tmp_path / "c3d.safetensors"))
    np.savez(tmp_path / "prefixed.npz", **{f"predictor/{key}": value for key, value in chainer_keys.items()})
    for path in (tmp_path / "c3d.safetensors", tmp_path / "prefixed.npz"):
        other = load_c3d(path)[1]
        np.testing.assert_array_equal(other["params"]["fc6"]["kernel"], params["params"]["fc6"]["kernel"])
        np.testing.assert_array_equal(other["params"]["conv1a"]["kernel"], params["params"]["conv1a"]["kernel"])
    assert params["params"]["conv1a"]["kernel"].shape == (3, 3, 3, 3, 64)  # (kt, kh, kw, in, out)
    # the batch-normalized C3D variant (fc6 1024 wide, bn* links) is another network: named, key by key
    variant = {**chainer_keys, "fc6/W": np.zeros((1024, 2048), np.float32), "bn1a/gamma": np.ones(64, np.float32)}
    np.savez(tmp_path / "variant.npz", **variant)
    with pytest.raises(CheckpointMismatchError, match=r"variant\.npz(.|\n)*bn1a/gamma(.|\n)*fc6\.weight"):
        load_c3d(tmp_path / "variant.npz")
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    with pytest.raises(WeightFileError, match="broken.npz: not a readable .npz"):
        load_c3d(tmp_path / "broken.npz")
    # the mean: TGANv2's centre 128 columns, channels last
    mean = load_c3d_mean(folder / "mean2.npz")
    raw = np.load(folder / "mean2.npz")["mean"].reshape(3, 16, 128, 171)
    assert mean.shape == (16, 128, 128, 3)
    np.testing.assert_array_equal(mean[5, 7, :, 2], raw[2, 5, 7, 21:149])
    np.savez(tmp_path / "wrong_mean.npz", mean=np.zeros((3, 16, 112, 112), np.float32))
    with pytest.raises(WeightFileError, match=r"wrong_mean.npz: the mean has shape \(3, 16, 112, 112\)"):
        load_c3d_mean(tmp_path / "wrong_mean.npz")
    np.savez(tmp_path / "no_mean.npz", average=np.zeros(3))
    with pytest.raises(WeightFileError, match="no 'mean' array"):
        load_c3d_mean(tmp_path / "no_mean.npz")


def test_eval_command_scores_inception(chainer_run, tmp_path, capsys):
    from jaxvc.cli import main
    from jaxvc.data.media import read_video
    from jaxvc.eval.inception_score import C3DProbabilities, inception_score
    from jaxvc.media import write_mp4

    folder, _ = chainer_run
    clips = moving_patterns(3, 20, 72, 88, seed=5)
    records = []
    for index, clip in enumerate(clips):
        write_mp4(tmp_path / f"clip{index}.mp4", clip, min_size=32)
        records.append({"video": f"clip{index}.mp4", "prompt": "a person playing guitar"})
    write_mp4(tmp_path / "short.mp4", clips[0][:10], min_size=32)
    records.append({"video": "short.mp4", "prompt": "too short"})
    (tmp_path / "records.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    out = tmp_path / "scores.json"
    status = main(["eval", str(tmp_path / "records.jsonl"), "--c3d-model", str(folder / "c3d.npz"),
                   "--c3d-mean", str(folder / "mean2.npz"), "--is-batch-size", "2", "--out", str(out)])
    assert status == 1  # the 10-frame video is left out and counted
    summary = json.loads(out.read_text())
    assert summary["counts"]["inception_score"] == 3
    assert any("records.jsonl:4" in line and "fewer than 16" in line for line in summary["skipped"])
    decoded = np.stack([read_video(tmp_path / f"clip{index}.mp4")[0][:16] for index in range(3)])
    network = C3DProbabilities.from_files(folder / "c3d.npz", folder / "mean2.npz", batch_size=2)  # one program
    expected = inception_score(network(decoded))[0]
    assert summary["means"]["inception_score"] == pytest.approx(expected, rel=1e-9)
    assert "inception_score" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="needs both --c3d-model and --c3d-mean"):
        main(["eval", str(tmp_path / "records.jsonl"), "--c3d-model", str(folder / "c3d.npz")])
