"""`jaxvc pack`: folders and manifests of real media (videos via PyAV, images, pairs, captions, masks) into
ArrayRecord shards; broken files reported and skipped; resumable; the synthetic world packs losslessly."""
import json
import os

import av
import numpy as np
import pytest
from PIL import Image

from jaxvc import cli
from jaxvc.data import records
from jaxvc.data.pipeline import BatchDataset, DataConfig
from jaxvc.data.sources import FolderSource, PackedSource
from jaxvc.data.synthetic import SyntheticWorld


def write_video(path, frames, codec="mpeg4", fps=8):
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def moving_square(n=12, h=24, w=32):
    frames = np.full((n, h, w, 3), 40, np.uint8)
    masks = np.zeros((n, h, w), bool)
    for k in range(n):
        frames[k, 8:16, 2 + k:10 + k] = (220, 180, 30)
        masks[k, 8:16, 2 + k:10 + k] = True
    return frames, masks


@pytest.fixture(scope="module")
def media_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    frames, masks = moving_square()
    write_video(root / "clip_a.mp4", frames)
    write_video(root / "clip_a.mask.mp4", np.repeat(masks[..., None] * np.uint8(255), 3, -1))
    (root / "clip_a.txt").write_text("a yellow square moves right\na square slides\n")
    sub = root / "more"
    sub.mkdir()
    write_video(sub / "clip_b.webm", frames[:6], codec="libvpx")
    Image.fromarray(frames[0]).save(root / "photo.png")
    (root / "photo.txt").write_text("a photo\n")
    Image.fromarray(frames[1]).save(root / "pair_0.jpg")
    Image.fromarray(frames[5]).save(root / "pair_1.jpg")
    (root / "pair_0.txt").write_text("view zero\n")
    (root / "pair_1.txt").write_text("view one\n")
    # Broken files: random bytes named .mp4, an empty .mov, a truncated JPEG.
    (root / "broken.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 3000, np.uint8).tobytes())
    (root / "empty.mov").write_bytes(b"")
    good_jpeg = (root / "pair_0.jpg").read_bytes()
    (sub / "truncated.jpg").write_bytes(good_jpeg[:60])
    (root / "notes.md").write_text("not media")
    return root, frames, masks


def shard_times(out):
    return {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in os.listdir(out) if n.endswith(".array_record")}


def test_pack_folder_packs_good_files_and_reports_broken(media_folder, tmp_path, capsys):
    root, frames, masks = media_folder
    out = str(tmp_path / "packed")
    rc = cli.main(["pack", str(root), "-o", out, "--records-per-shard", "1", "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "packed 4 records (2 video, 1 image_pair, 1 image)" in text
    assert "skipped 3 unreadable file(s)" in text
    for name in ("broken.mp4", "empty.mov", "truncated.jpg"):
        assert name in text
    info = json.load(open(os.path.join(out, "dataset_info.json")))
    assert {k: v["records"] for k, v in info["kinds"].items()} == {"video": 2, "image_pair": 1, "image": 1}
    assert sorted(os.path.basename(s["path"]) for s in info["skipped"]) == ["broken.mp4", "empty.mov", "truncated.jpg"]

    videos = PackedSource(out, kinds="video")
    by_source = {os.path.basename(videos[i]["source"]): videos[i] for i in range(len(videos))}
    clip = by_source["clip_a.mp4"]
    assert clip["captions"] == ["a yellow square moves right", "a square slides"] and clip["fps"] == 8.0
    decoded = records.decode_frames(clip)
    assert decoded.shape == frames.shape
    assert np.abs(decoded.astype(float) - frames).mean() < 6  # MPEG-4 + JPEG are lossy, but close
    mask = records.decode_mask(clip)
    assert mask.shape == masks.shape and (mask == masks).mean() > 0.97
    assert records.num_frames(by_source["clip_b.webm"]) == 6 and by_source["clip_b.webm"]["mask"] is None
    pair = PackedSource(out, kinds="image_pair")[0]
    assert pair["captions"] == ["view zero", "view one"] and records.num_frames(pair) == 2
    assert PackedSource(out, kinds="image")[0]["captions"] == ["a photo"]

    # The packed folder feeds the pipeline directly.
    batch = BatchDataset({"video": videos, "pairs": PackedSource(out, kinds=["image_pair", "image"])},
                         DataConfig(batch_size=4, image_size=16, num_frames=4, frame_stride=2), 0, 1)[0]
    assert batch["video"].shape == (4, 4, 16, 16, 3) and int(batch["num_skipped"]) == 0


def test_pack_resumes_and_refuses_a_different_input(media_folder, tmp_path, capsys):
    root, _, _ = media_folder
    out = str(tmp_path / "packed")
    args = ["pack", str(root), "-o", out, "--records-per-shard", "1", "--no-progress"]
    assert cli.main(args) == 0
    first = shard_times(out)
    assert len(first) == 7  # one planned shard per media file (those of broken files hold no records)
    assert cli.main(args) == 0  # nothing left to do: no shard rewritten
    assert shard_times(out) == first
    # Interrupted run: one shard never finished (its file is missing): only that shard is written again.
    victim = sorted(first)[0]
    os.remove(os.path.join(out, victim))
    assert cli.main(args) == 0
    again = shard_times(out)
    assert {n for n in first if again[n] != first[n]} == {victim}
    # A different plan (other options) refuses to mix into the same output unless --restart.
    with pytest.raises(ValueError, match="different input or options"):
        cli.main(args + ["--frame-format", "png"])
    assert cli.main(args + ["--frame-format", "png", "--restart"]) == 0
    capsys.readouterr()


def test_pack_manifest_with_pairs_panels_and_missing_files(media_folder, tmp_path, capsys):
    root, frames, _ = media_folder
    panel = np.concatenate([frames[0], frames[7]], axis=1)  # a two-panel image (Subjects200K style)
    Image.fromarray(panel).save(tmp_path / "panel.png")
    manifest = tmp_path / "list.jsonl"
    lines = [{"images": [str(root / "pair_0.jpg"), str(root / "pair_1.jpg")], "description_0": "d0",
              "description_1": "d1"},
             {"image": "panel.png", "split_panels": True, "captions": ["left", "right"]},
             {"video": str(root / "clip_a.mp4"), "caption": "one caption", "mask": str(root / "clip_a.mask.mp4")},
             {"video": "does_not_exist.mp4"}]
    manifest.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = str(tmp_path / "out")
    assert cli.main(["pack", str(manifest), "-o", out, "--frame-format", "png", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "does_not_exist.mp4" in text and "skipped 1 unreadable" in text
    pairs = PackedSource(out, kinds="image_pair")
    got = {tuple(pairs[i]["captions"]): pairs[i] for i in range(len(pairs))}
    assert set(got) == {("d0", "d1"), ("left", "right")}
    left, right = records.decode_frames(got[("left", "right")])  # PNG: lossless
    np.testing.assert_array_equal(left, frames[0])
    np.testing.assert_array_equal(right, frames[7])
    video = PackedSource(out, kinds="video")[0]
    assert video["captions"] == ["one caption"] and records.decode_mask(video).shape == (12, 24, 32)
    # The same manifest read without packing.
    folder = FolderSource(str(manifest))
    assert len(folder) == 4 and folder[0]["kind"] == "image_pair"


def test_pack_synthetic_world_is_lossless(tmp_path, capsys):
    out = str(tmp_path / "syn")
    rc = cli.main(["pack", "-o", out, "--synthetic-videos", "5", "--synthetic-pairs", "3", "--synthetic-size", "16",
                   "--synthetic-frames", "4", "--synthetic-subjects", "10", "--synthetic-held-out", "2",
                   "--frame-format", "png", "--no-progress", "--workers", "1"])
    assert rc == 0 and "packed 8 records" in capsys.readouterr().out
    world = SyntheticWorld(image_size=16, num_frames=4, num_subjects=10, held_out=2)
    videos = PackedSource(out, kinds="video")
    assert len(videos) == 5
    rec = videos[2]
    _, subject, motion, seed = rec["source"].split(":")[1:]
    frames, masks, caption, _ = world.video(int(subject), motion, seed=int(seed))
    np.testing.assert_array_equal(records.decode_frames(rec), frames)
    np.testing.assert_array_equal(records.decode_mask(rec), masks)
    assert rec["captions"] == [caption]
    assert int(subject) in world.train_subject_ids


def test_jpeg_frames_decoded_at_reduced_scale_keep_masks_aligned(tmp_path, capsys):
    """64x64 JPEG frames read for a 16x16 pipeline decode at 1/4 scale (DCT scaling); masks stay full size and must
    be cropped with the box mapped onto their grid."""
    out = str(tmp_path / "syn64")
    assert cli.main(["pack", "-o", out, "--synthetic-videos", "3", "--synthetic-size", "64", "--synthetic-frames", "4",
                     "--synthetic-subjects", "10", "--synthetic-held-out", "2", "--no-progress"]) == 0
    capsys.readouterr()
    source = PackedSource(out, kinds="video")
    frame = records.decode_frames(source[0], [0], min_size=(16, 16))
    assert frame.shape == (1, 16, 16, 3)  # decoded small
    cfg = DataConfig(batch_size=3, image_size=(16, 12), num_frames=4, shuffle=False, clip_position="start",
                     random_crop=True, hflip=0.0, affine_degrees=0.0, affine_translate=0.0, affine_scale=(1.0, 1.0))
    batch = BatchDataset({"video": source}, cfg, 0, 1)[0]
    video = np.round((batch["video"] + 1) * 127.5)
    mask = batch["mask"] > 0
    for b in range(3):
        border = np.concatenate([video[b, :, 0], video[b, :, -1]]).reshape(-1, 3)
        background = np.median(border, axis=0)
        far = np.linalg.norm(video[b] - background, axis=-1) > 60
        inside = far[mask[b]].mean()
        outside = far[~mask[b]].mean()
        assert inside > 0.8 and outside < 0.1, (inside, outside)


def test_provided_reference_images_travel_with_their_records(media_folder, tmp_path, capsys):
    """VideoMaker's VideoBooth data: each video comes with its own segmented subject images. `jaxvc pack` takes them
    from `<stem>.ref*.<ext>` files (or a manifest's "references"), on white where transparent, into the record;
    `data.reference="provided"` trains on one of them instead of a frame; a record without any is skipped."""
    from jaxvc.data import transforms
    from jaxvc.data.sources import ListSource

    root, frames, _ = media_folder
    folder = tmp_path / "booth"
    folder.mkdir()
    write_video(folder / "dog.mp4", frames)
    disc = np.zeros((20, 20, 4), np.uint8)  # a red disc cut out on transparency
    yy, xx = np.mgrid[:20, :20]
    disc[(yy - 10) ** 2 + (xx - 10) ** 2 < 49] = (200, 30, 30, 255)
    Image.fromarray(disc, "RGBA").save(folder / "dog.ref.png")
    tall = np.zeros((30, 10, 3), np.uint8)
    tall[..., 2] = 220
    Image.fromarray(tall).save(folder / "dog.ref2.png")
    Image.fromarray(frames[0]).save(folder / "cat.png")
    Image.fromarray(frames[3]).save(folder / "cat_ref.png")
    out = str(tmp_path / "packed")
    assert cli.main(["pack", str(folder), "-o", out, "--frame-format", "png", "--no-progress"]) == 0
    assert "packed 2 records (1 video, 1 image)" in capsys.readouterr().out  # the reference files are not media
    video = PackedSource(out, kinds="video")[0]
    disc_ref, tall_ref = records.decode_references(video, [0, 1])
    white_disc = np.where(disc[..., 3:] > 0, disc[..., :3], 255).astype(np.uint8)
    np.testing.assert_array_equal(disc_ref, white_disc)  # PNG: lossless; transparent -> white
    np.testing.assert_array_equal(tall_ref, tall)
    image = PackedSource(out, kinds="image")[0]
    np.testing.assert_array_equal(records.decode_references(image, [0])[0], frames[3])

    plain = dict(image_size=16, num_frames=4, hflip=0.0, affine_degrees=0.0, affine_translate=0.0,
                 affine_scale=(1.0, 1.0), highlight=False, with_mask=False)
    size = (16, 16)
    expected = [transforms.resize_crop(r[None], size, transforms.crop_box(*r.shape[:2], size, None, False))[0]
                for r in (white_disc, tall)]  # covered and centre-cropped, as `jaxvc generate` does
    ds = BatchDataset({"video": PackedSource(out, kinds="video")},
                      DataConfig(batch_size=4, reference="provided", **plain), 0, 1)
    seen = set()
    for b in range(4):
        for reference in ds[b]["reference"]:
            uint8 = np.round((reference + 1) * 127.5).astype(np.uint8)
            seen.add(next(i for i, e in enumerate(expected) if np.abs(uint8.astype(int) - e).max() <= 1))
    assert seen == {0, 1}  # a random one of the record's references, never a frame
    # Not provided: the frame-based modes ignore them; a record without references is skipped and named
    frame_ref = BatchDataset({"video": PackedSource(out, kinds="video")}, DataConfig(batch_size=1, **plain), 0, 1)
    assert not any(np.abs(np.round((frame_ref[0]["reference"][0] + 1) * 127.5) - e).max() <= 1 for e in expected)
    bare = ListSource([{"kind": "video", "frames": frames, "captions": ["x"], "fps": 8.0, "source": "bare.mp4"}])
    with pytest.raises(records.CorruptRecordError, match=r"bare.mp4: no reference images \(data.reference="):
        BatchDataset({"video": bare}, DataConfig(batch_size=1, reference="provided", **plain), 0, 1)[0]
    # A manifest's "references", read directly (no packing)
    manifest = tmp_path / "list.jsonl"
    manifest.write_text(json.dumps({"video": str(folder / "dog.mp4"), "references": ["booth/dog.ref.png"]}) + "\n")
    direct = FolderSource(str(manifest))[0]
    np.testing.assert_array_equal(records.decode_references(direct, [0])[0], white_disc)


def test_manifest_prompt_key_is_the_caption_and_sizes_must_be_positive(tmp_path):
    """jaxvc's own manifests (generate's manifest.jsonl, motion-bins, prompt sets) name the text "prompt": pack reads
    it as the caption (it was dropped: the clip trained unconditionally); a size, count or stride of 0 is refused."""
    import argparse

    from jaxvc.data.pack import add_arguments, read_manifest

    manifest = tmp_path / "set.jsonl"
    manifest.write_text(json.dumps({"video": "clip.mp4", "prompt": "a dog runs"}) + "\n")
    [item] = read_manifest(str(manifest))
    assert item["captions"] == ["a dog runs"]
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    for flag in ("--short-side", "--max-frames", "--frame-stride", "--records-per-shard", "--workers"):
        with pytest.raises(SystemExit):
            parser.parse_args(["in", "-o", "out", flag, "0"])
    assert parser.parse_args(["in", "-o", "out", "--short-side", "256"]).short_side == 256


def test_mask_and_reference_names_are_sidecars_only_beside_their_media(tmp_path):
    """`dog_mask.png` beside `dog.png` is its mask; `gas_mask.png` or `chef_ref.png` alone is an image of its own
    (they were dropped without a word)."""
    from PIL import Image

    from jaxvc.data.pack import scan_folder

    for name in ("dog.png", "dog_mask.png", "cat.png", "cat.ref.png", "gas_mask.png", "chef_ref.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    items = {os.path.basename(item["paths"][0]): item for item in scan_folder(str(tmp_path))}
    assert sorted(items) == ["cat.png", "chef_ref.png", "dog.png", "gas_mask.png"]
    assert items["dog.png"]["masks"] == [str(tmp_path / "dog_mask.png")]
    assert items["cat.png"]["references"] == [str(tmp_path / "cat.ref.png")]
    assert items["gas_mask.png"]["masks"] == [None] and "references" not in items["chef_ref.png"]
