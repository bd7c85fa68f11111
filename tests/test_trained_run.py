"""From a training run to videos: ``jaxvc generate --model WORKDIR`` loads the run's checkpoint (EMA or raw weights,
latest or a given step) and generates exactly what the trained parameters generate."""
import json

import jax
import numpy as np
import pytest
from PIL import Image

from jaxvc.cli import main as jaxvc_main
from jaxvc.config_utils import get_config
from jaxvc.methods import build_method
from jaxvc.pipeline import CustomVideoPipeline
from jaxvc.train.loop import Trainer
from jaxvc.train.trained_run import RunFolderError, load_trained_run

SETTINGS = dict(num_frames=2, height=32, width=32, num_inference_steps=2, seed=3, progress=False)
OVERRIDES = ["steps=4", "batch_size=2", "model.num_frames=2", "checkpoint.every=2", "checkpoint.keep=3",
             "checkpoint.use_async=False", "optim.ema_decay=0.5", "log_every=2", "progress_bar=False",
             "data.num_subjects=6", "data.held_out=2", "validation.steps=2", "validation.guidance_scale=3.5",
             "validation.eta=0.5", "validation.negative_prompt=blurry"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny latent VideoMaker trained for 4 steps with EMA, checkpoints at steps 2 and 4."""
    from jaxvc.train.cli import build_data

    workdir = tmp_path_factory.mktemp("run")
    config = get_config("configs/videomaker.py:tiny", OVERRIDES)
    method = build_method(config)
    result = Trainer(config, method, workdir).fit(lambda rows: build_data(config, rows))
    assert result.final_step == 4
    return workdir, config, method, result.state


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    path = tmp_path_factory.mktemp("ref") / "subject.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(path)
    return path


def test_the_run_generates_what_its_trained_parameters_generate(run, reference):
    workdir, _, method, state = run
    loaded = CustomVideoPipeline.from_pretrained(workdir)
    assert (loaded.trained_step, loaded.trained_with_ema) == (4, True)
    want = method.pipeline(state.full_params(use_ema=True), method.tokenizer)(str(reference), "a cat", **SETTINGS)
    got = loaded(str(reference), "a cat", **SETTINGS)
    np.testing.assert_array_equal(got, want)
    raw = method.pipeline(state.full_params(use_ema=False), method.tokenizer)(str(reference), "a cat", **SETTINGS)
    assert not np.array_equal(raw, want)  # EMA 0.5 over 4 steps differs from the raw weights
    np.testing.assert_array_equal(CustomVideoPipeline.from_pretrained(workdir, use_ema=False)(
        str(reference), "a cat", **SETTINGS), raw)


def test_bf16_generation_from_a_run_keeps_the_unet_matrices_in_bf16_and_the_same_videos(run, reference):
    """``jaxvc generate --model RUN --dtype bfloat16``: the run's UNet computes in bf16 and keeps its matrices in
    it (jaxvc/models/weight_storage.py); the videos equal those of its float32 weights in the same bf16 model."""
    import jax.numpy as jnp

    workdir = run[0]
    stored = CustomVideoPipeline.from_pretrained(workdir, dtype="bfloat16")
    kernels = {leaf.dtype for path, leaf in jax.tree_util.tree_leaves_with_path(stored.params["unet"]["params"])
               if path[-1].key == "kernel"}
    assert kernels == {jnp.dtype(jnp.bfloat16)}
    bf16_run = load_trained_run(workdir, overrides={"compute_dtype": "bfloat16"})
    float32_weights = bf16_run.method.pipeline(bf16_run.params, bf16_run.method.tokenizer)
    assert {leaf.dtype for leaf in jax.tree.leaves(float32_weights.params["unet"])} == {jnp.dtype(jnp.float32)}
    np.testing.assert_array_equal(stored(str(reference), "a cat", **SETTINGS),
                                  float32_weights(str(reference), "a cat", **SETTINGS))


def test_an_earlier_step_loads_other_weights(run):
    workdir = run[0]
    latest, earlier = load_trained_run(workdir), load_trained_run(workdir, step=2)
    assert (latest.step, earlier.step) == (4, 2)
    differs = jax.tree.map(lambda a, b: not np.array_equal(a, b), latest.params, earlier.params)
    assert any(jax.tree.leaves(differs))
    with pytest.raises(RunFolderError, match=r"no checkpoint at step 3 \(there are \[2, 4\]\)"):
        load_trained_run(workdir, step=3)


def test_generate_command_on_a_run_folder_writes_the_step_in_its_record(run, reference, tmp_path):
    """... and samples as the run validates (config.validation: steps, guidance, DDIM eta) at the video size it
    trained on, unless told otherwise."""
    out = tmp_path / "out"
    command = ["generate", "--model", str(run[0]), "--step", "2", "--reference", str(reference), "--prompt", "a cat",
               "--out", str(out)]
    assert jaxvc_main(command + ["--name", "cat"]) == 0
    record = json.loads((out / "cat.json").read_text())
    assert (record["trained_step"], record["ema"]) == (2, True)
    assert (out / "cat.mp4").stat().st_size > 0
    method = run[2]
    assert (record["frames"], record["height"], record["width"]) == (2, method.height, method.width)
    assert (record["steps"], record["guidance_scale"], record["eta"], record["sampler"]) == (2, 3.5, 0.5, "ddim")
    assert record["negative_prompt"] == "blurry"  # the run's validation.negative_prompt
    # the Python API samples with the same defaults (generate_videos), DDIM's eta and the negative prompt included
    pipe = CustomVideoPipeline.from_pretrained(run[0], step=2)
    size = dict(num_frames=2, height=method.height, width=method.width)
    default = pipe.generate_videos([str(reference)], ["a cat"])
    np.testing.assert_array_equal(default, pipe.generate_videos([str(reference)], ["a cat"], num_inference_steps=2,
                                                                guidance_scale=3.5, eta=0.5, negative_prompts="blurry",
                                                                **size))
    assert not np.array_equal(default, pipe.generate_videos([str(reference)], ["a cat"], eta=0.0))
    assert not np.array_equal(default, pipe.generate_videos([str(reference)], ["a cat"], negative_prompts=""))
    # told otherwise: the flags win; DDIM's eta is not carried to a sampler without one
    assert jaxvc_main(command + ["--name", "dog", "--steps", "3", "--guidance-scale", "2", "--sampler", "dpm++"]) == 0
    record = json.loads((out / "dog.json").read_text())
    assert (record["steps"], record["guidance_scale"], record["eta"], record["sampler"]) == (3, 2.0, 0.0, "dpm++")
    assert jaxvc_main(command + ["--name", "owl", "--negative-prompt", ""]) == 0
    assert json.loads((out / "owl.json").read_text())["negative_prompt"] == ""


def test_folders_that_are_not_runs_say_so(tmp_path):
    from jaxvc.config_utils import write_config

    with pytest.raises(RunFolderError, match="not a training run folder"):
        load_trained_run(tmp_path)
    write_config(get_config("configs/videomaker.py:tiny", OVERRIDES), tmp_path)
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(RunFolderError, match="checkpoints: the run has no checkpoint yet"):
        CustomVideoPipeline.from_pretrained(tmp_path)


def test_each_checkpoint_loads_with_the_config_it_was_saved_with(tmp_path):
    """A run trained 2 steps, then resumed for 2 more with other validation settings: a resume rewrites config.json,
    but checkpoint 2 is still the model of the first settings (generate's defaults), checkpoint 4 of the second; a
    checkpoint saved without its config falls back to config.json."""
    import shutil

    from ml_collections import ConfigDict

    from jaxvc.methods.toy_denoiser import ToyDenoiser
    from jaxvc.train import toy_data

    def train_toy(steps, validation):
        config = get_config("configs/toy.py:tiny", [
            f"steps={steps}", "checkpoint.every=2", "checkpoint.use_async=False", "model.num_blocks=1",
            "compiler_options={'xla_backend_optimization_level': 0}", "progress_bar=false"])
        config.validation = ConfigDict(validation)  # the toy config has no validation section: the run's own
        result = Trainer(config, ToyDenoiser(config), tmp_path).fit(lambda rows: toy_data.from_config(config, rows))
        assert result.final_step == steps
        return result.state

    first = train_toy(2, {"steps": 2, "guidance_scale": 3.5, "negative_prompt": "blurry"})
    train_toy(4, {"steps": 6, "guidance_scale": 7.0, "negative_prompt": ""})
    assert json.loads((tmp_path / "config.json").read_text())["validation"]["steps"] == 6
    early, late = load_trained_run(tmp_path, step=2), load_trained_run(tmp_path)
    assert (early.step, early.config.steps, late.step, late.config.steps) == (2, 2, 4, 4)
    assert (early.sampling["num_inference_steps"], early.sampling["guidance_scale"],
            early.sampling["negative_prompt"]) == (2, 3.5, "blurry")
    assert (late.sampling["num_inference_steps"], late.sampling["guidance_scale"],
            late.sampling["negative_prompt"]) == (6, 7.0, "")
    for a, b in zip(jax.tree.leaves(early.params), jax.tree.leaves(first.full_params()), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    shutil.rmtree(tmp_path / "checkpoints" / "2" / "config")  # as a checkpoint written without its config
    older = load_trained_run(tmp_path, step=2)
    assert (older.step, older.sampling["num_inference_steps"]) == (2, 6)
