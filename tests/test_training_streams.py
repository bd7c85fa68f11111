"""The training input built from a config (jaxvc/data/training_streams.py): the synthetic stream honours
``config.data.motions`` and keeps the identity out of the captions; bad sources fail clearly."""
import pytest

from jaxvc.config_utils import apply_overrides, load_config
from jaxvc.data import synthetic
from jaxvc.data.training_streams import streams_from_config

CONFIG = "configs/videomaker.py:demo"


def test_motion_subset_is_all_the_stream_shows():
    config = apply_overrides(load_config(CONFIG), [("data.motions", '("left", "up")')])
    source = streams_from_config(config)["video"]
    assert source.motions == ("left", "up")
    subjects = len(source.subject_ids)
    seen = set()
    for index in range(0, 4 * subjects, subjects):  # record i shows motion motions[(i // S) % M]
        record = source[index]
        motion = record["source"].split(":")[3]
        seen.add(motion)
        # the caption says how it moves, never what it looks like
        assert record["captions"][0].startswith(f"a subject {synthetic.MOTION_PHRASES[motion]} on a ")
    assert seen == {"left", "up"}


def test_default_is_every_motion_of_the_world():
    """data.motions=() means every motion of the world; the demo config trains the four translations it is scored
    on (left, right, up, down)."""
    assert streams_from_config(load_config(CONFIG))["video"].motions == ("left", "right", "up", "down")
    source = streams_from_config(apply_overrides(load_config(CONFIG), [("data.motions", "()")]))["video"]
    assert source.motions == synthetic.MOTIONS
    assert not (set(source.subject_ids) & set(source.world.held_out_subject_ids))  # held-out subjects never train


def test_empty_caption_name_describes_the_subject_and_pattern_scale_reaches_the_world():
    """data.caption_name="" captions every clip with the subject's description (text-conditioned training, the
    diagnostic of whether the model can draw a named subject at all); data.pattern_scale sets the world's."""
    config = apply_overrides(load_config(CONFIG), [("data.caption_name", ""), ("data.pattern_scale", "2.0")])
    source = streams_from_config(config)["video"]
    assert source.world.pattern_scale == 2.0
    record = source[0]
    subject = source.world.subject(int(record["source"].split(":")[2]))
    assert record["captions"][0].startswith(synthetic.caption(subject, record["source"].split(":")[3]))


def test_unknown_source_is_a_clear_error():
    config = apply_overrides(load_config(CONFIG), [("data.source", "webvid")])
    with pytest.raises(ValueError, match="config.data.source='webvid'"):
        streams_from_config(config)
