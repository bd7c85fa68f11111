"""`jaxvc train`'s handling of the user's mistakes (jaxvc/train/cli.py): a bad variant, weights folder or data stream
is one line naming the config key and exit status 2, and the data is checked before the method loads its weights;
a bug keeps its traceback. (Config overrides' own errors: tests/test_train_config.py.)"""
import argparse

import pytest

from jaxvc.config_utils import get_config
from jaxvc.train import cli as train_cli


def _run(argv, workdir):
    parser = argparse.ArgumentParser(prog="jaxvc train")
    train_cli.add_arguments(parser)
    return train_cli.run(parser.parse_args(argv + ["--workdir", str(workdir), "--distributed", "off"]))


@pytest.fixture
def no_method(monkeypatch):
    """Fails the test if `jaxvc train` gets as far as building the method (loading weights, minutes at real size)."""
    import jaxvc.methods

    def refuse(config):
        pytest.fail("the method was built before the bad input was reported")

    monkeypatch.setattr(jaxvc.methods, "build_method", refuse)


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("jaxvc train: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def _bad_inputs(tmp_path):
    (tmp_path / "empty").mkdir()
    cc = ["--config", "configs/customcrafter.py:tiny"]
    return {
        "pretrained": (["--config", "configs/videomaker.py:sd15", "--config.model.pretrained=/nonexist"],
                       "config.model.pretrained = '/nonexist': no such file or folder"),
        "variant": (["--config", "configs/videomaker.py:sd51"],
                    "configs/videomaker.py: unknown variant 'sd51' ("),
        "empty spec": (cc + ["--config.data.streams.instance="],
                       "config.data.streams.instance = '': expected synthetic:pairs|videos, packed:DIR[:KIND,...], "
                       "tfds:NAME:SPLIT[:KIND], folder:PATH or none"),
        "missing folder": (cc + [f"--config.data.streams.instance=folder:{tmp_path / 'missing'}"],
                           f"config.data.streams.instance = 'folder:{tmp_path / 'missing'}': no such folder"),
        "empty folder": (cc + [f"--config.data.streams.instance=folder:{tmp_path / 'empty'}"],
                         f"config.data.streams.instance = 'folder:{tmp_path / 'empty'}': no images or videos in it"),
        "unpacked folder": (["--config", "configs/disentangled_s2v.py:tiny",
                             f"--config.data.streams.video=packed:{tmp_path / 'empty'}"],
                            f"config.data.streams.video = 'packed:{tmp_path / 'empty'}': {tmp_path / 'empty'}: "
                            "no dataset_info.json"),
        "missing shards": (["--config", "configs/videomaker.py:tiny", "--config.data.source=packed",
                            f"--config.data.paths=('{tmp_path / 'missing'}',)"],
                           f"config.data.paths = ('{tmp_path / 'missing'}',): no such folder, and no shard files"),
        "no paths": (["--config", "configs/videomaker.py:tiny", "--config.data.source=packed"],
                     "config.data.paths is empty: config.data.source='packed' needs it"),
        "unknown source": (["--config", "configs/videomaker.py:tiny", "--config.data.source=webvid"],
                           "config.data.source 'webvid' is not one of"),
        "mixture": (["--config", "configs/disentangled_s2v.py:tiny", "--config.data.switch=false"],
                    "config.data: image_frames=1 differs from num_frames=5: examples of different kinds could share"),
    }


@pytest.mark.parametrize("case", ["pretrained", "variant", "empty spec", "missing folder", "empty folder",
                                  "unpacked folder", "missing shards", "no paths", "unknown source", "mixture"])
def test_bad_input_is_one_line_naming_the_key_before_the_method(case, tmp_path, capsys, no_method):
    argv, message = _bad_inputs(tmp_path)[case]
    assert _run(argv, tmp_path / "run") == 2
    assert message in _one_line(capsys)


def test_weights_folder_without_its_parts_is_one_line(tmp_path, capsys):
    """A folder that exists but holds no pipeline: the model's loader refuses it (after the data was checked)."""
    argv = ["--config", "configs/videomaker.py:tiny", f"--config.model.pretrained={tmp_path}"]
    assert _run(argv, tmp_path / "run") == 2
    assert f"config.model.pretrained = '{tmp_path}': {tmp_path}: neither a jaxvc checkpoint" in _one_line(capsys)


def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    """Errors that are not the user's input (here a method that fails to build, and a config file that fails
    otherwise than on an unknown variant) are not turned into a one-line message."""
    import jaxvc.methods

    def broken(config):
        raise ValueError("a bug in the method")

    monkeypatch.setattr(jaxvc.methods, "build_method", broken)
    with pytest.raises(ValueError, match="a bug in the method"):
        _run(["--config", "configs/videomaker.py:tiny"], tmp_path / "run")
    bad = tmp_path / "bad.py"
    bad.write_text("def get_config(variant=None):\n    raise ValueError('a bug in the config file')\n")
    with pytest.raises(ValueError, match="a bug in the config file"):
        _run(["--config", f"{bad}:x"], tmp_path / "run")


def test_streams_opened_before_the_method_are_the_ones_trained_on(tmp_path):
    """open_streams (what `jaxvc train` checks early) returns the sources build_data then reads: a folder is scanned
    once. The toy source opens its own (None)."""
    config = get_config("configs/disentangled_s2v.py:tiny")
    streams = train_cli.open_streams(config)
    assert set(streams) == {"image", "video"}
    data = train_cli.build_data(config, (0, config.batch_size), streams=streams)
    assert data.dataset.sources == [streams["image"], streams["video"]]
    assert train_cli.open_streams(get_config("configs/toy.py:tiny")) is None


def test_batch_that_the_mesh_or_accumulation_cannot_split_is_one_line(tmp_path, capsys):
    """Checked when the trainer is made (after the method: it needs the mesh): one line naming the key, exit 2."""
    assert _run(["--config", "configs/toy.py", "--config.optim.accumulation_steps=3"], tmp_path / "run") == 2
    assert "config.batch_size 8 is not divisible by optim.accumulation_steps 3" in _one_line(capsys)
