"""Frames that are not square (``config.model.image_size`` x ``config.model.image_width``: height x width, as the
papers' 320 x 512 and 480 x 720 or Wan's 480 x 832): the data pipeline's batches, the methods' shapes, training
steps and the run's generation at its own size, on VideoMaker's tiny UNet and the S2V method's tiny DiT; a size the
model cannot take is refused with the keys to change."""
import numpy as np
import pytest

from jaxvc.config_utils import get_config
from jaxvc.methods import build_method
from jaxvc.train.cli import build_data
from jaxvc.train.loop import Trainer

COMMON = ["steps=2", "batch_size=2", "checkpoint.every=2", "checkpoint.use_async=False", "progress_bar=False",
          "log_every=1", "validation.steps=2"]


def _train(config, workdir):
    method = build_method(config)
    batch = next(iter(build_data(config, (0, config.batch_size))))
    result = Trainer(config, method, workdir).fit(lambda rows: build_data(config, rows))
    losses = [h["loss"] for h in result.history if "loss" in h]
    assert result.final_step == 2 and len(losses) == 2 and np.isfinite(losses).all()
    return method, batch


def test_videomaker_trains_and_generates_on_wide_frames(tmp_path):
    from jaxvc.pipeline import CustomVideoPipeline

    config = get_config("configs/videomaker.py:tiny", COMMON + ["model.num_frames=2", "model.image_width=48",
                                                                "data.num_subjects=6", "data.held_out=2"])
    method, batch = _train(config, tmp_path / "run")
    assert method.frame_size == (32, 48)
    assert batch["video"].shape == (2, 2, 32, 48, 3) and batch["reference"].shape == (2, 32, 48, 3)
    assert method.example_batch(2)["video"].shape == (2, 2, 32, 48, 3)
    pipe = CustomVideoPipeline.from_pretrained(tmp_path / "run")
    assert pipe.default_video == (2, 32, 48)  # jaxvc generate's size: the run's
    reference = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    assert pipe.generate_videos([reference], ["a subject moves left"]).shape == (1, 2, 32, 48, 3)

    with pytest.raises(ValueError, match=r"frames of 32x34 pixels; this model needs both sides divisible by 4 "
                                         r"\(model.image_size, model.image_width\)"):
        build_method(get_config("configs/videomaker.py:tiny", ["model.image_width=34"]))


def test_s2v_trains_on_wide_frames(tmp_path):
    config = get_config("configs/disentangled_s2v.py:tiny", COMMON + ["model.image_width=48"])
    method, batch = _train(config, tmp_path / "run")
    assert method.frame_size == (32, 48) and method.pipeline(None).default_video == (5, 32, 48)
    assert batch["video"].shape[2:] == (32, 48, 3) and batch["reference"].shape == (2, 32, 48, 3)
    with pytest.raises(ValueError, match="frames of 32x44 pixels; this model needs both sides divisible by 8"):
        build_method(get_config("configs/disentangled_s2v.py:tiny", ["model.image_width=44"]))
