"""Grain pipeline: mixture weights, batch-level switching, sharding, shuffling, transforms, corrupt records, and exact
save/restore of the iterator (with and without worker processes)."""
import json

import numpy as np
import pytest

from jaxvc.data import records
from jaxvc.data.pipeline import BatchDataset, DataConfig, DataIterator, hash_uniform, make_pipeline
from jaxvc.data.sources import ListSource
from jaxvc.data.synthetic import SyntheticPairSource, SyntheticVideoSource, SyntheticWorld

SIZE = 8


def video_example(i: int, frames: int = 20) -> dict:
    """Frame k of video i is flat with value 10*k (red) and i (green): the clip's frame indices can be read back."""
    f = np.zeros((frames, SIZE, SIZE, 3), np.uint8)
    f[..., 0] = (10 * np.arange(frames))[:, None, None]
    f[..., 1] = i
    mask = np.zeros((frames, SIZE, SIZE), bool)
    mask[:, 2:6, 2:6] = True
    return {"kind": "video", "frames": f, "mask": mask, "captions": [f"video {i}"], "fps": 8.0, "source": f"v{i}"}


def pair_example(i: int) -> dict:
    views = np.zeros((2, SIZE, SIZE, 3), np.uint8)
    views[0, ..., 2], views[1, ..., 2] = 100, 200
    views[..., 1] = i
    return {"kind": "image_pair", "frames": views, "mask": None, "captions": [f"pair {i} view 0", f"pair {i} view 1"],
            "fps": 0.0, "source": f"p{i}"}


class FlakySource(ListSource):
    """Indices in `bad` raise like an undecodable record."""

    def __init__(self, examples, bad):
        super().__init__(examples)
        self.bad = set(bad)

    def __getitem__(self, index):
        if int(index) in self.bad:
            raise records.CorruptRecordError(f"record {index} is corrupt")
        return super().__getitem__(index)


PLAIN = dict(image_size=SIZE, num_frames=4, hflip=0.0, affine_degrees=0.0, affine_translate=0.0,
             affine_scale=(1.0, 1.0), random_crop=False, highlight=False)


@pytest.fixture(scope="module")
def streams():
    return {"image": ListSource([pair_example(i) for i in range(30)]),
            "video": ListSource([video_example(i) for i in range(40)])}


def test_batch_format(streams):
    tokenizer = lambda caps: np.array([[len(c), c.count(" ")] for c in caps], np.int32)  # noqa: E731
    ds = BatchDataset(streams, DataConfig(batch_size=6, image_size=SIZE, num_frames=4), 0, 1, tokenizer)
    b = ds[3]
    assert b["video"].shape == (6, 4, SIZE, SIZE, 3) and b["video"].dtype == np.float32
    assert b["reference"].shape == (6, SIZE, SIZE, 3) and b["reference"].dtype == np.float32
    assert b["mask"].shape == (6, 4, SIZE, SIZE) and b["has_mask"].dtype == bool
    assert b["video"].min() >= -1.0 and b["video"].max() <= 1.0
    assert b["caption"].shape == (6,) and all(isinstance(c, str) for c in b["caption"].tolist())
    assert b["tokens"].shape == (6, 2) and b["tokens"][0, 0] == len(b["caption"][0])
    assert set(b["kind"]) <= {"video", "image_pair"} and int(b["batch_index"]) == 3
    # Masks exist exactly for the video records.
    np.testing.assert_array_equal(b["has_mask"], b["kind"] == "video")


def test_mixture_weights_hold_within_sampling_error(streams):
    cfg = DataConfig(batch_size=16, weights={"image": 0.7, "video": 0.3}, **PLAIN)
    ds = BatchDataset(streams, cfg, 0, 1)
    slots = ds._schedule.streams(0, 2000)  # (batches, slots): stream drawn by every global slot
    frac = (slots == 1).mean()
    sigma = np.sqrt(0.3 * 0.7 / slots.size)
    assert abs(frac - 0.3) < 4 * sigma, (frac, sigma)
    per_batch = (slots == 1).mean(1)
    assert np.mean((per_batch > 0) & (per_batch < 1)) > 0.95  # examples of both streams share batches
    # The materialised batches follow the schedule.
    for b in range(20):
        kinds = ds[b]["kind"]
        np.testing.assert_array_equal(kinds == "video", slots[b] == 1)


