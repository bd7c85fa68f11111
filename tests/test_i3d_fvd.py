"""jaxvc's I3D, its loader and FVD/KVD against the PyTorch reference (cd-fvd's copy of piergiaj/TATS InceptionI3d).

The reference modules are loaded by file path as a private package, so cdfvd's own package chain (cdfvd/fvd.py pulls
VideoMAE, einops, scipy) is never imported. A random torch InceptionI3d (He-initialised convolutions, randomized
BatchNorm affine parameters and running statistics, so eval-mode BN matters) is saved with ``torch.save`` and read by
``load_i3d``. Float32 parity bound: 1e-5 relative.
"""
import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from tests.conftest import relative_error

torch = pytest.importorskip("torch")

from jaxvc.convert.i3d import load_i3d  # noqa: E402
from jaxvc.convert.state_dict import WeightFileError  # noqa: E402
from jaxvc.convert.torch_to_flax import CheckpointMismatchError  # noqa: E402
from jaxvc.eval import fvd  # noqa: E402
from jaxvc.models.i3d import InceptionI3d  # noqa: E402

PARITY = 1e-5
REPO = Path(__file__).resolve().parents[1]


def load_reference():
    """(pytorch_i3d, utils) from cd-fvd's ``third_party/i3d`` folder, imported as the package ``_cdfvd_i3d``."""
    from jaxvc.bench.reference_code import cdfvd_i3d

    if importlib.util.find_spec("cdfvd") is None:
        pytest.skip("cd-fvd (the PyTorch FVD reference) is not installed")
    return cdfvd_i3d()


@pytest.fixture(scope="module")
def reference():
    return load_reference()


@pytest.fixture(scope="module")
def i3d(reference, tmp_path_factory):
    """(torch InceptionI3d in eval mode, its checkpoint path, jaxvc params loaded from that file)."""
    pytorch_i3d, _ = reference
    torch.manual_seed(0)
    net = pytorch_i3d.InceptionI3d(400, in_channels=3).eval()
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.Conv3d):  # He init keeps activations O(1) through the 60 layers
                torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            if isinstance(module, torch.nn.BatchNorm3d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.2)
                module.running_mean.normal_(0.0, 0.2)
                module.running_var.uniform_(0.5, 2.0)
    path = tmp_path_factory.mktemp("i3d") / "i3d.pt"
    torch.save(net.state_dict(), path)
    _, params = load_i3d(path, allow_pickle=True)
    return net, path, params


