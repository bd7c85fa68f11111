"""The synthetic subject world: determinism, held-out split, captions, truth consistent with the pixels."""
import numpy as np
import pytest

from jaxvc.data import records
from jaxvc.data.synthetic import (BACKGROUNDS, COLORS, MOTIONS, PATTERNS, SHAPES, SyntheticPairSource,
                                  SyntheticVideoSource, SyntheticWorld, pattern_shade, shade_of, shape_area)


@pytest.fixture(scope="module")
def world():
    return SyntheticWorld(image_size=32, num_frames=8, num_subjects=64, held_out=8, seed=0)


def test_deterministic_from_subject_and_seed(world):
    a = world.video(5, "left", seed=3)
    b = SyntheticWorld(image_size=32, num_frames=8, num_subjects=64, held_out=8, seed=0).video(5, "left", seed=3)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert a[2] == b[2]
    assert not np.array_equal(a[0], world.video(5, "left", seed=4)[0])
    np.testing.assert_array_equal(world.reference_image(7, 1), world.reference_image(7, 1))
    np.testing.assert_array_equal(world.image_pair(9, 2)[0], world.image_pair(9, 2)[0])


def test_subjects_split_and_palette(world):
    train, held = set(world.train_subject_ids), set(world.held_out_subject_ids)
    assert len(held) == 8 and not train & held and train | held == set(range(64))
    names = {world.subject(i).name for i in range(64)}
    assert len(names) == 64  # distinct subjects
    for attr in ("shape", "color", "pattern"):  # held-out subjects recombine attributes seen in training
        seen = {getattr(world.subject(i), attr) for i in train}
        assert all(getattr(world.subject(i), attr) in seen for i in held)
    explicit = SyntheticWorld(num_subjects=20, held_out=[3, 4])
    assert explicit.held_out_subject_ids == (3, 4) and len(explicit.train_subject_ids) == 18
    # Segmentation by colour distance is exact because backgrounds are far from every subject colour and shade.
    subject_colours = [np.array(c, float) for c in COLORS.values()] + [np.array(shade_of(c), float)
                                                                       for c in COLORS.values()]
    dist = min(np.linalg.norm(c - np.array(b, float)) for c in subject_colours
               for b in list(BACKGROUNDS.values()) + [(255, 255, 255)])
    assert dist > 100
    with pytest.raises(ValueError, match="num_subjects"):
        SyntheticWorld(num_subjects=len(SHAPES) * len(COLORS) * len(PATTERNS) + 1)


@pytest.mark.parametrize("motion", MOTIONS)
def test_video_truth_matches_pixels_and_caption(world, motion):
    sid = world.train_subject_ids[MOTIONS.index(motion)]
    subject = world.subject(sid)
    frames, masks, caption, truth = world.video(sid, motion, seed=11)
    assert frames.shape == (8, 32, 32, 3) and frames.dtype == np.uint8 and masks.shape == (8, 32, 32)
    assert caption.startswith(("a ", "an ")) and subject.name in caption
    assert f"on a {truth['background']} background" in caption
    bg = np.array(BACKGROUNDS[truth["background"]])
    # Outside the mask the frame is background except anti-aliased rims; inside it is never background.
    assert np.all(np.abs(frames[masks].astype(int) - bg).sum(-1) > 0)
    rim = ~masks & np.any(np.abs(frames.astype(int) - bg) > 0, -1)
    assert rim.sum() < 0.5 * masks.sum()
    # The mask's area and centroid follow the truth's scale and centre.
    ys, xs = np.mgrid[0:32, 0:32]
    for t in range(8):
        area = masks[t].sum()
        expected = shape_area(subject.shape) * truth["scales"][t] ** 2
        assert abs(area - expected) < 0.12 * expected + 3
        cx, cy = (xs + 0.5)[masks[t]].mean(), (ys + 0.5)[masks[t]].mean()
        assert np.hypot(cx - truth["centers"][t][0], cy - truth["centers"][t][1]) < 0.6
        assert not masks[t][[0, -1]].any() and not masks[t][:, [0, -1]].any()  # fully inside the frame
    c, s, a = truth["centers"], truth["scales"], truth["angles"]
    dist = 0.4 * 32
    expect = {"left": c[-1, 0] - c[0, 0] + dist, "right": c[-1, 0] - c[0, 0] - dist,
              "up": c[-1, 1] - c[0, 1] + dist, "down": c[-1, 1] - c[0, 1] - dist,
              "bounce": c[-1, 1] - c[0, 1], "rotate_cw": a[-1] - a[0] - 120, "rotate_ccw": a[-1] - a[0] + 120,
              "grow": s[-1] / s[0] - 13 / 7, "shrink": s[0] / s[-1] - 13 / 7}
    assert abs(expect[motion]) < 1e-9
    if motion == "bounce":
        assert c[:, 1].min() < c[0, 1] - 0.25 * 32  # it leaves the floor


