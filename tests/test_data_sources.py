"""Sources: TFDS ArrayRecord datasets read without TensorFlow, packed shards holding a corrupt record, concatenation."""
import json
import os

import numpy as np
import pytest

from jaxvc.data import records
from jaxvc.data.pack import write_shard
from jaxvc.data.pipeline import BatchDataset, DataConfig, make_pipeline
from jaxvc.data.sources import ConcatSource, ListSource, PackedSource, TfdsSource


def _clip(i, n=6, size=12):
    rng = np.random.default_rng(i)
    return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    """A tiny TFDS dataset prepared locally in the ArrayRecord file format (Tensor + Text features need no
    TensorFlow; Video/Image features would, to encode)."""
    tfds = pytest.importorskip("tensorflow_datasets")

    class TinyClips(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "video": tfds.features.Tensor(shape=(6, 12, 12, 3), dtype=np.uint8),
                "caption": tfds.features.Text(),
            }))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(5):
                yield i, {"video": _clip(i), "caption": f"clip number {i}"}

    # TFDS looks up the code path of builders defined in dotted modules (tests.test_data_sources) through
    # `importlib_resources`, which this environment lacks; a single-segment module name takes its plain fallback.
    TinyClips.__module__ = "tiny_clips_builder"
    data_dir = tmp_path_factory.mktemp("tfds")
    builder = TinyClips(data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare()
    return builder.data_dir


def test_tfds_array_record_source_without_tensorflow(tfds_dir):
    import sys

    source = TfdsSource(builder_dir=str(tfds_dir), split="train", kind="video", fps=8.0)
    assert "tensorflow" not in sys.modules  # read through tfds.data_source, no TensorFlow anywhere
    assert len(source) == 5
    assert any(f.endswith(".array_record-00000-of-00001") for f in os.listdir(tfds_dir))
    by_caption = {source[i]["captions"][0]: source[i] for i in range(5)}
    assert set(by_caption) == {f"clip number {i}" for i in range(5)}
    np.testing.assert_array_equal(by_caption["clip number 3"]["frames"], _clip(3))
    batch = BatchDataset({"video": source}, DataConfig(batch_size=2, image_size=8, num_frames=4), 0, 1)[0]
    assert batch["video"].shape == (2, 4, 8, 8, 3) and batch["caption"][0].startswith("clip number")


def test_packed_shard_with_a_corrupt_record_is_skipped_and_counted(tmp_path):
    good = [records.serialize_example({"kind": "video", "frames": _clip(i), "captions": [f"c{i}"], "fps": 8.0,
                                       "source": f"clip{i}"}, "png") for i in range(4)]
    truncated = good[0][: len(good[0]) // 2]
    shard = str(tmp_path / "video-00000-of-00001.array_record")
    write_shard(shard, [good[0], b"\x00garbage", good[1], truncated, good[2], good[3]])
    source = PackedSource([shard])
    assert len(source) == 6
    with pytest.raises(records.CorruptRecordError, match=r"\[1\]"):
        source[1]
    with pytest.raises(records.CorruptRecordError):
        source[3]
    cfg = DataConfig(batch_size=3, image_size=12, num_frames=4, shuffle=False)
    it = make_pipeline({"video": source}, cfg, process_index=0, process_count=1)
    batches = [next(it) for _ in range(4)]  # two passes over the 6 records
    captions = [c for b in batches for c in b["caption"].tolist()]
    assert set(captions) <= {"c0", "c1", "c2", "c3"}
    # Each pass meets the 2 bad records; a substitute drawn for one can be bad too and is skipped as well.
    assert it.skipped == sum(int(b["num_skipped"]) for b in batches) >= 4
    it.close()
    # A packed directory whose dataset_info.json is missing gets a clear error.
    with pytest.raises(FileNotFoundError, match="dataset_info.json"):
        PackedSource(str(tmp_path))


def test_concat_source_and_errors(tmp_path):
    a = ListSource([{"kind": "image", "frames": _clip(0, 1), "captions": ["a"], "source": "a"}])
    b = ListSource([{"kind": "image", "frames": _clip(i, 1), "captions": [f"b{i}"], "source": "b"} for i in range(2)])
    both = ConcatSource([a, b])
    assert len(both) == 3 and [both[i]["captions"][0] for i in range(3)] == ["a", "b0", "b1"]
    with pytest.raises(IndexError):
        both[3]
    with pytest.raises(records.CorruptRecordError, match="image_pair has 1 frames"):
        ListSource([{"kind": "image_pair", "frames": _clip(0, 1), "source": "x"}])
    with pytest.raises(records.CorruptRecordError, match="not a msgpack record|record format"):
        records.deserialize_record(json.dumps({"a": 1}).encode(), "somewhere")


def test_tfds_spec_takes_sliced_splits_and_names_a_missing_dataset(tfds_dir):
    """``tfds:NAME:SPLIT[:KIND]``: TFDS slicing has colons of its own (``train[:3]``), and TFDS' own errors (hundreds
    of dataset names) become one line naming the config key."""
    from pathlib import Path

    from jaxvc.data.build import DataSourceError, build_source

    root = {"tfds_dir": str(Path(tfds_dir).parents[1])}  # <root>/tiny_clips/1.0.0
    assert len(build_source("tfds:tiny_clips:train[:3]", root, key="data.streams.video")) == 3
    assert len(build_source("tfds:tiny_clips:train[1:]:video", root, key="data.streams.video")) == 4
    with pytest.raises(DataSourceError, match=r"^data.streams.video = 'tfds:no_such_set:train': \w*NotFound") as e:
        build_source("tfds:no_such_set:train", root, key="data.streams.video")
    assert "\n" not in str(e.value) and len(str(e.value)) < 400


def test_a_truncated_shard_is_named(tmp_path):
    """A shard cut short (a partial copy) fails in the ArrayRecord reader with a message naming no file: the stream's
    error names the shard (one line through `jaxvc train`, as the other DataSourceErrors)."""
    from jaxvc.data.build import DataSourceError, open_packed

    shards = []
    for index in range(2):
        shard = str(tmp_path / f"video-0000{index}-of-00002.array_record")
        write_shard(shard, [records.serialize_example({"kind": "video", "frames": _clip(i), "captions": ["c"],
                                                       "fps": 8.0, "source": f"clip{i}"}, "png") for i in range(3)])
        shards.append(shard)
    with open(shards[1], "rb") as f:
        data = f.read()
    with open(shards[1], "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(DataSourceError, match=r"^data.streams.video = 'packed:x': unreadable shard\(s\) \[.*"
                                              r"video-00001-of-00002.array_record'\] \(truncated") as e:
        open_packed(str(tmp_path / "*.array_record"), None, "data.streams.video = 'packed:x'")
    assert "\n" not in str(e.value) and "video-00000" not in str(e.value)