def test_switching_gives_whole_batches_at_rate_p(streams):
    p = 0.25
    cfg = DataConfig(batch_size=8, weights={"image": 1 - p, "video": p}, switch=True, **PLAIN)
    ds = BatchDataset(streams, cfg, 0, 1)
    slots = ds._schedule.streams(0, 4000)
    assert np.all(slots == slots[:, :1])  # one stream per batch
    frac = (slots[:, 0] == 1).mean()
    assert abs(frac - p) < 4 * np.sqrt(p * (1 - p) / 4000), frac
    kinds = [set(ds[b]["kind"].tolist()) for b in range(40)]
    assert all(len(k) == 1 for k in kinds)
    assert {next(iter(k)) for k in kinds} == {"video", "image_pair"}
    # Every host draws the same kind for the same batch.
    other = BatchDataset(streams, cfg, 1, 2)
    assert all(set(other[b]["kind"].tolist()) == kinds[b] for b in range(10))


def test_fixed_split_gives_every_batch_each_streams_share(streams):
    """``fixed_split``: CustomCrafter's batch of instance and class images, the same share of every batch (weights
    x batch size, largest remainders), each stream still read record by record through its passes."""
    cfg = DataConfig(batch_size=4, weights={"image": 1.0, "video": 2.0}, fixed_split=True, **PLAIN)
    ds = BatchDataset(streams, cfg, 0, 1)
    assert ds._schedule.streams(0, 50).tolist() == [[0, 1, 1, 1]] * 50  # 4/3 and 8/3 slots: 1 and 3
    positions = [ds._schedule.slots(b) for b in range(60)]
    assert [p for slots in positions for s, p in slots if s == 0] == list(range(60))
    assert [p for slots in positions for s, p in slots if s == 1] == list(range(180))
    assert ds[7]["kind"].tolist() == ["image_pair", "video", "video", "video"]
    half = BatchDataset(streams, DataConfig(batch_size=4, weights={"image": 1.0, "video": 1.0}, fixed_split=True,
                                            **PLAIN), 0, 1)
    assert half[0]["stream"].tolist() == ["image", "image", "video", "video"]
    with pytest.raises(ValueError, match="fixed_split .* and switch .* exclude each other"):
        BatchDataset(streams, DataConfig(batch_size=4, fixed_split=True, switch=True, **PLAIN), 0, 1)
    # one slot for two streams: the second (CustomCrafter's prior images at batch_size 1) would never be read
    with pytest.raises(ValueError, match=r"batch_size 1 gives stream\(s\) \['video'\] no slot"):
        BatchDataset(streams, DataConfig(batch_size=1, weights={"image": 1.0, "video": 1.0}, fixed_split=True,
                                         **PLAIN), 0, 1)


