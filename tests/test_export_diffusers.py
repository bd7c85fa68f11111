"""``jaxvc export-diffusers RUN OUT`` (``jaxvc/convert/export_diffusers.py``): a run's UNet as diffusers folders.

* Weights: a random diffusers ``UNetMotionModel`` saved with ``save_pretrained``, read by ``load_unet`` and written
  back by the exporter, is the same state dict bit for bit (keys, shapes, dtypes, values), for 1x1-conv and linear
  projections, one or two transformer layers, with and without the motion mid block. Positional tables: the
  formula jaxvc computes with (torch's own float32 table differs in the last bits), or a stored table exactly.
* Configs: ``translate_diffusers_config`` of the written ``UNetMotionModel`` / ``MotionAdapter`` configs gives the
  same ``UNetConfig`` back; diffusers builds the same keys and shapes from them.
* A tiny VideoMaker run, exported with the CLI, loads in diffusers with no missing or unexpected keys, and with
  jaxvc's PISA processor predicts what the run's ``denoise`` predicts (float32, relative error < 1e-5); the motion
  adapter folder + the run's spatial UNet make the same model through ``UNetMotionModel.from_unet2d``.
* A tiny VideoMaker run built on a diffusers AnimateDiff folder (``model.pretrained``) exports as a whole pipeline:
  ``AnimateDiffPipeline.from_pretrained(OUT)`` loads it with OUT/unet's weights, jaxvc's ``load_pipeline`` reads the
  run's UNet bit for bit and the base's VAE and text encoder (hard links, the base untouched); a converted jaxvc
  checkpoint as base writes the UNet folders only and says why; a ``--base`` without model_index.json is refused.
* Refusals: MicroCinema, the Wan method, output adapters, a trained text encoder, jaxvc-only UNet features
  (per-frame motion GroupNorm, the demo's embeddings), a missing run folder (exit 2, one line).
"""
import dataclasses
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import traverse_util  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from jaxvc.cli import main as jaxvc_main  # noqa: E402
from jaxvc.convert.export_diffusers import (_resolve_base, export, left_out_parts,  # noqa: E402
                                            motion_adapter_config, unet_motion_config, unet_state_dict)
from jaxvc.convert.unet import load_unet, translate_diffusers_config  # noqa: E402
from jaxvc.models.embeddings import sinusoidal_positions  # noqa: E402
from jaxvc.models.unet import UnsupportedConfigError  # noqa: E402
from tests.conftest import relative_error  # noqa: E402
from tests.test_unet_parity import CASES, FAST_COMPILE, randomize  # noqa: E402
from tests.tiny_models import method_config  # noqa: E402

RUNTIME = ("dtype", "param_dtype", "remat", "attention_backend")  # UNetConfig fields a config.json does not hold


def _torch_state(model) -> dict:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _assert_same_config_back(config, unet2d_config):
    runtime = {name: getattr(config, name) for name in RUNTIME}
    assert translate_diffusers_config(unet_motion_config(config), **runtime) == config
    assert translate_diffusers_config(unet2d_config, motion_adapter_config(config), **runtime) == config


@pytest.mark.parametrize("name", sorted(CASES))
def test_state_dict_round_trip_is_bit_exact(name, tmp_path):
    unet_kwargs, adapter_kwargs, _, _ = CASES[name]
    unet2d = randomize(diffusers.UNet2DConditionModel(**unet_kwargs), 11)
    model = diffusers.UNetMotionModel.from_unet2d(unet2d, randomize(diffusers.MotionAdapter(**adapter_kwargs), 12))
    model.save_pretrained(tmp_path / "unet")
    config, variables = load_unet(tmp_path / "unet")
    assert config.use_linear_projection == unet_kwargs.get("use_linear_projection", False)
    original, written = _torch_state(model), unet_state_dict(config, variables)
    assert set(written) == set(original)
    tables = [k for k in original if k.endswith(".pos_embed.pe")]
    assert tables and not [k for k in tables if "motion_modules" not in k]
    for key in sorted(set(original) - set(tables)):
        assert written[key].dtype == original[key].dtype, key
        np.testing.assert_array_equal(written[key], original[key], err_msg=key)
    for key in tables:  # jaxvc's table (the formula, rounded once) is what both sides then compute with
        assert written[key].shape == original[key].shape
        np.testing.assert_array_equal(written[key][0], sinusoidal_positions(*original[key].shape[1:]))
        assert np.abs(written[key] - original[key]).max() < 4e-6  # torch's float32 arithmetic, last bits
    _assert_same_config_back(config, unet2d.config)
    # diffusers builds exactly these keys and shapes from the written config
    rebuilt = diffusers.UNetMotionModel.from_config(unet_motion_config(config))
    assert {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in written.items()}
    # the projections' layout follows use_linear_projection; a mismatch is refused, not written transposed wrong
    flipped = dataclasses.replace(config, use_linear_projection=not config.use_linear_projection)
    with pytest.raises(ValueError, match="use_linear_projection"):
        unet_state_dict(flipped, variables)