def torch_layout(videos):
    """(B, T, H, W, C) -> torch's (B, C, T, H, W)."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(videos).transpose(0, 4, 1, 2, 3)))


def distinct_videos(shape, seed=0):
    """Float videos in [-1, 1]: the first smooth (upsampled coarse noise), the rest pixel noise, so that the logits
    of the batch differ clearly."""
    rng = np.random.default_rng(seed)
    batch, frames, height, width, channels = shape
    videos = rng.uniform(-1, 1, shape)
    coarse = rng.uniform(-1, 1, (frames, -(-height // 16), -(-width // 16), channels))
    videos[0] = coarse.repeat(16, 1).repeat(16, 2)[:, :height, :width]
    return videos.astype(np.float32)


# ---------------------------------------------------------------- (a) the network


# (2, 16, 224, 224): what FVD feeds it. (1, 9, 200, 216): the fewest frames, and odd map sizes (200 -> ... 25 -> 13,
# 216 -> ... 27 -> 14) take the other branch of every "same" padding rule.
@pytest.mark.parametrize("shape", [(2, 16, 224, 224, 3), (1, 9, 200, 216, 3)])
def test_logits_match_torch(i3d, shape):
    net, _, params = i3d
    videos = distinct_videos(shape)
    with torch.no_grad():
        expected_logits = net(torch_layout(videos)).numpy()
        expected_pre_pool = net(torch_layout(videos), return_pre_pool=True).numpy().transpose(0, 2, 3, 4, 1)
    logits, endpoints = jax.jit(lambda p, v: InceptionI3d().apply(p, v, return_endpoints=True))(params, videos)
    assert logits.shape == (shape[0], 400)
    errors = {"logits": relative_error(logits, expected_logits),
              "Mixed_5c": relative_error(endpoints["Mixed_5c"], expected_pre_pool)}
    print(f"I3D {shape}: relative errors {errors}")
    assert max(errors.values()) < PARITY, errors
    if shape[0] > 1:  # the videos' own contributions, not only the shared biases, are compared
        spread = np.linalg.norm(expected_logits[0] - expected_logits[1]) / np.linalg.norm(expected_logits)
        assert spread > 0.05, spread


def test_i3d_features_match_reference_pipeline(i3d, reference):
    """uint8 videos -> I3DFeatures (resize inside the jit, padded batches) == i3d(preprocess_i3d(videos))."""
    net, path, _ = i3d
    _, utils = reference
    videos = np.random.default_rng(1).integers(0, 256, (3, 10, 48, 64, 3), dtype=np.uint8)
    i3d_features = fvd.I3DFeatures.from_file(path, batch_size=2, allow_pickle=True)
    features = i3d_features(videos)
    with torch.no_grad():
        expected = net(utils.preprocess_i3d(videos)).numpy()
    error = relative_error(features, expected)
    print(f"I3DFeatures (3 videos, batches of 2): relative error {error:.2e}")
    assert features.shape == (3, 400) and features.dtype == np.float64
    assert error < PARITY
    # a list of videos of two frame sizes: batched per size, rows in the list's order
    other = np.random.default_rng(2).integers(0, 256, (2, 9, 40, 40, 3), dtype=np.uint8)
    mixed = i3d_features([videos[0], other[0], videos[1], other[1], videos[2]])
    np.testing.assert_allclose(mixed[[0, 2, 4]], features, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(mixed[[1, 3]], i3d_features(other), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- (b) preprocessing


@pytest.mark.parametrize("shape", [(2, 10, 64, 96, 3), (1, 9, 300, 250, 3)])  # upsampling; downsampling
def test_preprocess_matches_preprocess_i3d(reference, shape):
    _, utils = reference
    videos = np.random.default_rng(2).integers(0, 256, shape, dtype=np.uint8)
    ours = np.asarray(fvd.preprocess_videos(videos))
    expected = utils.preprocess_i3d(videos).numpy().transpose(0, 2, 3, 4, 1)  # (B, C, T, H, W) -> NTHWC
    error = relative_error(ours, expected)
    print(f"preprocess {shape}: relative error {error:.2e}, max abs {np.abs(ours - expected).max():.2e}")
    assert ours.shape == (*shape[:2], 224, 224, 3)
    assert error < 1e-6


# ---------------------------------------------------------------- (c) FVD


def feature_sets(kind, seed=3):
    rng = np.random.default_rng(seed)
    if kind == "well-conditioned":
        return rng.normal(size=(40, 16)), rng.normal(0.3, 1.2, size=(40, 16))
    if kind == "rank-deficient":  # 10 samples in 16 dims: covariances of rank 9
        return rng.normal(size=(10, 16)), rng.normal(0.5, 1.0, size=(12, 16))
    # ill-conditioned: a near-collinear mix with scales from 1e-4 to 1e2
    mix = rng.normal(size=(16, 16)) * np.logspace(-4, 2, 16)[:, None]
    return rng.normal(size=(40, 16)) @ mix, (rng.normal(size=(40, 16)) + 0.1) @ mix


@pytest.mark.parametrize("kind", ["well-conditioned", "rank-deficient", "ill-conditioned"])
def test_frechet_distance_matches_cd_fvd(reference, kind):
    _, utils = reference
    real, fake = feature_sets(kind)
    expected = float(utils.frechet_distance(torch.from_numpy(real), torch.from_numpy(fake)))
    ours = fvd.frechet_distance(real, fake)
    error = abs(ours - expected) / abs(expected)
    print(f"FVD {kind}: ours {ours:.10g}, cd-fvd {expected:.10g}, relative error {error:.2e}")
    assert error < 1e-6
    # a set against itself: 0 up to the matrix square roots' rounding, which keeps only half the digits of the
    # smallest eigenvalues (sqrt(machine eps) relative to the largest, per dimension); LAPACK builds differ there
    scale = np.trace(np.cov(real, rowvar=False))
    assert abs(fvd.frechet_distance(real, real)) < real.shape[1] * np.sqrt(np.finfo(np.float64).eps) * scale


# ---------------------------------------------------------------- (d) KVD


def polynomial_mmd_reference(x, y):
    """CustomCrafter's ``utils/fvd_utils.polynomial_mmd`` (also TATS's and StyleGAN-V's), with sklearn's
    ``polynomial_kernel`` defaults written out as sklearn computes them: K = X Y^T; K *= 1 / n_features; K += 1;
    K **= 3."""
    def polynomial_kernel(a, b=None):
        b = a if b is None else b
        kernel = a @ b.T
        kernel *= 1.0 / a.shape[1]
        kernel += 1
        kernel **= 3
        return kernel

    m, n = x.shape[0], y.shape[0]
    k_xx, k_yy, k_xy = polynomial_kernel(x), polynomial_kernel(y), polynomial_kernel(x, y)
    k_xx_sum = (k_xx.sum() - np.diagonal(k_xx).sum()) / (m * (m - 1))
    k_yy_sum = (k_yy.sum() - np.diagonal(k_yy).sum()) / (n * (n - 1))
    k_xy_sum = k_xy.sum() / (m * n)
    return k_xx_sum + k_yy_sum - 2 * k_xy_sum


def test_kernel_distance():
    rng = np.random.default_rng(4)
    real, same, shifted = rng.normal(size=(200, 16)), rng.normal(size=(150, 16)), rng.normal(0.5, 1, size=(150, 16))
    for fake in (same, shifted, real):
        expected = polynomial_mmd_reference(fake, real)  # CustomCrafter's argument order: (fake, real)
        assert abs(fvd.kernel_distance(real, fake) - expected) <= 1e-12 * abs(expected) + 1e-15
    same_kvd, shifted_kvd = fvd.kernel_distance(real, same), fvd.kernel_distance(real, shifted)
    identical_kvd = fvd.kernel_distance(real, real)
    print(f"KVD: same distribution {same_kvd:.3g}, identical sets {identical_kvd:.3g}, shifted by 0.5 "
          f"{shifted_kvd:.3g}")
    assert shifted_kvd > 0
    # two samples of one distribution: zero in expectation (the estimator is unbiased), small next to a shift
    assert abs(same_kvd) < 0.1 * shifted_kvd
    # one set against itself: the unbiased estimate is -2 (mean(diag K) - mean(K)) / (m - 1), slightly negative
    kernel = (real @ real.T / real.shape[1] + 1) ** 3
    closed_form = -2 * (np.diagonal(kernel).mean() - kernel.mean()) / (len(real) - 1)
    assert identical_kvd < 0 and abs(identical_kvd - closed_form) < 1e-12 * abs(closed_form)
    assert abs(identical_kvd) < 0.1 * shifted_kvd


def test_score_sets_wiring():
    """score_sets = score_features of the feature extractor's outputs, real first."""
    rng = np.random.default_rng(5)
    real = rng.integers(0, 256, (4, 9, 8, 8, 3), dtype=np.uint8)
    fake = [rng.integers(0, 256, (9, 8, 8, 3), dtype=np.uint8) for _ in range(3)]

    def fake_i3d(videos, what="videos"):  # a stand-in feature extractor: per-video channel statistics
        videos = np.stack(videos) if isinstance(videos, list) else videos
        return np.concatenate([videos.mean((1, 2, 3)), videos.std((1, 2, 3))], axis=1).astype(np.float64)

    scores = fvd.score_sets(real, fake, fake_i3d)
    assert scores == fvd.score_features(fake_i3d(real), fake_i3d(fake))
    assert set(scores) == {"fvd", "kvd"} and scores["fvd"] > 0