def test_switched_streams_with_their_own_batch_sizes(streams):
    """``batch_sizes`` under ``switch``: method (e)'s 8 image pairs / 6 videos per GPU. A batch has the drawn
    stream's size, each stream is still read position by position, hosts split every batch size into the same
    shares, and a restored iterator continues exactly."""
    p = 0.3
    cfg = DataConfig(batch_size=8, weights={"image": 1 - p, "video": p}, switch=True,
                     batch_sizes={"image": 8, "video": 6}, **PLAIN)
    ds = BatchDataset(streams, cfg, 0, 1)
    draws = ds._schedule.switch_draws(0, 40)
    batches = [ds[b] for b in range(40)]
    assert set(draws.tolist()) == {0, 1}
    for b, draw in zip(batches, draws):
        size = 8 if draw == 0 else 6
        assert b["video"].shape[0] == len(b["caption"]) == size and int(b["global_batch_size"]) == size
        assert set(b["stream"].tolist()) == {"image" if draw == 0 else "video"}
    positions = [ds._schedule.slots(b) for b in range(40)]
    for stream in (0, 1):  # consecutive positions: every record once per pass
        seen = [q for slots in positions for s, q in slots if s == stream]
        assert seen == list(range(int((draws == stream).sum()) * (8 if stream == 0 else 6)))
    # Two hosts: halves of every batch (4 of 8 image pairs, 3 of 6 videos), together the one-host batch.
    hosts = [BatchDataset(streams, cfg, h, 2) for h in range(2)]
    for b in (0, 1, 2, 3, 4, 5):
        parts = [h[b] for h in hosts]
        assert [len(q["caption"]) for q in parts] == [len(batches[b]["caption"]) // 2] * 2
        assert all(int(q["global_batch_size"]) == int(batches[b]["global_batch_size"]) for q in parts)
        for key in ("video", "reference", "caption"):
            np.testing.assert_array_equal(np.concatenate([q[key] for q in parts]), batches[b][key])
    # Restore: the saved counts are whole batches of each stream's size; the batches after it are the same.
    it = make_pipeline(streams, cfg, process_index=0, process_count=1)
    for _ in range(7):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    counts = ds._schedule.counts_before(7)
    assert state["stream_counts"] == counts.tolist() and counts[0] % 8 == 0 and counts[1] % 6 == 0
    resumed = make_pipeline(streams, cfg, process_index=0, process_count=1)
    resumed.set_state(state)
    for b in range(7, 12):
        np.testing.assert_array_equal(next(resumed)["video"], batches[b]["video"])
    with pytest.raises(ValueError, match="do not fit batch 7"):
        resumed.set_state({**state, "stream_counts": [counts[0] + 1, counts[1] - 1]})
    # Refused: sizes without switch, an unknown stream, a size the hosts cannot share.
    with pytest.raises(ValueError, match="batch_sizes .* needs switch=True"):
        BatchDataset(streams, DataConfig(batch_size=8, batch_sizes={"video": 6}, **PLAIN), 0, 1)
    with pytest.raises(ValueError, match=r"batch_sizes names streams \['clips'\]"):
        BatchDataset(streams, DataConfig(batch_size=8, switch=True, batch_sizes={"clips": 6}, **PLAIN), 0, 1)
    with pytest.raises(ValueError, match="a global batch of 6 does not split over the hosts"):
        BatchDataset(streams, DataConfig(batch_size=8, switch=True, batch_sizes={"video": 6}, **PLAIN), 1, 4)


def test_every_record_once_per_pass_and_seeded_shuffle(streams):
    ds = BatchDataset(streams, DataConfig(batch_size=4, seed=3, **PLAIN), 0, 1)
    n = len(streams["video"])
    first = [ds.record_index(1, p) for p in range(n)]
    second = [ds.record_index(1, p) for p in range(n, 2 * n)]
    assert sorted(first) == list(range(n)) and sorted(second) == list(range(n))
    assert first != second and first != list(range(n))
    same = BatchDataset(streams, DataConfig(batch_size=4, seed=3, **PLAIN), 0, 1)
    other = BatchDataset(streams, DataConfig(batch_size=4, seed=4, **PLAIN), 0, 1)
    assert [same.record_index(1, p) for p in range(n)] == first
    assert [other.record_index(1, p) for p in range(n)] != first
    # Consumed positions per stream are consecutive: after enough batches each stream covered whole passes.
    cfg = DataConfig(batch_size=10, weights={"image": 0.5, "video": 0.5}, seed=3, **PLAIN)
    ds = BatchDataset(streams, cfg, 0, 1)
    seen = [ds._schedule.slots(b) for b in range(30)]
    video_positions = sorted(p for batch in seen for s, p in batch if s == 1)
    assert video_positions == list(range(len(video_positions)))


def test_per_host_shards_partition_the_global_batch(streams):
    cfg = DataConfig(batch_size=8, weights={"image": 0.5, "video": 0.5}, **PLAIN)
    whole = BatchDataset(streams, cfg, 0, 1)
    hosts = [BatchDataset(streams, cfg, h, 4) for h in range(4)]
    for b in (0, 5, 17):
        full = whole[b]
        parts = [h[b] for h in hosts]
        for key in ("video", "reference", "mask", "caption", "kind"):
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), full[key])
    with pytest.raises(ValueError, match="divisible"):
        BatchDataset(streams, DataConfig(batch_size=6, **PLAIN), 0, 4)


