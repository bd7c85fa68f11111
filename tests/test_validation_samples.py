"""Validation during training: every ``sample_every`` steps VideoMaker generates its ``config.validation`` prompts
with their references (fixed seeds), the trainer writes them and, with CLIP/DINO folders named, logs CLIP-T,
CLIP-I, DINO-I and T.Cons of exactly those videos to TensorBoard."""
import os

import jax
import numpy as np
import pytest
from PIL import Image

from jaxvc.config_utils import ConfigError, get_config
from jaxvc.methods import build_method
from jaxvc.train.loop import Trainer

pytest.importorskip("transformers")
from tests.test_eval_metrics import build_metric_folders  # noqa: E402
from tests.test_train_step import read_scalars  # noqa: E402

PROMPTS = ("a subject moves left", "a subject moves up")
BASE = ["steps=2", "batch_size=2", "model.num_frames=2", "checkpoint.every=2", "checkpoint.use_async=False",
        "optim.ema_decay=0.5", "log_every=1", "progress_bar=False", "data.num_subjects=6", "data.held_out=2",
        "validation.steps=2", "validation.guidance_scale=2.0", "validation.seed=7"]


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    folder = tmp_path_factory.mktemp("refs")
    paths = []
    for i in range(len(PROMPTS)):
        paths.append(folder / f"ref{i}.png")
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(paths[-1])
    return tuple(str(p) for p in paths)


def validation_config(references, *extra):
    overrides = BASE + [f"validation.prompts={PROMPTS!r}", f"validation.references={references!r}", *extra]
    return get_config("configs/videomaker.py:tiny", overrides)


def test_sample_is_the_pipeline_generation_of_each_pair(references):
    method = build_method(validation_config(references, "validation.sampler=unipc"))
    params = method.init_params(jax.random.key(0))
    videos = np.asarray(jax.jit(method.sample)(params, jax.random.key(1))["validation"])
    assert videos.shape == (2, 2, 32, 32, 3)
    pipe = method.pipeline(params, method.tokenizer)
    for i, (prompt, path) in enumerate(zip(PROMPTS, references)):
        want = pipe(path, prompt, num_frames=2, height=32, width=32, num_inference_steps=2, guidance_scale=2.0,
                    seed=7 + i, progress=False, sampler="unipc")  # uint8, as the pipeline writes videos
        got = np.round((videos[i] + 1.0) * 127.5)
        assert np.abs(got - want.astype(np.float64)).max() <= 1, i  # float rounding at the uint8 step only


def test_training_logs_the_scores_of_its_validation_videos_and_keeps_the_best(references, tmp_path):
    from jaxvc.eval.feature_metrics import VideoScorer
    from jaxvc.media import to_uint8
    from jaxvc.train.cli import build_data
    from jaxvc.train.trained_run import load_trained_run

    clip_folder, dino_folder = build_metric_folders(tmp_path / "clip", tmp_path / "dino")
    config = validation_config(references, "steps=6", "sample_every=2", "checkpoint.keep=1", "checkpoint.keep_best=1",
                               "checkpoint.best_metric=validation/clip_i", "checkpoint.best_mode=max",
                               f"validation.clip_model={clip_folder}", f"validation.dino_model={dino_folder}")
    method = build_method(config)
    trainer = Trainer(config, method, tmp_path / "run")
    trainer.fit(lambda rows: build_data(config, rows))
    assert sorted(os.listdir(tmp_path / "run" / "samples" / "step_00000002")) == ["validation_0.gif",
                                                                                  "validation_1.gif"]
    scalars = read_scalars(tmp_path / "run" / "tensorboard")
    logged = {name: scalars[f"validation/{name}"] for name in ("clip_t", "clip_i", "dino_i", "temporal_consistency")}
    for name, points in logged.items():
        assert [step for step, _ in points] == [2, 4, 6], name
    # kept: the latest checkpoint and the one with the highest CLIP-I
    best = max(logged["clip_i"], key=lambda point: point[1])[0]
    assert sorted(trainer.checkpointer.all_steps()) == sorted({6, best})
    # the videos of step 6 (its EMA weights from the checkpoint, the same seeds), scored apart from the trainer; the
    # sampling program compiled with the trainer's XLA options, so the videos are the trainer's to the bit (other
    # options move a pixel across a uint8 step, and the scores in the fifth digit)
    run = load_trained_run(tmp_path / "run", step=6)
    sample = jax.jit(run.method.sample).lower(run.params, jax.random.key(0)).compile(trainer.compiler_options)
    videos = np.asarray(sample(run.params, jax.random.key(0))["validation"])
    scorer = VideoScorer.from_folders(clip_folder, dino_folder)
    per_video = [scorer.score(to_uint8(video), prompt, [to_uint8(reference)])
                 for video, (prompt, reference) in zip(videos, run.method.validation)]
    for name, points in logged.items():
        assert points[-1][1] == pytest.approx(np.mean([scores[name] for scores in per_video]), abs=1e-6), name


def test_validation_settings_are_checked_when_the_method_is_built(references, tmp_path):
    with pytest.raises(ConfigError, match="sample_every > 0 needs config.validation.prompts"):
        build_method(get_config("configs/videomaker.py:tiny", ["sample_every=10"]))
    with pytest.raises(ConfigError, match=r"validation.sampler = 'euler': method 'videomaker' samples with one of"):
        build_method(validation_config(references, "validation.sampler=euler"))
    with pytest.raises(ConfigError, match=r"validation.eta = 1.0: DDIM's eta; method 'videomaker' samples with "
                                          r"dpm\+\+, which takes none"):
        build_method(validation_config(references, "validation.sampler=dpm++", "validation.eta=1.0"))
    method = build_method(validation_config(references))  # the Python API refuses it too, rather than dropping it
    with pytest.raises(ValueError, match=r"eta=0.5 is DDIM's; this samples with dpm\+\+, which takes none"):
        method.set_validation(["a cat"], [np.zeros((32, 32, 3), np.float32)], sampler="dpm++", eta=0.5)
    with pytest.raises(ConfigError, match="2 prompts but 1 references"):
        build_method(validation_config(references[:1]))
    with pytest.raises(ConfigError, match=r"validation.clip_model = '.*nowhere': no config.json there"):
        build_method(validation_config(references, f"validation.clip_model={tmp_path / 'nowhere'}"))
    config = validation_config(references, "sample_every=4", "checkpoint.every=6", "checkpoint.keep_best=1",
                               "checkpoint.best_metric=validation/clip_t")
    with pytest.raises(ValueError, match=r"checkpoint.every \(6\) must be a multiple of it"):
        Trainer(config, build_method(config), tmp_path / "run").fit(lambda rows: iter(()))