def test_a_stored_positional_table_is_written_as_stored(tmp_path):
    unet_kwargs, adapter_kwargs, _, _ = CASES["tiny_v1"]
    model = diffusers.UNetMotionModel.from_unet2d(diffusers.UNet2DConditionModel(**unet_kwargs),
                                                  diffusers.MotionAdapter(**adapter_kwargs))
    key = "down_blocks.0.motion_modules.0.transformer_blocks.0.pos_embed.pe"
    with torch.no_grad():
        model.state_dict()[key].add_(0.01 * torch.randn(model.state_dict()[key].shape))
    model.save_pretrained(tmp_path / "unet")
    with pytest.warns(UserWarning, match="differ from the sinusoidal formula"):
        config, variables = load_unet(tmp_path / "unet")
    assert "buffers" in variables
    np.testing.assert_array_equal(unet_state_dict(config, variables)[key], model.state_dict()[key].numpy())


# ---------------------------------------------------------------------------------------------- a VideoMaker run
@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny latent VideoMaker run folder (2 frames) exported with ``jaxvc export-diffusers``."""
    root = tmp_path_factory.mktemp("export_diffusers")
    return _exported_run(root, seed=0), root / "out"


def _exported_run(root, seed, **overrides):
    """A tiny VideoMaker run in ``root/run`` (2 frames, ``overrides``), exported by the CLI to ``root/out``. Its
    checkpoint is the trainer's own initial state with every trainable weight moved by noise and saved as step 1:
    the same run folder and checkpoint a trained step writes, without compiling the train step (half a minute on 2
    cores)."""
    from jaxvc.methods import build_method
    from jaxvc.train.loop import Trainer, write_config
    from jaxvc.train.trained_run import load_trained_run

    config = method_config("configs/videomaker.py:tiny", steps=1, batch_size=1,
                           **{"model.num_frames": 2, **overrides})
    trainer = Trainer(config, build_method(config), root / "run")
    state = trainer.init_state()
    rng = np.random.default_rng(seed)
    moved = jax.device_put(jax.tree.map(lambda x: np.asarray(x) + rng.normal(0, 0.02, x.shape).astype(x.dtype),
                                        state.params))
    write_config(config, root / "run")
    trainer.save(state.replace(step=jnp.ones((), jnp.int32), params=moved, ema=None if state.ema is None else moved),
                 None)
    trainer.checkpointer.wait()
    assert jaxvc_main(["export-diffusers", str(root / "run"), str(root / "out")]) == 0
    return load_trained_run(root / "run")


def test_exported_run_predicts_in_diffusers_what_it_predicts_in_jaxvc(exported):
    from jaxvc.bench.torch_pisa import install_reference_injection

    run, out = exported
    record = json.loads((out / "jaxvc_export.json").read_text())
    frames = run.method.sample_frames
    assert (record["method"], record["step"], record["ema"], record["dtype"]) == (
        "videomaker", 1, run.used_ema, "float32")
    assert (record["frames"], record["frames_with_reference"], record["left_out"]) == (frames, frames + 1, [])
    # the written folder is the run's UNet, bit for bit, as jaxvc's own loader reads it back
    config, variables = load_unet(out / "unet")
    assert config == dataclasses.replace(run.method.unet.config, **{k: getattr(config, k) for k in RUNTIME})
    got = traverse_util.flatten_dict(variables["params"])
    want = traverse_util.flatten_dict(jax.device_get(run.params["params"]["unet"]))
    assert set(got) == set(want) and all(np.array_equal(got[k], np.asarray(want[k])) for k in want)

    unet, info = diffusers.UNetMotionModel.from_pretrained(str(out / "unet"), output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    install_reference_injection(unet.eval(), frames + 1, run.method.options.reference_cross_attention)
    rng = np.random.default_rng(0)
    h, w = run.method.latent_frame_size
    latents = rng.standard_normal((1, frames, h, w, config.in_channels)).astype(np.float32)
    reference = rng.standard_normal((1, 1, h, w, config.in_channels)).astype(np.float32)
    text = rng.standard_normal((1, 77, config.cross_attention_dim)).astype(np.float32)
    t = np.array([600])
    args = (run.params, latents, t, text, reference)
    ours = jax.jit(run.method.denoise).lower(*args).compile(FAST_COMPILE)(*args)  # (1, F+1, h, w, c)
    sample = torch.from_numpy(np.concatenate([latents, reference], axis=1)).permute(0, 4, 1, 2, 3)
    with torch.no_grad():
        theirs = unet(sample, torch.from_numpy(t), torch.from_numpy(text).repeat_interleave(frames + 1, dim=0)).sample
    error = relative_error(ours, theirs.permute(0, 2, 3, 4, 1).numpy())
    print(f"exported VideoMaker in diffusers with PISA: relative error {error:.2e}")
    assert error < 1e-5


def test_motion_adapter_folder_with_the_spatial_unet_is_the_same_model(exported):
    run, out = exported
    unet = diffusers.UNetMotionModel.from_pretrained(str(out / "unet")).eval()
    adapter, info = diffusers.MotionAdapter.from_pretrained(str(out / "motion_adapter"), output_loading_info=True)
    assert not any(info.values()), info
    state = unet.state_dict()
    motion = {k: v for k, v in state.items() if "motion_modules." in k}
    assert set(adapter.state_dict()) == set(motion)
    assert all(torch.equal(adapter.state_dict()[k], v) for k, v in motion.items())
    # the run's spatial UNet as a UNet2DConditionModel, + the adapter, through diffusers' own from_unet2d
    cfg = unet.config
    unet2d = diffusers.UNet2DConditionModel(
        sample_size=cfg.sample_size, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        down_block_types=[t.replace("Motion", "2D") for t in cfg.down_block_types],
        up_block_types=[t.replace("Motion", "2D") for t in cfg.up_block_types],
        block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
        norm_num_groups=cfg.norm_num_groups, cross_attention_dim=cfg.cross_attention_dim,
        attention_head_dim=cfg.num_attention_heads, use_linear_projection=cfg.use_linear_projection)
    unet2d.load_state_dict({k: v for k, v in state.items() if "motion_modules." not in k})  # strict
    rebuilt = diffusers.UNetMotionModel.from_unet2d(unet2d, adapter).eval()
    assert set(rebuilt.state_dict()) == set(state)
    assert all(torch.equal(rebuilt.state_dict()[k], v) for k, v in state.items())
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(1, cfg.in_channels, 3, 8, 8, generator=generator)
    context = torch.randn(3, 5, cfg.cross_attention_dim, generator=generator)
    with torch.no_grad():
        np.testing.assert_array_equal(rebuilt(sample, 10, context).sample.numpy(), unet(sample, 10, context).sample)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_stored_dtype(exported, tmp_path, dtype):
    run, out = exported
    export(run, tmp_path, dtype=dtype)
    full = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    stored = load_file(str(tmp_path / "unet" / "diffusion_pytorch_model.safetensors"))
    assert set(stored) == set(full) and {v.dtype for v in stored.values()} == {jnp.dtype(dtype)}
    assert all(np.array_equal(stored[k], full[k].astype(jnp.dtype(dtype))) for k in full)
    assert json.loads((tmp_path / "jaxvc_export.json").read_text())["dtype"] == dtype
    unet = diffusers.UNetMotionModel.from_pretrained(str(tmp_path / "unet"), torch_dtype=getattr(torch, dtype))
    assert unet.dtype == getattr(torch, dtype)


# ---------------------------------------------------------------------------------------------- what is refused
def _stub(name, train_text_encoder=False):
    return SimpleNamespace(name=name, options=SimpleNamespace(train_text_encoder=train_text_encoder))


@pytest.mark.parametrize("config_path, message", [("configs/microcinema.py:tiny", "AppearNet"),
                                                  ("configs/disentangled_s2v.py:tiny", "Wan video DiT")])
def test_methods_without_a_diffusers_unet_are_refused(tmp_path, config_path, message):
    from jaxvc.methods import build_method

    method = build_method(method_config(config_path))
    with pytest.raises(ValueError, match=message) as error:
        export(SimpleNamespace(method=method, params=None, step=0, used_ema=False), tmp_path / "out")
    assert "\n" not in str(error.value) and not (tmp_path / "out").exists()


def test_adapters_are_left_out_by_name_or_refused():
    tree = lambda **parts: {"params": {"unet": {}, "text_encoder": {}, "vae": {}, **parts}}  # noqa: E731
    motion_stage = left_out_parts(_stub("still_moving"), tree(adapters={"motion": {}}))
    assert len(motion_stage) == 1 and motion_stage[0].startswith("adapters/motion: Still-Moving's motion adapter")
    crafter = left_out_parts(_stub("customcrafter"), tree(adapters={"sslm": {}}, new_tokens=None))
    assert [part.split(":")[0] for part in crafter] == ["adapters/sslm", "new_tokens"]
    with pytest.raises(ValueError, match=r"adapters/spatial change the UNet's output"):
        left_out_parts(_stub("still_moving"), tree(adapters={"motion": {}, "spatial": {}}))
    with pytest.raises(ValueError, match="trains its text encoder"):
        left_out_parts(_stub("videomaker", train_text_encoder=True), tree())
    with pytest.raises(ValueError, match="no diffusers UNetMotionModel export"):
        left_out_parts(_stub("toy"), tree())


def test_jaxvc_only_unet_features_are_refused(exported):
    from jaxvc.methods import build_method

    config = exported[0].method.unet.config
    per_frame = dataclasses.replace(config, motion=dataclasses.replace(config.motion, norm_over_frames=False))
    with pytest.raises(UnsupportedConfigError, match="norm_over_frames=False"):
        unet_motion_config(per_frame)
    demo = build_method(method_config("configs/videomaker.py:demo")).unet.config
    with pytest.raises(UnsupportedConfigError) as error:
        unet_motion_config(demo)
    for name in ("resnet_time_scale_shift", "addition_embed_type", "spatial_position_embedding",
                 "motion.frame_time_embedding"):
        assert name in str(error.value)


def test_cli_refuses_a_missing_run_folder_in_one_line(tmp_path, capsys):
    assert jaxvc_main(["export-diffusers", str(tmp_path / "nothing"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxvc export-diffusers: ") and err.count("\n") == 1 and "not a training run" in err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- a whole pipeline
@pytest.fixture(scope="module")
def pipeline_export(tmp_path_factory):
    """A tiny VideoMaker run whose ``model.pretrained`` is a diffusers AnimateDiff folder (the initial state, moved
    by noise, saved as step 1 as in ``exported``), exported with the CLI and no ``--base``: OUT is a pipeline."""
    from tests.tiny_models import build_tiny_animatediff_folder

    root = tmp_path_factory.mktemp("export_pipeline")
    base = build_tiny_animatediff_folder(root)
    return _exported_run(root, seed=1, **{"model.pretrained": str(base)}), base, root / "out"


def test_export_with_a_pretrained_pipeline_is_a_whole_animatediff_pipeline(pipeline_export):
    from jaxvc.convert.pipeline import load_pipeline, tree_equal

    run, base, out = pipeline_export
    record = json.loads((out / "jaxvc_export.json").read_text())
    assert (record["pipeline"], record["base"], record["base_from"]) == (True, str(base), "config.model.pretrained")
    assert "pipeline_reason" not in record
    index, base_index = (json.loads((f / "model_index.json").read_text()) for f in (out, base))
    assert index["_class_name"] == "AnimateDiffPipeline"
    assert (index["unet"], index["motion_adapter"]) == (["diffusers", "UNetMotionModel"], ["diffusers", "MotionAdapter"])
    for name in ("vae", "text_encoder", "tokenizer", "scheduler"):
        assert index[name] == base_index[name], name
        files = sorted(p.relative_to(base / name) for p in (base / name).rglob("*") if p.is_file())
        assert files == sorted(p.relative_to(out / name) for p in (out / name).rglob("*") if p.is_file())
        assert all(os.path.samefile(out / name / f, base / name / f) for f in files)  # hard links here
    assert index["feature_extractor"] == index["image_encoder"] == [None, None]

    # (1) diffusers loads OUT whole; its UNet is OUT/unet's
    pipe = diffusers.AnimateDiffPipeline.from_pretrained(str(out))
    assert isinstance(pipe.unet, diffusers.UNetMotionModel) and isinstance(pipe.motion_adapter, diffusers.MotionAdapter)
    written = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    state = _torch_state(pipe.unet)
    assert set(state) == set(written) and all(np.array_equal(state[k], written[k]) for k in written)
    # (2) jaxvc reads OUT as a diffusers pipeline folder: the run's UNet bit for bit, the base's VAE and text encoder
    ours, theirs = load_pipeline(out), load_pipeline(base)
    got = traverse_util.flatten_dict(ours.unet_params["params"])
    want = traverse_util.flatten_dict(jax.device_get(run.params["params"]["unet"]))
    assert set(got) == set(want) and all(np.array_equal(got[k], np.asarray(want[k])) for k in want)
    assert tree_equal(ours.vae_params, theirs.vae_params) and tree_equal(ours.text_params, theirs.text_params)
    assert (ours.vae_config, ours.text_config) == (theirs.vae_config, theirs.text_config)


def test_base_choices_and_refusals(pipeline_export, tmp_path, capsys):
    run, base, _ = pipeline_export
    # a converted jaxvc checkpoint as the run's base: the UNet folders only, and the record says why
    (tmp_path / "converted").mkdir()
    (tmp_path / "converted" / "jaxvc_pipeline.json").write_text("{}")
    converted = SimpleNamespace(**{**vars(run), "config": run.config.copy_and_resolve_references()})
    converted.config.model.pretrained = str(tmp_path / "converted")
    written = export(converted, tmp_path / "a")
    record = json.loads((tmp_path / "a" / "jaxvc_export.json").read_text())
    assert written["pipeline"] is None and not record["pipeline"] and "converted jaxvc checkpoint" in record[
        "pipeline_reason"] and record["base"] == str(tmp_path / "converted")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["jaxvc_export.json", "motion_adapter", "unet"]
    # --base makes it a pipeline (re-exported into the same OUT: the links replaced, the base untouched)
    before = {p: p.read_bytes() for p in base.rglob("*") if p.is_file()}
    for _ in range(2):
        written = export(converted, tmp_path / "a", base=base)
    assert written["pipeline"] == tmp_path / "a" / "model_index.json"
    record = json.loads((tmp_path / "a" / "jaxvc_export.json").read_text())
    assert (record["base"], record["base_from"], record["pipeline"]) == (str(base), "--base", True)
    assert {p: p.read_bytes() for p in base.rglob("*") if p.is_file()} == before
    # a pixel-space run has no latent pipeline: --base is refused
    pixel = SimpleNamespace(method=SimpleNamespace(vae=None, unet=run.method.unet), config=None)
    with pytest.raises(ValueError, match="pixel-space"):
        _resolve_base(pixel, base)
    # (3) --base without model_index.json: one line, exit 2, nothing written
    run_dir = json.loads((pipeline_export[2] / "jaxvc_export.json").read_text())["run"]
    capsys.readouterr()
    assert jaxvc_main(["export-diffusers", run_dir, str(tmp_path / "c"), "--base", str(tmp_path / "converted")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxvc export-diffusers: base ") and err.count("\n") == 1 and "model_index.json" in err
    assert not (tmp_path / "c").exists()