def test_clip_sampling_reference_and_frozen_images(streams):
    cfg = DataConfig(batch_size=16, frame_stride=3, reference="candidates", reference_candidates=(0, 2), **PLAIN)
    ds = BatchDataset({"video": streams["video"]}, cfg, 0, 1)
    b = ds[0]
    frame_ids = np.round((b["video"][..., 0].mean((2, 3)) + 1) * 127.5 / 10).astype(int)  # (B, T)
    np.testing.assert_array_equal(np.diff(frame_ids, axis=1), 3)  # stride 3, clip length 4
    ref_ids = np.round((b["reference"][..., 0].mean((1, 2)) + 1) * 127.5 / 10).astype(int)
    assert all(r in (c[0], c[2]) for r, c in zip(ref_ids, frame_ids))  # one of the candidate positions
    assert {int(r == c[0]) for r, c in zip(ref_ids, frame_ids)} == {0, 1}
    # Image pairs: the target is a frozen video of one view; the reference is the other view; caption of target.
    pairs = BatchDataset({"image": streams["image"]}, DataConfig(batch_size=8, **PLAIN), 0, 1)[0]
    np.testing.assert_array_equal(pairs["video"], np.repeat(pairs["video"][:, :1], 4, axis=1))
    target_blue = np.round((pairs["video"][:, 0, 0, 0, 2] + 1) * 127.5)
    ref_blue = np.round((pairs["reference"][:, 0, 0, 2] + 1) * 127.5)
    assert set(zip(target_blue.tolist(), ref_blue.tolist())) == {(100.0, 200.0), (200.0, 100.0)}
    for blue, cap in zip(target_blue, pairs["caption"]):
        assert cap.endswith("view 0" if blue == 100 else "view 1")
    single = BatchDataset({"image": streams["image"]}, DataConfig(batch_size=2, image_frames=1, **PLAIN), 0, 1)[0]
    assert single["video"].shape == (2, 1, SIZE, SIZE, 3)


def test_subject_highlight_and_augmentation():
    world = SyntheticWorld(image_size=32, num_frames=8, num_subjects=12, held_out=2)
    source = SyntheticVideoSource(world, num_records=10)
    plain = {**PLAIN, "image_size": 32, "num_frames": 8}
    hl = BatchDataset({"v": source}, DataConfig(batch_size=4, **{**plain, "highlight": True}, reference="first"),
                      0, 1)[0]
    ref = np.round((hl["reference"] + 1) * 127.5)
    first_mask = hl["mask"][:, 0] > 0
    assert np.all(ref[~first_mask] == 255)  # outside the subject: white
    np.testing.assert_array_equal(ref[first_mask], np.round((hl["video"][:, 0] + 1) * 127.5)[first_mask])
    aug = BatchDataset({"v": source}, DataConfig(batch_size=4, image_size=32, num_frames=8, reference="first",
                                                 hflip=1.0, affine_degrees=0.0, affine_translate=0.0,
                                                 affine_scale=(1.0, 1.0), random_crop=False), 0, 1)[0]
    np.testing.assert_array_equal(aug["reference"], hl["reference"][:, :, ::-1])  # flipped copy of the same view


def test_centred_reference_hides_where_the_subject_was():
    """center_reference: the highlighted subject is moved (whole pixels, unchanged) to the image centre, so the
    reference no longer says where the subject is in its frame; without a mask nothing moves."""
    from jaxvc.data.transforms import center_subject

    world = SyntheticWorld(image_size=32, num_frames=8, num_subjects=12, held_out=2)
    source = SyntheticVideoSource(world, num_records=10)
    common = dict(batch_size=4, image_size=32, num_frames=8, reference="first", hflip=0.0, affine_degrees=0.0,
                  affine_translate=0.0, affine_scale=(1.0, 1.0), random_crop=False, shuffle=False)
    plain = BatchDataset({"v": source}, DataConfig(**common), 0, 1)[0]
    centred = BatchDataset({"v": source}, DataConfig(**common, center_reference=True), 0, 1)[0]
    for before, after, mask in zip(plain["reference"], centred["reference"], plain["mask"][:, 0] > 0):
        subject = np.any(after < 1.0, axis=-1)  # non-white pixels
        rows, cols = np.nonzero(subject)
        assert abs((rows.min() + rows.max() + 1) / 2 - 16) <= 0.5 and abs((cols.min() + cols.max() + 1) / 2 - 16) <= 0.5
        np.testing.assert_array_equal(np.sort(after[subject], axis=0), np.sort(before[mask], axis=0))
    assert not np.array_equal(plain["reference"], centred["reference"])  # these subjects were off-centre

    image = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)
    mask = np.zeros((8, 8), bool)
    mask[0:2, 5:8] = True  # box centre (1, 6.5) -> (4, 4): down 3, left 2 (6.5 - 4 = 2.5 rounds to 2)
    moved = center_subject(image, mask, fill=255)
    np.testing.assert_array_equal(moved[3:5, 3:6], image[0:2, 5:8])
    assert np.all(moved[:3] == 255) and np.all(moved[:, 6:] == 255)
    np.testing.assert_array_equal(center_subject(image, np.zeros((8, 8), bool)), image)