@pytest.mark.parametrize("motion", MOTIONS)
def test_centered_placement_centres_the_path_and_keeps_the_motion(world, motion):
    """placement="centered": the same motion (displacement, rotation, scaling, within 1e-9 of the random placement's
    clip), with the path's middle at the image centre +- CENTER_JITTER, and the sprite fully inside every frame."""
    from jaxvc.data.synthetic import CENTER_JITTER

    centred = SyntheticWorld(image_size=32, num_frames=8, num_subjects=64, held_out=8, seed=0, placement="centered")
    sid = world.train_subject_ids[0]
    for seed in range(6):
        _, _, _, free = world.video(sid, motion, seed=seed)
        frames, masks, caption, truth = centred.video(sid, motion, seed=seed)
        assert caption == world.video(sid, motion, seed=seed)[2]
        np.testing.assert_allclose(np.diff(truth["centers"], axis=0), np.diff(free["centers"], axis=0), atol=1e-9)
        np.testing.assert_array_equal(truth["scales"], free["scales"])
        np.testing.assert_array_equal(truth["angles"], free["angles"])
        middle = (truth["centers"].min(axis=0) + truth["centers"].max(axis=0)) / 2
        assert np.all(np.abs(middle - 16) <= CENTER_JITTER * 32 + 1e-9)
        assert masks.any(axis=(1, 2)).all()
        assert not masks[:, [0, -1]].any() and not masks[:, :, [0, -1]].any()
    with pytest.raises(ValueError, match="placement='middle'"):
        SyntheticWorld(placement="middle")


def test_angle_range_narrows_every_orientation(world):
    """angle_range=(0, 0): every image pair view, reference and clip start upright (rotation motions still turn
    from there); (a, b) draws within [a, b]; a range wider than a turn or reversed is refused."""
    upright = SyntheticWorld(image_size=32, num_frames=4, num_subjects=64, held_out=8, seed=0, angle_range=(0, 0))
    sid = upright.train_subject_ids[0]
    for seed in range(4):
        assert all(pose["angle"] == 0.0 for pose in upright.image_pair(sid, seed=seed)[3]["poses"])
        np.testing.assert_array_equal(upright.video(sid, "left", seed=seed)[3]["angles"], 0.0)
        turning = upright.video(sid, "rotate_cw", seed=seed)[3]["angles"]
        assert turning[0] == 0.0 and turning[-1] > 0.0
    narrow = SyntheticWorld(image_size=32, num_frames=4, num_subjects=64, held_out=8, seed=0, angle_range=(-15, 15))
    starts = [narrow.video(sid, "up", seed=seed)[3]["angles"][0] for seed in range(20)]
    assert all(-15 <= a <= 15 for a in starts) and len(set(starts)) == 20
    assert any(abs(world.video(sid, "up", seed=seed)[3]["angles"][0]) > 15 for seed in range(20))  # default: any
    for bad in [(10, 0), (0, 400)]:
        with pytest.raises(ValueError, match="angle_range"):
            SyntheticWorld(angle_range=bad)


