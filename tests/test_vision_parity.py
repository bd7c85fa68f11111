"""jaxvc VisionTransformer + convert/vision.py against transformers (float32, randomized weights, real file formats).

CLIP: ``CLIPModel.get_image_features`` (visual_projection of the post-LN CLS) and ``get_text_features``. DINO:
``ViTModel(...).last_hidden_state[:, 0]``, the CLS token DINO-I uses. Both models are saved with ``save_pretrained``
and read back by jaxvc's loaders from the folder.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import relative_error

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxvc.convert.state_dict import WeightFileError  # noqa: E402
from jaxvc.convert.torch_to_flax import CheckpointMismatchError  # noqa: E402
from jaxvc.convert.vision import load_clip_text_with_projection, load_vision_tower  # noqa: E402
from jaxvc.models.clip_text import CLIPTextEncoder  # noqa: E402
from jaxvc.models.vision_transformer import VisionConfig, VisionTransformer, abstract_vision_params  # noqa: E402

PARITY = 1e-5
TINY_TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8)


def randomize_(module, std=0.1, seed=0):
    """Normal weights everywhere (zeros and ones hide bugs); LayerNorm scales around 1."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * std
            is_norm_scale = ("norm" in name or "layrnorm" in name) and name.endswith("weight")
            param.copy_(1.0 + noise if is_norm_scale else noise)
    return module


def tiny_clip_model():
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, eos_token_id=500, bos_token_id=998, pad_token_id=1),
        vision_config=TINY_TOWER, projection_dim=16)
    return randomize_(transformers.CLIPModel(config).eval(), seed=1)


def tiny_dino_model():
    config = transformers.ViTConfig(**TINY_TOWER, hidden_act="gelu", layer_norm_eps=1e-12)
    return randomize_(transformers.ViTModel(config).eval(), seed=2)


def pixels(seed, batch=3, size=32):
    return np.random.default_rng(seed).normal(size=(batch, size, size, 3)).astype(np.float32)


def torch_pixels(x):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    model = tiny_clip_model()
    model.save_pretrained(folder)
    return folder, model


@pytest.fixture(scope="module")
def dino_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dino")
    model = tiny_dino_model()
    model.save_pretrained(folder)
    return folder, model


def test_clip_image_features_match_transformers(clip_folder):
    folder, model = clip_folder
    config, params = load_vision_tower(folder)
    assert (config.family, config.projection_dim, config.patch_size) == ("clip", 16, 8)
    x = pixels(0)
    with torch.no_grad():
        want = model.get_image_features(pixel_values=torch_pixels(x)).pooler_output.numpy()
    got = np.asarray(VisionTransformer(config).apply(params, jnp.asarray(x))["image_embeds"])
    assert got.shape == want.shape == (3, 16)
    assert relative_error(got, want) < PARITY


def test_clip_hidden_states_match_transformers_layer_by_layer(clip_folder):
    folder, model = clip_folder
    config, params = load_vision_tower(folder)
    x = pixels(1)
    with torch.no_grad():
        want = model.vision_model(pixel_values=torch_pixels(x), output_hidden_states=True).hidden_states
    got = VisionTransformer(config).apply(params, jnp.asarray(x), output_hidden_states=True)["hidden_states"]
    # transformers' hidden_states[0] is after pre_layrnorm; jaxvc's is the embeddings before it.
    assert len(got) == len(want) == 3
    for layer in (1, 2):
        assert relative_error(np.asarray(got[layer]), want[layer].numpy()) < PARITY, layer


def test_clip_text_features_match_transformers(clip_folder):
    folder, model = clip_folder
    config, params, projection = load_clip_text_with_projection(folder)
    ids = np.random.default_rng(3).integers(3, 990, size=(2, 12))
    ids[:, 0], ids[0, 5], ids[1, 11] = 998, 500, 500
    ids[0, 6:] = 500
    with torch.no_grad():
        want = model.get_text_features(input_ids=torch.from_numpy(ids)).pooler_output.numpy()
    pooled = CLIPTextEncoder(config).apply(params, jnp.asarray(ids))["pooler_output"]
    got = np.asarray(pooled) @ projection
    assert got.shape == want.shape == (2, 16)
    assert relative_error(got, want) < PARITY