def test_corrupt_records_are_skipped_and_counted():
    bad = {1, 4, 7, 8}
    source = FlakySource([video_example(i) for i in range(12)], bad)
    cfg = DataConfig(batch_size=6, shuffle=False, **PLAIN)
    it = make_pipeline({"video": source}, cfg, process_index=0, process_count=1)
    batches = [next(it) for _ in range(4)]  # two passes over the 12 records
    greens = np.concatenate([np.round((b["video"][:, 0, 0, 0, 1] + 1) * 127.5) for b in batches]).astype(int)
    assert not set(greens.tolist()) & bad
    assert sum(int(b["num_skipped"]) for b in batches) >= 2 * len(bad)
    assert it.skipped == sum(int(b["num_skipped"]) for b in batches)
    it.close()
    hopeless = FlakySource([video_example(0)], {0})
    with pytest.raises(records.CorruptRecordError, match="could not be read"):
        BatchDataset({"video": hopeless}, DataConfig(batch_size=1, max_retries=2, **PLAIN), 0, 1)[0]


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert set(x) == set(y)
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_state_restore_continues_exactly_with_and_without_workers():
    world = SyntheticWorld(image_size=16, num_frames=4, num_subjects=10, held_out=2)
    streams = {"image": SyntheticPairSource(world, num_records=20),
               "video": SyntheticVideoSource(world, num_records=25)}
    cfg = DataConfig(batch_size=4, image_size=16, num_frames=4, weights={"image": 0.6, "video": 0.4}, seed=7)
    it = make_pipeline(streams, cfg, process_index=0, process_count=1)
    for _ in range(9):  # mid-epoch: 9 batches of 4 slots over streams of 20 and 25 records
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    assert state["next_batch"] == 9
    expected = [next(it) for _ in range(4)]
    # Restoring into a fresh iterator continues exactly; so does restoring into one that already ran elsewhere.
    it.set_state(state)
    _assert_same([next(it) for _ in range(4)], expected)
    it.close()
    # With worker processes: the same batches, and a worker run saved mid-epoch gives the same state.
    workers = make_pipeline(streams, cfg, process_index=0, process_count=1, worker_count=2)
    for _ in range(9):
        next(workers)
    assert workers.get_state() == state
    _assert_same([next(workers) for _ in range(4)], expected)
    workers.set_state(state)  # restarts the worker processes at batch 9
    _assert_same([next(workers) for _ in range(4)], expected)
    workers.close()
    changed = make_pipeline(streams, DataConfig(batch_size=4, image_size=16, num_frames=4, seed=8),
                            process_index=0, process_count=1)
    with pytest.raises(ValueError, match="different data config"):
        changed.set_state(state)
    changed.close()


def test_restore_far_into_the_run_uses_saved_counts(streams):
    cfg = DataConfig(batch_size=4, weights={"image": 0.3, "video": 0.7}, **PLAIN)
    reference = BatchDataset(streams, cfg, 0, 1)
    expected = [reference[b] for b in (50_000, 50_001)]  # recounts 50k batches of prefix counts
    state = {"version": 1, "next_batch": 50_000, "skipped": 0, "fingerprint": reference.fingerprint(),
             "stream_counts": reference.stream_counts(50_000)}
    it = make_pipeline(streams, cfg, process_index=0, process_count=1)
    it.set_state(state)
    assert 50_000 in it.dataset._schedule._anchors
    _assert_same([next(it), next(it)], expected)
    assert it.get_state()["stream_counts"] == reference.stream_counts(50_002)
    bad = dict(state, stream_counts=[1, 2])
    with pytest.raises(ValueError, match="do not fit batch"):
        it.set_state(bad)
    it.close()