# ---------------------------------------------------------------- (e) loading and errors


def test_loader_formats_and_mismatch(i3d, tmp_path):
    from safetensors.numpy import save_file

    net, path, params = i3d
    state = {key: value.numpy() for key, value in net.state_dict().items()}
    wrapped = tmp_path / "wrapped.safetensors"  # a DataParallel save, as safetensors
    save_file({f"module.{key}": value for key, value in state.items()}, str(wrapped))
    _, from_safetensors = load_i3d(wrapped)
    jax.tree.map(np.testing.assert_array_equal, from_safetensors, params)

    with pytest.raises(WeightFileError, match="allow_pickle"):
        load_i3d(path)
    broken = dict(state)
    broken["Mixed_4b.b0.bn.running_vars"] = broken.pop("Mixed_4b.b0.bn.running_var")
    broken_path = tmp_path / "broken.safetensors"
    save_file(broken, str(broken_path))
    with pytest.raises(CheckpointMismatchError) as caught:
        load_i3d(broken_path)
    message = str(caught.value)
    assert str(broken_path) in message
    assert "Mixed_4b/b0/bn/running_var" in message and "Mixed_4b.b0.bn.running_vars" in message


def test_input_errors(i3d):
    _, _, params = i3d
    with pytest.raises(ValueError, match="at least 9"):
        InceptionI3d().apply(params, np.zeros((1, 8, 224, 224, 3), np.float32))
    with pytest.raises(ValueError, match="193..224"):
        InceptionI3d().apply(params, np.zeros((1, 9, 256, 224, 3), np.float32))
    videos = np.zeros((2, 9, 16, 16, 3), np.uint8)
    stub = lambda videos, what="": np.zeros((len(videos), 4))  # noqa: E731 - never reached
    with pytest.raises(ValueError, match="at least 9"):
        fvd.score_sets(videos[:, :8], videos, stub)
    with pytest.raises(ValueError, match="at least 2"):
        fvd.score_sets(videos, videos[:1], stub)
    with pytest.raises(ValueError, match="uint8"):
        fvd.score_sets(videos.astype(np.float32), videos, stub)
    with pytest.raises(ValueError, match="at least 2"):
        fvd.frechet_distance(np.zeros((1, 4)), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="dimensions differ"):
        fvd.kernel_distance(np.zeros((3, 4)), np.zeros((3, 5)))