def test_dino_cls_token_matches_transformers_vit(dino_folder):
    folder, model = dino_folder
    config, params = load_vision_tower(folder)
    assert (config.family, config.projection_dim, config.hidden_act) == ("vit", None, "gelu")
    assert config.layer_norm_eps == 1e-12
    x = pixels(4)
    with torch.no_grad():
        want = model(pixel_values=torch_pixels(x)).last_hidden_state[:, 0].numpy()
    got = np.asarray(VisionTransformer(config).apply(params, jnp.asarray(x))["image_embeds"])
    assert relative_error(got, want) < PARITY


def test_vit_weights_with_the_vit_prefix_and_a_mask_token_load(dino_folder, tmp_path):
    """ViT checkpoints saved from a wrapping model carry ``vit.``; DINO's hub weights may carry ``mask_token``."""
    from safetensors.numpy import load_file, save_file

    folder, _ = dino_folder
    state = load_file(folder / "model.safetensors")
    renamed = {f"vit.{key}": value for key, value in state.items()}
    renamed["vit.embeddings.mask_token"] = np.zeros((1, 1, 32), np.float32)
    save_file(renamed, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    _, params = load_vision_tower(tmp_path)
    _, reference = load_vision_tower(folder)
    assert jax.tree.all(jax.tree.map(np.array_equal, params, reference))


def test_pickled_transformers_weights_load_only_when_allowed(dino_folder, tmp_path):
    """Hub folders of older models may hold only ``pytorch_model.bin``. This one is written from the model in memory,
    whose keys are transformers 5's new names (``layers.0.attention.q_proj``), not the saved legacy ones."""
    folder, model = dino_folder
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(WeightFileError, match="pytorch_model.bin: pickled checkpoints can run code"):
        load_vision_tower(tmp_path)
    _, params = load_vision_tower(tmp_path, allow_pickle=True)
    _, reference = load_vision_tower(folder)
    assert jax.tree.all(jax.tree.map(np.array_equal, params, reference))


def test_a_missing_layer_is_named_with_its_shape(dino_folder, tmp_path):
    from safetensors.numpy import load_file, save_file

    folder, _ = dino_folder
    state = {k: v for k, v in load_file(folder / "model.safetensors").items() if ".layer.1.output.dense." not in k}
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(CheckpointMismatchError, match=r"encoder/layers_1/mlp/fc2/kernel \(64, 32\)"):
        load_vision_tower(tmp_path)


def test_text_projection_needs_a_full_clip_folder(dino_folder):
    with pytest.raises(WeightFileError, match="model_type 'vit'; CLIP-T needs a full CLIPModel folder"):
        load_clip_text_with_projection(dino_folder[0])


def test_config_rejects_what_it_cannot_run():
    with pytest.raises(ValueError, match="model_type 'siglip'"):
        VisionConfig.from_transformers({"model_type": "siglip"})
    with pytest.raises(ValueError, match="image_size 30 is not a multiple of patch_size 8"):
        VisionConfig.variant("tiny", image_size=30)
    config = VisionConfig.variant("tiny")
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract_vision_params(config))
    with pytest.raises(ValueError, match=r"pixels must be \(batch, 32, 32, 3\), got shape \(1, 64, 64, 3\)"):
        VisionTransformer(config).apply(params, jnp.zeros((1, 64, 64, 3)))


def test_named_variants_have_the_published_sizes():
    """As transformers counts them: ``CLIPVisionModelWithProjection`` at ViT-B/32 (projection 512) and
    ``ViTModel(add_pooling_layer=False)`` at DINO ViT-S/16, without the mask token."""
    def count(config):
        return sum(int(np.prod(s.shape)) for s in jax.tree.leaves(abstract_vision_params(config)))
    assert count(VisionConfig.variant("clip-vit-b32")) == 87_849_216
    assert count(VisionConfig.variant("dino-vits16")) == 21_665_664
