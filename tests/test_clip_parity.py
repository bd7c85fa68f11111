"""jaxvc CLIPTextEncoder + convert/clip.py against transformers CLIPTextModel (float32, randomized weights).

Models are saved with ``save_pretrained`` (transformers 5: keys without a prefix) or rewritten as SD 1.5 stores them
(``text_model.`` prefix plus the int64 ``position_ids`` buffer) and loaded through ``load_clip_text`` from the files.
"""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import relative_error

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors.numpy import save_file  # noqa: E402

from jaxvc.convert.clip import load_clip_text  # noqa: E402
from jaxvc.convert.torch_to_flax import CheckpointMismatchError  # noqa: E402
from jaxvc.models.clip_text import CLIPTextConfig, CLIPTextEncoder, abstract_clip_text_params  # noqa: E402

PARITY = 1e-5
VOCAB = 1000
CONFIGS = {
    # transformers-5 layout; eos 500 is not the largest id in the prompts, so first-eos pooling differs from argmax.
    "modern": dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                   hidden_act="quick_gelu", eos_token_id=500, bos_token_id=998, pad_token_id=1),
    # SD 1.5 style: legacy eos_token_id 2 (pool at argmax(ids)), exact GELU, file with text_model. + position_ids.
    "legacy_prefixed": dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                            num_attention_heads=3, hidden_act="gelu", eos_token_id=2, bos_token_id=0,
                            pad_token_id=1, layer_norm_eps=1e-5),
}


