"""Method (e)'s motion-binned temporal-FVD split (jaxvc/eval/motion_bins.py, ``jaxvc motion-bins``).

The measurement (mask reading, the flow inside and outside the mask, the bins, cropping RAFT's padding) is checked
with exact hand-made flows: random RAFT weights do not produce real flow. The command runs end to end with a tiny
random RAFT on synthetic clips whose foreground and background move by known amounts (what a real RAFT would
measure); its bin edges are set from the flows the random RAFT gives, so that each bin, the camera-motion drop and
the per-bin cap are all exercised.
"""
import json

import numpy as np
import pytest
from PIL import Image

from jaxvc.eval.motion_bins import (MaskError, MotionBinner, _resize_nearest, choose, motion_bin, read_mask,
                                    region_flow)

OBJECT = (40, 48)  # foreground square (H, W) of the synthetic clips


def moving_clip(fg_shift, bg_shift, frames: int = 3, shape=(144, 160), seed: int = 0):
    """(frames (F, H, W, 3) uint8, first-frame mask (H, W) bool): a blurred random texture moving by ``bg_shift``
    (dy, dx) pixels per frame under a differently textured square moving by ``fg_shift``."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    height, width = shape
    margin = 4 + frames * max(map(abs, (*fg_shift, *bg_shift)))
    background = gaussian_filter(rng.uniform(0, 255, (height + 2 * margin, width + 2 * margin, 3)), (3, 3, 0))
    thing = 255 - gaussian_filter(rng.uniform(0, 255, (*OBJECT, 3)), (2, 2, 0))
    top, left = 50, 56
    video = []
    for t in range(frames):
        y, x = margin - t * bg_shift[0], margin - t * bg_shift[1]  # content at p moves to p + t * shift
        frame = background[y:y + height, x:x + width].copy()
        oy, ox = top + t * fg_shift[0], left + t * fg_shift[1]
        frame[oy:oy + OBJECT[0], ox:ox + OBJECT[1]] = thing
        video.append(frame)
    mask = np.zeros(shape, bool)
    mask[top:top + OBJECT[0], left:left + OBJECT[1]] = True
    return np.stack(video).round().astype(np.uint8), mask


def save_mask(path, mask: np.ndarray) -> None:
    if str(path).endswith(".npy"):
        np.save(path, mask.astype(np.uint8))
    else:
        Image.fromarray(mask.astype(np.uint8) * 255).save(path)


def test_region_flow_and_bins_are_exact():
    mask = np.zeros((6, 8), bool)
    mask[1:4, 2:6] = True  # 12 foreground pixels
    flow = np.zeros((6, 8, 2))
    flow[mask] = (6, 8)  # |.| = 10
    flow[~mask] = (0, -2)  # 2
    assert region_flow(flow, mask) == (10.0, 2.0)
    flow[1, 2:6] = (3, 4)  # 4 of 12 at 5: (8 * 10 + 4 * 5) / 12
    assert region_flow(flow, mask) == pytest.approx((100 / 12, 2.0), rel=1e-15)

    assert [motion_bin(fg, 0.0) for fg in (0.0, 25.0, 25.01, 50.0, 50.01, 400.0)] == \
        ["small", "small", "medium", "medium", "large", "large"]
    assert motion_bin(5.0, 10.0) == "small" and motion_bin(5.0, 10.01) is None  # > 10 px background: dropped
    assert motion_bin(3.0, 1.0, edges=(2, 4), max_background=0.5) is None
    assert motion_bin(3.0, 0.5, edges=(2, 4), max_background=0.5) == "medium"
    with pytest.raises(ValueError, match="increasing"):
        motion_bin(1.0, 0.0, edges=(50, 25))
    with pytest.raises(ValueError, match="finite"):
        motion_bin(float("nan"), 0.0)
    with pytest.raises(ValueError, match="same H, W"):
        region_flow(flow[:5], mask)
    with pytest.raises(MaskError, match="no foreground"):
        region_flow(flow, np.zeros_like(mask))


def test_choose_is_a_seeded_subset_in_order():
    kept = choose(range(10, 20), 3, seed=4)
    assert len(kept) == 3 and kept == sorted(kept) and set(kept) <= set(range(10, 20))
    assert choose(range(10, 20), 3, seed=4) == kept
    assert len({tuple(choose(range(10, 20), 3, seed=s)) for s in range(6)}) > 1
    assert choose([5, 1], 3, seed=0) == [5, 1] and choose(range(4), 0, seed=0) == [0, 1, 2, 3]


def test_read_mask_formats_sizes_and_errors(tmp_path):
    mask = np.zeros((6, 9), bool)
    mask[2:5, 3:7] = True
    save_mask(tmp_path / "a.png", mask)
    np.testing.assert_array_equal(read_mask(tmp_path / "a.png", (6, 9)), mask)
    double = mask.repeat(2, 0).repeat(2, 1)  # a mask at twice the frame's size: nearest gives it back exactly
    save_mask(tmp_path / "big.png", double)
    np.testing.assert_array_equal(read_mask(tmp_path / "big.png", (6, 9)), mask)
    np.testing.assert_array_equal(read_mask(tmp_path / "a.png", (12, 18)), double)
    Image.fromarray(double.astype(np.uint8) * 255).save(tmp_path / "big.jpg", quality=95)
    np.testing.assert_array_equal(read_mask(tmp_path / "big.jpg", (6, 9)), mask)
    for name, array in (("a.npy", mask.astype(np.uint8)), ("b.npy", mask[None]), ("c.npy", mask[..., None] * 0.5)):
        np.save(tmp_path / name, array)
        np.testing.assert_array_equal(read_mask(tmp_path / name, (6, 9)), mask)

    Image.fromarray(mask.astype(np.uint8)).save(tmp_path / "labels.png")  # a 0/1 label map: non-zero = foreground
    np.testing.assert_array_equal(read_mask(tmp_path / "labels.png", (6, 9)), mask)
    Image.fromarray(np.zeros((6, 9), np.uint8)).save(tmp_path / "none.png")
    with pytest.raises(MaskError, match=r"none\.png.*no foreground"):
        read_mask(tmp_path / "none.png", (6, 9))
    np.save(tmp_path / "full.npy", np.ones((6, 9)))
    with pytest.raises(MaskError, match=r"full\.npy.*foreground everywhere"):
        read_mask(tmp_path / "full.npy", (6, 9))
    with pytest.raises(MaskError, match=r"a\.png.*6x9.*12x9.*aspect ratio"):
        read_mask(tmp_path / "a.png", (12, 9))
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(MaskError, match=r"broken\.png.*cannot decode"):
        read_mask(tmp_path / "broken.png", (6, 9))
    (tmp_path / "broken.npy").write_bytes(b"not an array")
    with pytest.raises(MaskError, match=r"broken\.npy.*cannot read"):
        read_mask(tmp_path / "broken.npy", (6, 9))
    np.save(tmp_path / "cube.npy", np.ones((2, 6, 9)))
    with pytest.raises(MaskError, match=r"cube\.npy.*\(H, W\)"):
        read_mask(tmp_path / "cube.npy", (6, 9))
    with pytest.raises(MaskError, match=r"missing\.png: no such file"):
        read_mask(tmp_path / "missing.png", (6, 9))
    with pytest.raises(MaskError, match=r"a\.gif: a mask must be"):
        read_mask(tmp_path / "a.gif", (6, 9))


def test_binner_resizes_and_crops_the_padded_flow():
    """A stand-in flow estimator returns RAFT's padded layout (124 x 130 -> 128 x 136, 2 rows and 3 columns each
    side) with a known flow inside and 1000 px in the padding: only the crop gives the exact means."""
    from jaxvc.models.resample import resize_bilinear

    size = (124, 130)
    frames, mask = moving_clip((0, 2), (1, 0), frames=4)  # 144 x 160, mask at the frame's size
    calls = []

    def fake_flow(first, second):
        calls.append((first, second))
        work = binner.working_mask(mask)
        flow = np.full((len(first), 128, 136, 2), 1000.0, np.float32)
        inside = np.where(work[..., None], np.float32([6, 8]), np.float32([0, 2]))
        flow[:, 2:126, 3:133] = inside
        return flow

    binner = MotionBinner(fake_flow, size, flow_frame=2)
    assert binner.score(frames, mask) == {"fg_flow": 10.0, "bg_flow": 2.0}
    [(first, second)] = calls
    assert first.shape == second.shape == (1, *size, 3) and first.dtype == np.uint8
    want = np.clip(np.round(np.asarray(resize_bilinear(frames[[0, 2]].astype(np.float32), size))), 0, 255)
    np.testing.assert_array_equal(first[0], want[0])
    np.testing.assert_array_equal(second[0], want[1])
    work = binner.working_mask(mask)
    assert work.shape == size and work.sum() == _resize_nearest(mask, size).sum() > 0

    with pytest.raises(ValueError, match="3 frame.*frame 3"):
        MotionBinner(fake_flow, size, flow_frame=3).score(frames[:3], mask)
    with pytest.raises(ValueError, match="at least 121"):
        MotionBinner(fake_flow, (120, 200))
    with pytest.raises(ValueError, match=r"returned \(124, 130, 2\).*padded \(128, 136, 2\)"):
        MotionBinner(lambda a, b: np.zeros((len(a), *size, 2)), size).score(frames, mask)


def test_command_refuses_bad_settings_before_loading_raft(tmp_path):
    from jaxvc.cli import main as jaxvc_main

    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "clip.mp4").write_bytes(b"")
    (tmp_path / "other.mp4").write_bytes(b"")
    two = [str(tmp_path / "a"), str(tmp_path / "other.mp4")]
    (tmp_path / "masks").mkdir()
    common = ["--masks", str(tmp_path / "masks"), "--raft-model", str(tmp_path / "none.pth"), "--out",
              str(tmp_path / "out")]
    with pytest.raises(SystemExit, match="at least 121"):
        jaxvc_main(["motion-bins", *two, "--size", "100", "128"] + common)
    with pytest.raises(SystemExit, match="share the file stem 'clip'"):
        jaxvc_main(["motion-bins", str(tmp_path / "a"), str(tmp_path / "b")] + common)
    with pytest.raises(SystemExit, match="increasing"):
        jaxvc_main(["motion-bins", *two, "--edges", "50", "25"] + common)
    with pytest.raises(SystemExit, match="--masks .*no such folder"):
        jaxvc_main(["motion-bins", *two] + common[:1] + [str(tmp_path / "x")] + common[2:])


def test_command_writes_the_bins(tmp_path, capsys):
    pytest.importorskip("torch")
    from safetensors.torch import save_file

    from jaxvc.cli import main as jaxvc_main
    from jaxvc.data.media import read_image, read_video
    from jaxvc.eval.cli import read_records, real_video_paths
    from jaxvc.eval.dynamic_degree import FlowEstimator
    from jaxvc.media import write_mp4
    from tests.test_raft_dynamic_degree import random_torch_raft

    raft = tmp_path / "raft.safetensors"
    save_file({k: v.clone() for k, v in random_torch_raft(True, seed=7).state_dict().items()}, raft)
    videos, masks = tmp_path / "videos", tmp_path / "masks"
    videos.mkdir(), masks.mkdir()
    # (foreground, background) shifts in pixels per frame: still, three foreground speeds, a moving camera
    motions = {"c0": ((0, 0), (0, 0)), "c1": ((1, 2), (0, 0)), "c2": ((3, 4), (0, 0)), "c3": ((6, 8), (0, 0)),
               "c4": ((2, 0), (3, 4)), "nomask": ((0, 0), (0, 0)), "badmask": ((0, 0), (0, 0))}
    mask_files = {"c0": "c0.png", "c1": "c1.npy", "c2": "c2.jpg", "c3": "c3.png", "c4": "c4.png",
                  "badmask": "badmask.png"}
    for seed, (name, (fg, bg)) in enumerate(motions.items()):
        frames, mask = moving_clip(fg, bg, seed=seed)
        write_mp4(videos / f"{name}.mp4", frames, fps=8)
        if name in mask_files:
            save_mask(masks / mask_files[name], mask if name != "badmask" else np.zeros_like(mask))
    (videos / "broken.mp4").write_bytes(b"not a video")
    save_mask(masks / "broken.png", moving_clip((0, 0), (0, 0))[1])
    prompts = {name: f"clip {name}" for name in ("c0", "c1", "c2", "c3")}  # c4: a record without a prompt
    names = list(motions) + ["broken"]
    (videos / "set.jsonl").write_text("\n".join(
        json.dumps({"video": f"{name}.mp4", **({"prompt": prompts[name]} if name in prompts else {})})
        for name in names))

    # the flows the command will measure: same clips, same batches (c0-c3, then c4), same working size
    valid = ["c0", "c1", "c2", "c3", "c4"]
    binner = MotionBinner(FlowEstimator.from_file(raft, batch_size=4), (128, 128))
    pairs, work_masks, decoded = [], [], {}
    for name in valid:
        decoded[name] = read_video(str(videos / f"{name}.mp4"))[0]
        pairs.append(binner.frame_pair(decoded[name]))
        work_masks.append(binner.working_mask(read_mask(masks / mask_files[name], decoded[name].shape[1:3])))
    flows = []
    for start in (0, 4):
        chunk = slice(start, start + 4)
        flows += binner.score_pairs(np.stack([p[0] for p in pairs[chunk]]), np.stack([p[1] for p in pairs[chunk]]),
                                    np.stack(work_masks[chunk]))
    flows = dict(zip(valid, flows))
    # edges between the measured values: the clip with the most background flow is dropped, then 1 / 2 / 1
    camera = max(valid, key=lambda n: flows[n][1])
    rest = sorted((n for n in valid if n != camera), key=lambda n: flows[n][0])
    middle = lambda a, b: (flows[a][0] + flows[b][0]) / 2  # noqa: E731
    max_background = (flows[camera][1] + max(flows[n][1] for n in rest)) / 2
    edges = (middle(rest[0], rest[1]), middle(rest[2], rest[3]))
    want_bins = {"small": rest[:1], "medium": sorted(rest[1:3], key=valid.index), "large": rest[3:]}  # input order

    out = tmp_path / "bins"
    code = jaxvc_main(["motion-bins", str(videos / "set.jsonl"), "--masks", str(masks), "--raft-model", str(raft),
                       "--size", "128", "128", "--edges", repr(edges[0]), repr(edges[1]), "--max-background",
                       repr(max_background), "--per-bin", "1", "--seed", "3", "--batch-size", "4", "--out", str(out)])
    assert code == 1  # three clips skipped
    printed = capsys.readouterr()
    assert "nomask.mp4: no mask nomask" in printed.err and "badmask.png" in printed.err
    assert "broken.mp4" in printed.err
    assert "medium" in printed.out and "dropped as camera motion" in printed.out

    summary = json.loads((out / "motion_bins.json").read_text())
    assert summary["bins"] == {"small": {"clips": 1, "kept": 1}, "medium": {"clips": 2, "kept": 1},
                               "large": {"clips": 1, "kept": 1}}
    assert summary["dropped_camera_motion"] == 1 and summary["skipped"] == 3
    assert summary["skipped_by_kind"] == {"no mask": 1, "mask": 1, "video": 1}
    assert summary["settings"]["size"] == [128, 128] and summary["settings"]["per_bin"] == 1
    assert len(summary["clips"]) == 5
    medium_kept = want_bins["medium"][choose([0, 1], 1, seed=3, salt=1)[0]]
    written = {}
    for name in ("small", "medium", "large"):
        lines = (out / f"{name}.jsonl").read_text().splitlines()
        assert len(lines) == 1
        record = json.loads(lines[0])
        clip = record["video"].rsplit("/", 1)[-1][:-4]
        assert clip == (medium_kept if name == "medium" else want_bins[name][0]) and record["bin"] == name
        assert set(record) == {"video", "reference", "fg_flow", "bg_flow", "bin"} | ({"prompt"} if clip in prompts
                                                                                      else set())
        assert record.get("prompt") == prompts.get(clip)
        np.testing.assert_allclose([record["fg_flow"], record["bg_flow"]], flows[clip], rtol=1e-5)
        np.testing.assert_array_equal(read_image(record["reference"]), decoded[clip][0])  # the first frame, as is
        written[name] = clip
    dropped = [c for c in summary["clips"] if c["bin"] is None]
    assert [c["video"].rsplit("/", 1)[-1] for c in dropped] == [f"{camera}.mp4"] and dropped[0]["reference"] is None
    assert sorted(p.stem for p in (out / "first_frames").iterdir()) == sorted(written.values())  # cut ones removed
    # what `jaxvc eval --real-videos` and generation read
    bin_files = [out / f"{name}.jsonl" for name in ("small", "medium", "large")]
    assert real_video_paths(bin_files) == [str(videos / f"{written[n]}.mp4") for n in ("small", "medium", "large")]
    assert [r["references"] for r in read_records(bin_files)] == [
        [str((out / "first_frames" / f"{written[n]}.png").resolve())] for n in ("small", "medium", "large")]