def test_pattern_scale_draws_coarser_patterns():
    """pattern_scale=2: stripes, checks and dots twice as wide, in the sprite's own frame; two-tone and the outline
    are unchanged; out-of-range factors are refused."""
    u, v = np.meshgrid(np.linspace(-1, 1, 201), np.linspace(-1, 1, 201))
    for pattern in ("striped", "checkered", "dotted", "two-tone"):
        np.testing.assert_array_equal(pattern_shade(pattern, u, v, 2.0), pattern_shade(pattern, u / 2, v / 2))
    np.testing.assert_array_equal(pattern_shade("two-tone", u, v, 2.0), pattern_shade("two-tone", u, v))
    # A striped band 0.3 radii wide becomes 0.6 wide: at v = 0.45 the default is light, the coarse one dark.
    assert not pattern_shade("striped", np.zeros(1), np.full(1, 0.15))[0]
    assert pattern_shade("striped", np.zeros(1), np.full(1, 0.45))[0]
    assert not pattern_shade("striped", np.zeros(1), np.full(1, 0.45), 2.0)[0]
    fine = SyntheticWorld(image_size=32, num_frames=4, num_subjects=64, held_out=8, seed=0)
    coarse = SyntheticWorld(image_size=32, num_frames=4, num_subjects=64, held_out=8, seed=0, pattern_scale=2.0)
    striped = next(i for i in range(fine.num_subjects) if fine.subject(i).pattern == "striped")
    (f1, m1, _, t1), (f2, m2, _, t2) = fine.video(striped, "left", seed=3), coarse.video(striped, "left", seed=3)
    np.testing.assert_array_equal(m1, m2)  # same pose and outline
    np.testing.assert_array_equal(t1["centers"], t2["centers"])
    assert not np.array_equal(f1, f2)
    for bad in (0.0, 10.0):
        with pytest.raises(ValueError, match="pattern_scale"):
            SyntheticWorld(pattern_scale=bad)


def test_captions(world):
    s = world.subject(0)
    article = "an" if s.color == "orange" else "a"
    assert world.caption(0, "left", "gray") == f"{article} {s.name} moves left on a gray background"
    assert world.caption(s, "rotate_ccw", name="the subject") == "the subject rotates counterclockwise"
    assert world.caption(s, "left", name="") == world.caption(s, "left")  # "" keeps the description
    assert world.caption(0) == world.caption(s, None, None)
    with pytest.raises(ValueError, match="unknown motion"):
        world.caption(0, "teleports")


def test_image_pairs_and_references(world):
    images, masks, captions, truth = world.image_pair(12, seed=5)
    assert images.shape == (2, 32, 32, 3) and masks.shape == (2, 32, 32)
    assert truth["backgrounds"][0] != truth["backgrounds"][1]
    assert all(world.subject(12).name in c for c in captions) and captions[0] != captions[1]
    assert truth["poses"][0] != truth["poses"][1]
    ref, ref_mask, _ = world.reference(12, seed=0)
    assert np.all(ref[~ref_mask].min(-1) >= 128)  # white background (anti-aliased rims lighter than mid-grey)
    assert np.all(ref[0] == 255) and np.all(ref[:, -1] == 255)
    np.testing.assert_array_equal(world.reference_image(12, 0), ref)


def test_sources_yield_valid_examples(world):
    videos = SyntheticVideoSource(world, num_records=40)
    pairs = SyntheticPairSource(world, world.held_out_subject_ids, num_records=10)
    ex = records.validate_example(videos[3])
    assert ex["kind"] == "video" and ex["frames"].shape == (8, 32, 32, 3) and ex["mask"].shape == (8, 32, 32)
    assert {videos[i]["source"].split(":")[3] for i in range(0, 40, len(world.train_subject_ids))} <= set(MOTIONS)
    ex = records.validate_example(pairs[2])
    assert ex["kind"] == "image_pair" and int(ex["source"].split(":")[2]) in world.held_out_subject_ids
    named = SyntheticVideoSource(world, num_records=40, caption_name="a subject")[3]
    np.testing.assert_array_equal(named["frames"], videos[3]["frames"])
    shown = world.subject(int(named["source"].split(":")[2]))
    assert named["captions"][0].startswith("a subject ") and shown.name not in named["captions"][0]
    assert shown.name in videos[3]["captions"][0]
    assert SyntheticPairSource(world, num_records=4, caption_name="it")[1]["captions"][0].startswith("it on a ")