def test_fvd_module_does_not_import_torch():
    code = "import sys, jaxvc.eval.fvd, jaxvc.convert.i3d; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_feature_stream_holds_one_batch_of_network_inputs(i3d):
    """Clips of three frame sizes: each is resized to I3D's 224 x 224 input as it is added, so two of them fill one
    batch (not one queue per frame size), and the logits are those of the whole uint8 -> logits program."""
    _, _, params = i3d
    network = fvd.I3DFeatures(params, batch_size=2)
    rng = np.random.default_rng(5)
    clips = [rng.integers(0, 256, (9, h, w, 3), np.uint8) for h, w in ((224, 224), (48, 64), (40, 40))]
    stream = fvd.FeatureStream(network, "clips")
    stream.add(clips[0])
    stream.add(clips[1])
    assert not stream.pending  # a full batch of two sizes: run at once
    stream.add(clips[2])
    assert list(stream.pending) == [(9, 224, 224, 3)] and stream.pending[(9, 224, 224, 3)][0][1].dtype == np.float32
    features = stream.finish()
    whole = jax.jit(lambda p, v: InceptionI3d().apply(p, fvd.preprocess_videos(v)))  # resize inside the network's jit
    with jax.default_matmul_precision("highest"):
        want = np.concatenate([np.asarray(whole(params, clip[None])) for clip in clips])
    np.testing.assert_allclose(features, want, rtol=1e-5, atol=1e-5)


def test_eval_command_reports_fvd_and_kvd(i3d, tmp_path, monkeypatch):
    """``jaxvc eval --i3d-model --real-videos``: the generated set is the records' videos, the real set a folder;
    both cut to their first --fvd-frames frames (the real videos decoded no further); a too-short video is left out
    and counted."""
    import json

    import jaxvc.data.media
    from jaxvc.cli import main as jaxvc_main
    from jaxvc.data.media import read_video
    from jaxvc.media import write_mp4

    reads = {}

    def spy(path, max_frames=None, **kwargs):
        reads[Path(path).name] = max_frames
        return read_video(path, max_frames=max_frames, **kwargs)

    monkeypatch.setattr(jaxvc.data.media, "read_video", spy)

    _, path, params = i3d
    rng = np.random.default_rng(4)
    (tmp_path / "real").mkdir()
    for index in range(2):
        write_mp4(tmp_path / "real" / f"r{index}.mp4", rng.integers(0, 256, (12, 32, 32, 3), np.uint8), min_size=32)
    for name, frames in (("g0", 10), ("g1", 11), ("short", 5)):
        write_mp4(tmp_path / f"{name}.mp4", rng.integers(0, 256, (frames, 32, 32, 3), np.uint8), min_size=32)
    (tmp_path / "set.jsonl").write_text("\n".join(json.dumps({"video": f"{n}.mp4"}) for n in ("g0", "g1", "short")))
    out = tmp_path / "scores.json"
    code = jaxvc_main(["eval", str(tmp_path / "set.jsonl"), "--i3d-model", str(path), "--allow-pickle",
                       "--real-videos", str(tmp_path / "real"), "--fvd-frames", "9", "--fvd-batch-size", "2",
                       "--out", str(out)])
    assert code == 1
    summary = json.loads(out.read_text())
    assert len(summary["skipped"]) == 1 and "set.jsonl:3" in summary["skipped"][0]
    clips = lambda names: np.stack([read_video(str(n))[0][:9] for n in names])  # noqa: E731
    want = fvd.score_sets(clips(sorted((tmp_path / "real").iterdir())),
                          clips([tmp_path / "g0.mp4", tmp_path / "g1.mp4"]), fvd.I3DFeatures(params, batch_size=2))
    assert summary["means"]["fvd"] == pytest.approx(want["fvd"], rel=1e-6)
    assert summary["means"]["kvd"] == pytest.approx(want["kvd"], rel=1e-6, abs=1e-9)
    assert summary["counts"]["fvd"] == 2 and summary["fvd"] == {"frames": 9, "real_videos": 2}
    assert reads["r0.mp4"] == reads["r1.mp4"] == 9  # the real videos: only the frames FVD takes are decoded
    with pytest.raises(SystemExit, match="--i3d-model and --real-videos"):
        jaxvc_main(["eval", str(tmp_path / "set.jsonl"), "--i3d-model", str(path)])