def test_hash_uniform_is_uniform_and_keyed():
    u = hash_uniform(0, np.arange(100_000))
    assert abs(u.mean() - 0.5) < 0.005 and abs(np.mean(u < 0.1) - 0.1) < 0.005
    np.testing.assert_array_equal(u[:10], hash_uniform(0, np.arange(10)))
    assert not np.array_equal(u[:10], hash_uniform(1, np.arange(10)))


def test_data_iterator_is_a_plain_iterator(streams):
    ds = BatchDataset(streams, DataConfig(batch_size=2, num_batches=3, **PLAIN), 0, 1)
    it = DataIterator(ds)
    assert [int(b["batch_index"]) for b in it] == [0, 1, 2]


def test_from_config_for_the_trainer_rows():
    from ml_collections import ConfigDict

    from jaxvc.data.build import from_config

    config = ConfigDict({"batch_size": 6, "data": {
        "streams": {"image": "synthetic:pairs", "video": "synthetic:videos"}, "weights": {"image": 0.8, "video": 0.2},
        "switch": True, "image_size": 16, "num_frames": 4, "affine_scale": [0.95, 1.05], "seed": 1,
        "synthetic": {"image_size": 16, "num_frames": 4, "num_subjects": 12, "held_out": 2, "records": 50}}})
    full = from_config(config, rows=(0, 6))
    part = from_config(config, rows=(2, 5))
    for _ in range(3):
        a, b = next(full), next(part)
        assert len(set(a["kind"].tolist())) == 1
        for key in ("video", "reference", "caption"):
            np.testing.assert_array_equal(a[key][2:5], b[key])
    assert part.dataset.config.affine_scale == (0.95, 1.05) and part.dataset.weights.tolist() == [0.8, 0.2]
    full.close()
    part.close()


def test_customcrafter_rescale_zooms_the_subject_and_says_so_in_the_caption():
    """transforms.rescale_subject on a uniform image: zoomed out, the image is pasted on black and the loss mask is the
    pasted box inset by `inset` on each side, with a "far away"/"very small" prefix below 0.6 (none from 0.6 to 1);
    zoomed in (x1.2-1.4) it is a crop, the mask all ones, the prefix "zoomed in"/"close up". In the pipeline only the
    named streams' image targets are rescaled (and flipped with target_hflip), never the reference."""
    from jaxvc.data import transforms

    image = np.full((48, 48, 3), 200, np.uint8)
    seen = {"far": 0, "near": 0, "plain": 0}
    for seed in range(200):
        out, mask, prefix = transforms.rescale_subject(image, None, np.random.default_rng(seed), inset=4)
        lit = np.argwhere(out[..., 0] > 0)
        if prefix in transforms.ZOOM_IN_PREFIXES:
            assert np.all(out == 200) and mask.all()
            seen["near"] += 1
            continue
        (top, left), (bottom, right) = lit.min(0), lit.max(0) + 1
        side = bottom - top
        assert np.all(out[top:bottom, left:right] == 200) and (out[..., 0] > 0).sum() == side * (right - left)
        box = np.zeros_like(mask)
        box[top + 4:bottom - 4, left + 4:right - 4] = True
        np.testing.assert_array_equal(mask, box)
        assert 16 <= side <= 48
        if prefix:
            assert prefix in transforms.ZOOM_OUT_PREFIXES and side < 0.6 * 48 + 1
            seen["far"] += 1
        else:
            assert side >= 0.6 * 48 - 1
            seen["plain"] += 1
    assert min(seen.values()) > 20, seen  # all three cases occur; zoom out about 2/3 of the time
    assert 0.55 < (seen["far"] + seen["plain"]) / 200 < 0.77

    subject_mask = np.zeros((48, 48), bool)
    subject_mask[10:20, 10:30] = True
    out, mask, _ = transforms.rescale_subject(image, subject_mask, np.random.default_rng(1), zoom_out_prob=1.0)
    assert 0 < mask.sum() <= subject_mask.sum() and np.all(out[mask] == 200)  # the record's mask shrinks along

    source = {"instance": ListSource([pair_example(i) for i in range(8)]),
              "prior": ListSource([pair_example(i) for i in range(8)])}
    config = DataConfig(batch_size=8, **{**PLAIN, "image_size": 32}, rescale=("instance",), rescale_mask_inset=2,
                        weights={"instance": 0.5, "prior": 0.5})
    batch = BatchDataset(source, config, 0, 1)[0]
    instance, prior = batch["stream"] == "instance", batch["stream"] == "prior"
    assert instance.any() and prior.any()
    assert batch["has_mask"][instance].all() and not batch["has_mask"][prior].any()
    black = np.all(batch["video"] == -1.0, axis=-1)  # the surround of zoomed-out targets
    assert black[instance].any() and not black[prior].any()
    assert any(c.startswith(transforms.ZOOM_OUT_PREFIXES + transforms.ZOOM_IN_PREFIXES)
               for c in batch["caption"][instance])
    assert not np.any(np.all(batch["reference"] == -1.0, axis=-1))  # references are never rescaled
    with pytest.raises(ValueError, match=r"rescale names streams \['instances'\]"):
        BatchDataset(source, DataConfig(batch_size=2, rescale=("instances",)), 0, 1)


