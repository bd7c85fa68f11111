"""AMT-S (jaxvc/models/amt.py) against MCG-NKU/AMT's torch code as VBench 0.1.5 ships it, and the motion-smoothness
metric (jaxvc/eval/motion_smoothness.py) against VBench's ``MotionSmoothness.motion_score`` procedure.

Random AMT-S weights (PReLU slopes and biases randomized too, so no part is an identity), saved as the released
``amt-s.pth`` is (``{"state_dict": ...}``) or as safetensors, loaded by ``jaxvc.convert.amt.load_amt``. Frames are a
smooth random texture moving by a few pixels per frame, so the flows are non-trivial.
"""
import json

import numpy as np
import pytest

from tests.conftest import relative_error

torch = pytest.importorskip("torch")


def random_torch_amt(seed: int = 0):
    from jaxvc.bench.reference_code import vbench_amt

    model_class, _ = vbench_amt()
    torch.manual_seed(seed)
    model = model_class()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim == 1 and name.endswith("weight"):  # PReLU slopes, 0.25 at init
                parameter.copy_(0.05 + 0.35 * torch.rand(parameter.shape, generator=generator))
            elif name.endswith("bias"):
                parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def moving_texture(frames: int, height: int, width: int, seed: int = 0, step=(2, 3)) -> np.ndarray:
    """uint8 (F, H, W, 3): crops of a blurred random texture moving ``step`` (rows, columns) pixels per frame."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    margin = max(step) * frames
    texture = gaussian_filter(rng.uniform(0, 255, (height + margin, width + margin, 3)), sigma=(3, 3, 0))
    texture = 255 * (texture - texture.min()) / (texture.max() - texture.min())
    crops = [texture[i * step[0]:i * step[0] + height, i * step[1]:i * step[1] + width] for i in range(frames)]
    return np.stack(crops).round().astype(np.uint8)


def to_torch(frames) -> "torch.Tensor":
    return torch.tensor(np.asarray(frames, np.float32)).permute(0, 3, 1, 2)


def save_checkpoint(model, path):
    if path.suffix == ".pth":
        torch.save({"state_dict": model.state_dict()}, path)
    else:
        from safetensors.torch import save_file

        save_file({key: value.clone() for key, value in model.state_dict().items()}, path)


@pytest.mark.parametrize("file_format", ["pth", "safetensors"])
def test_frame_and_flows_match_the_reference(tmp_path, file_format):
    import jax

    from jaxvc.convert.amt import load_amt
    from jaxvc.models.amt import AMT

    model = random_torch_amt()
    path = tmp_path / f"amt-s.{file_format}"
    save_checkpoint(model, path)
    config, params = load_amt(path, allow_pickle=True)

    video = moving_texture(3, 128, 160).astype(np.float32) / 255.0
    first, second = video[[0, 1]], video[[2, 2]]  # two pairs: a 2-frame and a 1-frame step
    with torch.no_grad():
        reference = model(to_torch(first), to_torch(second), torch.full((2, 1, 1, 1), 0.5), eval=False)
    frame, state = jax.jit(lambda p, a, b: AMT(config).apply(p, a, b, mutable=["intermediates"]))(params, first,
                                                                                                 second)
    errors = {"frame": relative_error(frame, reference["imgt_pred"].permute(0, 2, 3, 1).numpy())}
    for index, level in enumerate((1, 2, 3, 4)):
        for side in (0, 1):
            want = reference[f"flow{side}_pred"][index].numpy()
            want = want.reshape(want.shape[0], -1, *want.shape[-2:]).transpose(0, 2, 3, 1)  # (N, h, w, 2 flows)
            ours = state["intermediates"][f"flow{side}_{level}"][0]
            assert ours.shape == want.shape
            errors[f"flow{side}_{level}"] = relative_error(ours, want)
    print("AMT-S vs VBench's torch code: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    assert frame.shape == (2, 128, 160, 3)
    assert float(np.abs(np.asarray(state["intermediates"]["flow0_1"][0])).max()) > 0.5  # the flows are not trivial
    assert max(errors.values()) < 2e-5


def test_warp_and_transposed_conv_match_torch():
    import jax

    from jaxvc.bench.reference_code import vbench_amt
    from jaxvc.models.amt import ConvTranspose, warp

    vbench_amt()
    from vbench.third_party.amt.utils.flow_utils import warp as torch_warp

    rng = np.random.default_rng(3)
    image = rng.normal(size=(2, 12, 17, 5)).astype(np.float32)
    flow = (6 * rng.normal(size=(2, 12, 17, 2))).astype(np.float32)  # many samples past the border: clamped
    want = torch_warp(to_torch(image), to_torch(flow)).permute(0, 2, 3, 1).numpy()
    assert relative_error(warp(image, flow), want) < 1e-6

    layer = torch.nn.ConvTranspose2d(5, 7, 4, 2, 1)
    with torch.no_grad():
        want = layer(to_torch(image)).permute(0, 2, 3, 1).numpy()
    params = {"params": {"kernel": layer.weight.detach().numpy().transpose(2, 3, 1, 0),
                         "bias": layer.bias.detach().numpy()}}
    ours = jax.jit(ConvTranspose(7).apply)(params, image)
    assert ours.shape == (2, 24, 34, 7) and relative_error(ours, want) < 1e-6


def vbench_motion_score(model, frames: np.ndarray) -> tuple[float, list[float]]:
    """VBench 0.1.5's ``MotionSmoothness.motion_score`` for frames already read (its cv2 reading aside), with its
    own ``InputPadder``, ``img2tensor`` and ``tensor2img``, on a CPU (scale 1, padding 16), and ``vfi_score``'s
    ``cv2.absdiff`` as the absolute difference of uint8 arrays."""
    from jaxvc.bench.reference_code import vbench_amt

    _, utils = vbench_amt()
    frame_list = list(frames)
    inputs = [utils.img2tensor(frame) for frame in frame_list[0::2]]
    padder = utils.InputPadder(inputs[0].shape, 16)
    inputs = padder.pad(*inputs)
    outputs = [inputs[0]]
    with torch.no_grad():
        for in_0, in_1 in zip(inputs[:-1], inputs[1:]):
            middle = model(in_0, in_1, torch.tensor(0.5).view(1, 1, 1, 1), scale_factor=1.0, eval=True)["imgt_pred"]
            outputs += [middle, in_1]
    outputs = [utils.tensor2img(out) for out in padder.unpad(*outputs)]
    originals, interpolated = frame_list[1::2], outputs[1::2]
    scores = [float(np.mean(np.abs(originals[i].astype(int) - interpolated[i].astype(int))))
              for i in range(len(interpolated))]
    return (255.0 - np.mean(scores)) / 255.0, scores


def test_motion_smoothness_matches_vbench():
    from jaxvc.convert.amt import amt_params_from_state_dict
    from jaxvc.eval.motion_smoothness import Interpolator, MotionSmoothness

    model = random_torch_amt(seed=4)
    config, params = amt_params_from_state_dict({k: v.numpy() for k, v in model.state_dict().items()})
    frames = moving_texture(8, 120, 136, seed=5)  # padded to 128 x 144; 8 frames: 4 inputs, 3 targets (not 7)
    scorer = MotionSmoothness(Interpolator(config, params, batch_size=2))  # 3 pairs: a padded last batch
    ours = scorer.score(frames)
    want, want_errors = vbench_motion_score(model, frames)
    flips = np.abs(np.subtract(ours["interpolation_errors"], want_errors)) * (120 * 136 * 3)
    print(f"motion smoothness {ours['motion_smoothness']:.6f} (VBench's procedure {want:.6f}), pixel flips "
          f"{flips.round(2)}, errors {np.round(ours['interpolation_errors'], 4)} vs {np.round(want_errors, 4)}")
    assert len(ours["interpolation_errors"]) == 3 and ours["frames_used"] == 8
    # the uint8 truncation of a float32 frame flips a value by one level where the two frames straddle an integer
    # in the last bit: each flip moves a pair's mean by 1 / (120 * 136 * 3) = 2e-5 (1 or 2 of 49k values here)
    assert flips.max() <= 5
    assert ours["motion_smoothness"] == pytest.approx(want, abs=1e-6)
    assert 0.5 < ours["motion_smoothness"] < 1.0

    still = np.repeat(frames[:1], 5, axis=0)
    with pytest.raises(ValueError, match="at least 3 frames"):
        scorer.score(still[:2])
    # below 113 px the frames pad to 112 and AMT's coarsest correlation level is one pixel wide: torch is NaN there
    with torch.no_grad():
        small = to_torch(frames[:2, :112, :112].astype(np.float32) / 255.0)
        nan = model(small[:1], small[1:], torch.tensor(0.5).view(1, 1, 1, 1), eval=True)["imgt_pred"]
    assert torch.isnan(nan).any()
    with pytest.raises(ValueError, match="at least 113"):
        scorer.score(frames[:, :112, :])


def test_checkpoint_errors_name_the_file_and_key(tmp_path):
    from jaxvc.convert.amt import amt_params_from_state_dict, load_amt
    from jaxvc.convert.torch_to_flax import CheckpointMismatchError

    state = {k: v.numpy() for k, v in random_torch_amt().state_dict().items()}
    broken = {k: v for k, v in state.items() if k != "decoder1.convblock.2.weight"}
    with pytest.raises(CheckpointMismatchError, match=r"decoder1/convblock_2/kernel"):
        amt_params_from_state_dict(broken, source="amt-s.pth")
    larger = dict(state, **{"feat_encoder.conv1.weight": np.zeros((64, 3, 7, 7), np.float32)})
    with pytest.raises(CheckpointMismatchError, match="AMT-L or AMT-G"):
        amt_params_from_state_dict(larger, source="amt-l.pth")
    with pytest.raises(CheckpointMismatchError, match="not an AMT checkpoint"):
        amt_params_from_state_dict({"fnet.conv1.weight": np.zeros((64, 3, 7, 7))}, source="raft-things.pth")
    torch.save({"state_dict": random_torch_amt().state_dict()}, tmp_path / "amt-s.pth")
    with pytest.raises(ValueError, match="allow_pickle"):
        load_amt(tmp_path / "amt-s.pth")


def test_eval_command_reports_motion_smoothness(tmp_path):
    from jaxvc.cli import main as jaxvc_main
    from jaxvc.data.media import read_video
    from jaxvc.eval.motion_smoothness import Interpolator, MotionSmoothness
    from jaxvc.media import write_mp4

    save_checkpoint(random_torch_amt(seed=7), tmp_path / "amt-s.safetensors")
    frames = moving_texture(9, 128, 128, seed=8, step=(1, 2))
    write_mp4(tmp_path / "a.mp4", frames, fps=8, min_size=128)
    write_mp4(tmp_path / "short.mp4", frames[:2], fps=8, min_size=128)
    (tmp_path / "set.jsonl").write_text("\n".join(json.dumps({"video": name}) for name in ("a.mp4", "short.mp4")))
    out = tmp_path / "scores.json"
    code = jaxvc_main(["eval", str(tmp_path / "set.jsonl"), "--amt-model", str(tmp_path / "amt-s.safetensors"),
                       "--ms-batch-size", "4", "--out", str(out)])
    assert code == 1  # the 2-frame video's motion smoothness was skipped, with the reason
    summary = json.loads(out.read_text())
    assert len(summary["skipped"]) == 1 and "set.jsonl:2" in summary["skipped"][0] and "3 frames" in \
        summary["skipped"][0]
    video, refused = summary["videos"]  # the refused video stays, without this metric
    assert refused["source"].endswith("set.jsonl:2") and "motion_smoothness" not in refused
    decoded, _ = read_video(str(tmp_path / "a.mp4"))
    want = MotionSmoothness(Interpolator.from_file(tmp_path / "amt-s.safetensors", batch_size=4)).score(decoded)
    assert len(video["interpolation_errors"]) == 4
    np.testing.assert_allclose(video["interpolation_errors"], want["interpolation_errors"], rtol=1e-6)
    assert video["motion_smoothness"] == summary["means"]["motion_smoothness"] == want["motion_smoothness"]
    assert summary["counts"] == {"motion_smoothness": 1} and summary["models"]["amt"].endswith("amt-s.safetensors")