def randomize_(module, std=0.1, seed=0):
    """Normal weights everywhere (zeros and ones hide bugs); LayerNorm scales around 1."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * std
            param.copy_(1.0 + noise if "layer_norm" in name and name.endswith("weight") else noise)
    return module


def prompt_ids(length, eos, seed, pad_after_eos=True):
    """(3, length) ids: bos 998 (or 0), random text, eos at varied positions, then eos padding (SD 1.5 pads with
    <|endoftext|>). Text ids avoid eos; the largest id in each row is 999 (the legacy argmax target)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, VOCAB - 2, size=(3, length))
    ids[ids == eos] = eos + 1
    ids[:, 0] = 998
    for row, end in enumerate((5, length // 2, length - 1)):
        ids[row, end] = eos
        if pad_after_eos:
            ids[row, end + 1:] = eos
    return ids


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = {}
    for index, (name, kwargs) in enumerate(CONFIGS.items()):
        model = randomize_(transformers.CLIPTextModel(transformers.CLIPTextConfig(**kwargs)).eval(), seed=index)
        folder = tmp_path_factory.mktemp(f"clip_{name}")
        model.save_pretrained(folder)
        if name == "legacy_prefixed":  # rewrite as SD 1.5's text_encoder/model.safetensors
            state = {f"text_model.{k}": v.detach().numpy() for k, v in model.state_dict().items()}
            state["text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
            (folder / "model.safetensors").unlink()
            save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        out[name] = (model, folder)
    return out


def _check_against_torch(model, folder, ids, label):
    config, params = load_clip_text(folder)
    with torch.no_grad():
        ref = model(torch.from_numpy(ids), output_hidden_states=True)
    ours = jax.jit(lambda p, i: CLIPTextEncoder(config).apply(p, i, output_hidden_states=True))(
        params, ids.astype(np.int32))
    assert len(ours["hidden_states"]) == len(ref.hidden_states) == config.num_layers + 1
    errors = {"last_hidden_state": relative_error(ours["last_hidden_state"], ref.last_hidden_state.numpy()),
              "pooler_output": relative_error(ours["pooler_output"], ref.pooler_output.numpy())}
    errors.update({f"hidden_states[{i}]": relative_error(a, b.numpy())
                   for i, (a, b) in enumerate(zip(ours["hidden_states"], ref.hidden_states))})
    print(f"CLIP {label}: max relative error {max(errors.values()):.2e} {errors}")
    assert all(e < PARITY for e in errors.values()), errors
    return config, params, ref


def test_modern_config_matches_transformers(saved):
    model, folder = saved["modern"]
    ids = prompt_ids(77, eos=500, seed=0)
    config, params, ref = _check_against_torch(model, folder, ids, "modern (eos 500, L=77)")
    assert config.eos_token_id == 500 and config.hidden_act == "quick_gelu"
    # the pooled state sits at the first eos, not at argmax(ids) (both rules disagree on these prompts)
    first_eos = np.argmax(ids == 500, axis=-1)
    assert (first_eos != np.argmax(ids, axis=-1)).all()
    np.testing.assert_allclose(ref.pooler_output.numpy(), ref.last_hidden_state.numpy()[np.arange(3), first_eos])
    # shorter sequences use the first L positions
    _check_against_torch(model, folder, prompt_ids(20, eos=500, seed=1), "modern (L=20)")


def test_sd15_style_prefixed_legacy_file_matches_transformers(saved):
    model, folder = saved["legacy_prefixed"]
    from safetensors.numpy import load_file
    keys = load_file(str(folder / "model.safetensors"))
    assert "text_model.embeddings.position_ids" in keys and all(k.startswith("text_model.") for k in keys)
    # the rewritten file is what transformers itself loads to the same model (as SD 1.5's file is)
    reloaded = transformers.CLIPTextModel.from_pretrained(folder).eval()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[key], value, rtol=0, atol=0)
    ids = prompt_ids(77, eos=999, seed=2)  # legacy pooling: the highest id marks the end of text
    config, params, ref = _check_against_torch(model, folder, ids, "legacy eos=2, gelu, text_model. prefix")
    assert config.eos_token_id == 2 and config.hidden_act == "gelu"
    # clip_skip k = final_layer_norm(hidden_states[-(k+1)]) as diffusers computes it
    with torch.no_grad():
        expected = model.final_layer_norm(ref.hidden_states[-2]).numpy()
    skipped = CLIPTextEncoder(config).apply(params, ids.astype(np.int32), 1, method=CLIPTextEncoder.clip_skip)
    assert relative_error(skipped, expected) < PARITY


def test_errors(saved, tmp_path):
    _, folder = saved["modern"]
    config, params = load_clip_text(folder)
    with pytest.raises(ValueError, match="exceeds max_position_embeddings 77"):
        CLIPTextEncoder(config).apply(params, np.zeros((1, 78), np.int32))
    settings = json.loads((folder / "config.json").read_text())
    settings["num_hidden_layers"] = 4
    (tmp_path / "config.json").write_text(json.dumps(settings))
    (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointMismatchError, match=r"(?s)missing from the checkpoint.*encoder/layers_3"):
        load_clip_text(tmp_path)
    with pytest.raises(ValueError, match="hidden_act"):
        CLIPTextConfig(hidden_act="relu")


def test_sd15_variant_matches_real_config():
    sd15_text_encoder_config = {
        "architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
        "eos_token_id": 2, "hidden_act": "quick_gelu", "hidden_size": 768, "initializer_factor": 1.0,
        "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05, "max_position_embeddings": 77,
        "model_type": "clip_text_model", "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 1,
        "projection_dim": 768, "torch_dtype": "float32", "vocab_size": 49408}
    assert CLIPTextConfig.from_transformers(sd15_text_encoder_config) == CLIPTextConfig.variant("sd15")
    leaves = jax.tree.leaves(abstract_clip_text_params(CLIPTextConfig.variant("sd15")))
    # SD 1.5's text_encoder/model.safetensors: 196 weights + position_ids, 123,060,480 parameters
    assert len(leaves) == 196 and sum(int(np.prod(p.shape)) for p in leaves) == 123_060_480


def test_bfloat16_compute_tracks_float32(saved):
    config, params = load_clip_text(saved["modern"][1])
    ids = prompt_ids(77, eos=500, seed=3).astype(np.int32)
    full = jax.jit(CLIPTextEncoder(config).apply)(params, ids)
    half = jax.jit(CLIPTextEncoder(dataclasses.replace(config, dtype=jnp.bfloat16)).apply)(params, ids)
    assert half["last_hidden_state"].dtype == jnp.bfloat16
    for key in ("last_hidden_state", "pooler_output"):
        assert relative_error(np.asarray(half[key], np.float32), full[key]) < 3e-2