def test_uncaptioned_images_of_a_templated_stream_get_customcrafters_captions():
    """CustomCrafter's instance images usually come without captions: each gets one of its templates with the
    subject phrase ("<new1> dog"), after which the rescale prefix goes in front; a record's own caption is kept,
    and streams without a phrase keep "" (configs/customcrafter.py sets the phrases from model.options)."""
    from jaxvc.config_utils import get_config
    from jaxvc.data import transforms
    from jaxvc.data.build import data_config

    def uncaptioned(i):
        return {**pair_example(i), "kind": "image", "frames": pair_example(i)["frames"][:1], "captions": []}
    source = {"instance": ListSource([uncaptioned(i) for i in range(6)] + [pair_example(6)]),
              "prior": ListSource([uncaptioned(i) for i in range(4)])}
    config = DataConfig(batch_size=64, **{**PLAIN, "image_size": 32}, rescale=("instance",), rescale_mask_inset=2,
                        caption_phrases={"instance": "<new1> dog"})
    batch = BatchDataset(source, config, 0, 1)[0]
    instance = batch["stream"] == "instance"
    prefixes = transforms.ZOOM_OUT_PREFIXES + transforms.ZOOM_IN_PREFIXES + ("",)
    templated = {template.format("<new1> dog") for template in transforms.CAPTION_TEMPLATES}
    own = {"pair 6 view 0", "pair 6 view 1"}
    made = set()
    for caption in batch["caption"][instance]:
        body = [caption[len(p):] for p in prefixes if caption.startswith(p) and caption[len(p):] in templated | own]
        assert body, caption
        made.add(body[0])
    assert templated <= made  # all four templates occur (64 draws)
    assert set(batch["caption"][~instance]) == {""}  # no phrase for the prior stream here
    with pytest.raises(ValueError, match=r"caption_phrases names streams \['instances'\]"):
        BatchDataset(source, DataConfig(batch_size=2, caption_phrases={"instances": "x"}), 0, 1)
    # the config's phrases follow the placeholder and the class word
    config = get_config("configs/customcrafter.py:sd15", [("model.options.initializer_token", "dog"),
                                                          ("data.streams.instance", "folder:/x"),
                                                          ("data.streams.prior", "folder:/y")])
    assert data_config(config).caption_phrases == {"instance": "<new1> dog", "prior": "dog"}


