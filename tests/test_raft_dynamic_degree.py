"""RAFT (jaxvc/models/raft.py) against princeton-vl/RAFT's own torch code (as VBench 0.1.5 ships it), and the
dynamic-degree metric (jaxvc/eval/dynamic_degree.py) against VBench's ``DynamicDegree``.

Random RAFT weights (batch-norm statistics and affines randomized too), saved the way the released checkpoints are
(a ``DataParallel`` ``.pth``) or as safetensors, loaded by ``jaxvc.convert.raft.load_raft``. Frames are smooth random
textures, the second a shifted crop of the first, so the flow is non-trivial.
"""
import argparse

import numpy as np
import pytest

from tests.conftest import relative_error

torch = pytest.importorskip("torch")


def random_torch_raft(small: bool, seed: int = 0):
    from jaxvc.bench.reference_code import vbench_raft

    raft_class, _ = vbench_raft()
    torch.manual_seed(seed)
    model = raft_class(argparse.Namespace(small=small, mixed_precision=False, alternate_corr=False, dropout=0))
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                count = module.num_features
                module.running_mean.copy_(0.1 * torch.randn(count, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(count, generator=generator))
                module.weight.copy_(1 + 0.1 * torch.randn(count, generator=generator))
                module.bias.copy_(0.1 * torch.randn(count, generator=generator))
    return model.eval()


def texture_pair(batch: int, height: int, width: int, seed: int = 0):
    """(first, second) float (N, H, W, 3) in [0, 255]: a blurred random texture and the same texture moved by
    (3, -2) pixels."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    texture = gaussian_filter(rng.uniform(0, 255, (batch, height + 8, width + 8, 3)), sigma=(0, 3, 3, 0))
    return texture[:, 4:4 + height, 4:4 + width], texture[:, 2:2 + height, 7:7 + width]


def torch_flow(model, first, second, iters):
    to_torch = lambda x: torch.tensor(np.asarray(x), dtype=torch.float32).permute(0, 3, 1, 2)  # noqa: E731
    with torch.no_grad():
        low, up = model(to_torch(first), to_torch(second), iters=iters, test_mode=True)
    return low.permute(0, 2, 3, 1).numpy(), up.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("small, iters, file_format", [(False, 20, "pth"), (True, 12, "safetensors")])
def test_flow_matches_the_reference(tmp_path, small, iters, file_format):
    import jax
    import jax.numpy as jnp

    from jaxvc.convert.raft import load_raft
    from jaxvc.models.raft import RAFT

    model = random_torch_raft(small)
    state = model.state_dict()
    if file_format == "pth":  # the released files are DataParallel state dicts
        path = tmp_path / "raft.pth"
        torch.save({f"module.{key}": value for key, value in state.items()}, path)
    else:
        from safetensors.torch import save_file

        path = tmp_path / "raft.safetensors"
        save_file({key: value.clone() for key, value in state.items()}, path)
    config, params = load_raft(path, allow_pickle=True, iters=iters)
    assert config.small == small and config.iters == iters

    first, second = texture_pair(2, 128, 160)
    reference_low, reference_up = torch_flow(model, first, second, iters)
    up, low = jax.jit(lambda p, a, b: RAFT(config).apply(p, a, b, return_low_resolution=True))(
        params, jnp.asarray(first, jnp.float32), jnp.asarray(second, jnp.float32))
    low_error, up_error = relative_error(low, reference_low), relative_error(up, reference_up)
    print(f"RAFT {'small' if small else 'large'}, {iters} steps: 1/8 flow {low_error:.2e}, full flow {up_error:.2e}")
    assert up.shape == (2, 128, 160, 2) and low.shape == (2, 16, 20, 2)
    assert low_error < 1e-5 and up_error < 1e-5
    assert np.abs(reference_up).mean() > 0.1  # a flow that is not ~0, so the comparison means something


def test_checkpoint_errors_name_the_file_and_key(tmp_path):
    from jaxvc.convert.raft import load_raft
    from jaxvc.convert.torch_to_flax import CheckpointMismatchError

    state = random_torch_raft(False).state_dict()
    del state["update_block.gru.convz1.weight"]
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointMismatchError, match=r"broken\.pth(.|\n)*update_block/gru/convz1/kernel"):
        load_raft(path, allow_pickle=True)
    torch.save({"encoder.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointMismatchError, match="not a RAFT checkpoint"):
        load_raft(tmp_path / "other.pth", allow_pickle=True)
    with pytest.raises(ValueError, match="pickle"):
        load_raft(path)


@pytest.mark.parametrize("height, width", [(61, 75), (64, 80), (130, 97)])
@pytest.mark.parametrize("mode", ["sintel", "kitti"])
def test_padding_matches_input_padder(height, width, mode):
    from jaxvc.models.raft import pad_to_multiple_of_8
    from jaxvc.bench.reference_code import vbench_raft

    _, input_padder = vbench_raft()
    images = np.random.default_rng(0).uniform(0, 255, (1, height, width, 3)).astype(np.float32)
    reference = input_padder((1, 3, height, width), mode=mode).pad(torch.tensor(images).permute(0, 3, 1, 2))[0]
    padded, _ = pad_to_multiple_of_8(images, mode)
    np.testing.assert_array_equal(np.asarray(padded), reference.permute(0, 2, 3, 1).numpy())


def vbench_video_is_dynamic(model, frames, scale):
    """VBench 0.1.5 ``DynamicDegree.infer`` on a list of frames (its ``get_score``, ``set_params`` and
    ``check_move``, transcribed: the module itself imports decord/cv2 at import time)."""
    from jaxvc.bench.reference_code import vbench_raft

    _, input_padder = vbench_raft()
    frames = [torch.tensor(frame, dtype=torch.float32).permute(2, 0, 1)[None] for frame in frames]
    scale_side = min(list(frames[0].shape)[-2:])
    thres, count_num = scale * (scale_side / 256.0), round(4 * (len(frames) / 16.0))
    static_score = []
    with torch.no_grad():
        for image1, image2 in zip(frames[:-1], frames[1:]):
            padder = input_padder(image1.shape)
            image1, image2 = padder.pad(image1, image2)
            _, flow_up = model(image1, image2, iters=20, test_mode=True)
            flo = flow_up[0].permute(1, 2, 0).numpy()
            rad = np.sqrt(np.square(flo[:, :, 0]) + np.square(flo[:, :, 1]))
            cut_index = int(rad.shape[0] * rad.shape[1] * 0.05)
            static_score.append(np.mean(abs(np.sort(-rad.flatten()))[:cut_index]).item())
    count = 0
    for score in static_score:
        if score > thres:
            count += 1
        if count >= count_num:
            return True, static_score
    return False, static_score


def test_dynamic_degree_matches_vbench(tmp_path):
    from jaxvc.convert.raft import raft_params_from_state_dict
    from jaxvc.eval.dynamic_degree import DynamicDegree, FlowEstimator

    model = random_torch_raft(False, seed=3)
    config, params = raft_params_from_state_dict({k: v.numpy() for k, v in model.state_dict().items()})
    first, second = texture_pair(1, 130, 124, seed=5)  # not multiples of 8: the padder's path
    frames = np.concatenate([first, second, first[:, ::-1], second]).round().astype(np.uint8)  # 4 frames
    scorer = DynamicDegree(FlowEstimator(config, params, batch_size=2), scale=1.0)
    ours = scorer.score(frames, fps=8)
    assert ours["frames_used"] == 4 and ours["pairs_needed"] == 1 and ours["threshold"] == pytest.approx(124 / 256)
    for scale in (1.0, 0.5 * np.median(ours["flow_scores"]) * 256 / 124, 1e6):
        dynamic, reference_scores = vbench_video_is_dynamic(model, frames, scale)
        assert relative_error(ours["flow_scores"], reference_scores) < 1e-5
        decision = DynamicDegree(scorer.flow, scale=scale).score(frames, fps=8)["dynamic_degree"]
        assert decision == float(dynamic)
    assert DynamicDegree(scorer.flow, scale=1e6).score(frames)["dynamic_degree"] == 0.0
    # below 128 px (padded) the coarsest correlation level is one pixel wide, where the reference's grid_sample
    # normalization divides by zero and every flow is NaN: refused instead
    with pytest.raises(ValueError, match="at least 121"):
        scorer.score(frames[:, :120])


def test_frame_rate_threshold_and_pair_count_rules():
    from jaxvc.eval.dynamic_degree import is_dynamic, moving_threshold, pairs_needed, subsample_to_fps

    frames = np.arange(48)
    assert list(subsample_to_fps(frames, 24)) == list(range(0, 48, 3))
    assert list(subsample_to_fps(frames, 30)) == list(range(0, 48, 4))  # round(3.75)
    assert list(subsample_to_fps(frames, 12)) == list(range(0, 48, 2))  # round(1.5) = 2
    assert len(subsample_to_fps(frames, 8)) == len(subsample_to_fps(frames, None)) == 48
    assert moving_threshold(480, 720) == pytest.approx(6.0 * 480 / 256)
    assert moving_threshold(256, 256, scale=4.0) == 4.0
    assert [pairs_needed(n) for n in (2, 6, 10, 16, 17)] == [0, 2, 2, 4, 4]  # Python's round: halves to even
    assert is_dynamic([0.1], threshold=1.0, needed=0) and not is_dynamic([], threshold=1.0, needed=0)
    assert is_dynamic([2, 0, 2], 1.0, 2) and not is_dynamic([2, 0, 0], 1.0, 2)


def test_eval_command_reports_the_dynamic_degree(tmp_path):
    import json

    from safetensors.torch import save_file

    from jaxvc.cli import main as jaxvc_main
    from jaxvc.data.media import read_video
    from jaxvc.eval.dynamic_degree import DynamicDegree, FlowEstimator
    from jaxvc.media import write_mp4

    save_file({k: v.clone() for k, v in random_torch_raft(False, seed=7).state_dict().items()},
              tmp_path / "raft.safetensors")
    first, second = texture_pair(1, 128, 128, seed=9)
    frames = np.concatenate([first, second] * 6).round().astype(np.uint8)  # 12 frames at 24 fps: 4 kept
    write_mp4(tmp_path / "a.mp4", frames, fps=24, min_size=128)
    write_mp4(tmp_path / "small.mp4", frames[:, :64, :64], fps=24, min_size=64)
    (tmp_path / "set.jsonl").write_text("\n".join(json.dumps({"video": name}) for name in ("a.mp4", "small.mp4")))
    out = tmp_path / "scores.json"
    code = jaxvc_main(["eval", str(tmp_path / "set.jsonl"), "--raft-model", str(tmp_path / "raft.safetensors"),
                       "--dd-scale", "4", "--dd-batch-size", "4", "--out", str(out)])
    assert code == 1  # the 64-pixel video's dynamic degree was skipped, with the reason
    summary = json.loads(out.read_text())
    assert len(summary["skipped"]) == 1 and "set.jsonl:2" in summary["skipped"][0] and "121" in summary["skipped"][0]
    video, refused = summary["videos"]  # the refused video stays, without this metric
    assert refused["source"].endswith("set.jsonl:2") and "dynamic_degree" not in refused
    decoded, fps = read_video(str(tmp_path / "a.mp4"))
    direct = DynamicDegree(FlowEstimator.from_file(tmp_path / "raft.safetensors", batch_size=4), scale=4.0)
    want = direct.score(decoded, fps)
    assert len(video["flow_scores"]) == 3 and want["frames_used"] == 4
    np.testing.assert_allclose(video["flow_scores"], want["flow_scores"], rtol=1e-6)
    assert video["dynamic_degree"] == want["dynamic_degree"] == summary["means"]["dynamic_degree"]
    assert summary["counts"] == {"dynamic_degree": 1} and summary["dd_scale"] == 4.0