def test_an_optional_stream_set_to_none_is_off_with_its_weight():
    """config.data.streams.<name> = "none" (Still-Moving's optional prior-preservation stream) drops the stream, its
    weight and its rescale entry; naming a folder turns it on."""
    from jaxvc.config_utils import get_config
    from jaxvc.data.build import data_config, stream_specs

    config = get_config("configs/still_moving.py:sd15_spatial", [("data.streams.image", "synthetic:pairs")])
    assert stream_specs(config.data) == {"image": "synthetic:pairs"}
    config.data.weights = {"image": 1.0, "prior": 1.0}
    assert data_config(config).weights == {"image": 1.0}
    config = get_config("configs/still_moving.py:sd15_spatial", [("data.streams.image", "synthetic:pairs"),
                                                                 ("data.streams.prior", "synthetic:pairs")])
    assert set(stream_specs(config.data)) == {"image", "prior"}


def _frame_ids(video: np.ndarray) -> np.ndarray:
    """(B, T) source frame index of every clip frame (video_example's red channel is 10 x the frame index)."""
    return np.round((video[..., 0].mean((2, 3)) + 1) * 127.5 / 10).astype(int)


def test_target_fps_sets_each_videos_stride_from_its_fps():
    """data.target_fps: a video record's clip stride is round(its fps / target_fps), so 24 and 12 fps videos both
    give clips at 8 fps (strides 3 and 2); a record without an fps (0) keeps frame_stride. Deterministic: the same
    batch twice, and from a fresh dataset (a restored run)."""
    import dataclasses
    import hashlib

    from jaxvc.data.transforms import clip_stride

    examples = [dict(video_example(i), fps=fps) for i, fps in enumerate((24.0, 12.0, 0.0))]
    cfg = DataConfig(batch_size=3, frame_stride=5, target_fps=8.0, shuffle=False, **PLAIN)
    ds = BatchDataset({"video": ListSource(examples)}, cfg, 0, 1)
    batch = ds[0]
    ids = _frame_ids(batch["video"])
    strides = {int(green): set(np.diff(clip).tolist()) for green, clip in
               zip(np.round((batch["video"][:, 0, 0, 0, 1] + 1) * 127.5).astype(int), ids)}  # green = record
    assert strides == {0: {3}, 1: {2}, 2: {5}}, strides
    np.testing.assert_array_equal(_frame_ids(BatchDataset({"video": ListSource(examples)}, cfg, 0, 1)[0]["video"]),
                                  ids)
    assert [clip_stride(30.0, 2, 8.0), clip_stride(5.0, 2, 8.0), clip_stride(24.0, 2, None),
            clip_stride(24.0, 2, 0.0)] == [4, 1, 2, 2]
    with pytest.raises(ValueError, match="target_fps=-8"):
        BatchDataset({"video": ListSource(examples)}, dataclasses.replace(cfg, target_fps=-8.0), 0, 1)
    # target_fps unset (None, or 0: off) leaves the fingerprint of a run saved before the field existed
    off = dataclasses.replace(cfg, target_fps=None)
    before = {k: v for k, v in dataclasses.asdict(off).items() if k not in ("target_fps", "batch_sizes")}
    desc = {"config": before, "streams": [["video", 3]]}
    old = hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()[:16]
    assert BatchDataset({"video": ListSource(examples)}, off, 0, 1).fingerprint() == old
    zero = BatchDataset({"video": ListSource(examples)}, dataclasses.replace(cfg, target_fps=0.0), 0, 1)
    assert zero.fingerprint() == old and ds.fingerprint() != old


def test_target_fps_reaches_the_data_config_of_both_builders():
    """config.data.target_fps reaches DataConfig from build.py (the DiT methods' streams) and from
    training_streams.py (the UNet methods'); absent, it is None; the S2V config trains 8 fps clips."""
    from jaxvc.config_utils import get_config, load_config
    from jaxvc.data import training_streams
    from jaxvc.data.build import data_config

    s2v = get_config("configs/disentangled_s2v.py:wan21_1.3b", [("data.streams.image", "synthetic:pairs"),
                                                                ("data.streams.video", "synthetic:videos")])
    assert (data_config(s2v).target_fps, data_config(s2v).frame_stride) == (8.0, 1)
    config = load_config("configs/videomaker.py:demo")
    assert training_streams.from_config(config, (0, 2)).dataset.config.target_fps is None
    config.data.target_fps = 8.0
    assert training_streams.from_config(config, (0, 2)).dataset.config.target_fps == 8.0
