"""jaxvc T5Encoder + convert/t5.py against transformers 5 ``UMT5EncoderModel`` (Wan's text encoder) and
``T5EncoderModel`` (float32, random weights, saved with ``save_pretrained`` and loaded by jaxvc).

Covered: UMT5's per-block relative-position tables and T5's shared one, gated tanh-GELU and plain ReLU
feed-forwards, padding masks, sequences longer than the bias tables' max distance (the log-spaced buckets), and the
bucket formula itself on 600 tokens."""
import jax
import numpy as np
import pytest

from tests.conftest import relative_error

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxvc.convert.t5 import load_t5_encoder  # noqa: E402
from jaxvc.convert.torch_to_flax import CheckpointMismatchError  # noqa: E402
from jaxvc.models.t5_encoder import T5Encoder, relative_position_buckets  # noqa: E402

SIZES = dict(vocab_size=300, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_heads=4,
             relative_attention_num_buckets=32, relative_attention_max_distance=128)
CASES = {"umt5": (transformers.UMT5Config, transformers.UMT5EncoderModel, "gated-gelu"),
         "t5_v1_1": (transformers.T5Config, transformers.T5EncoderModel, "gated-gelu"),
         "t5_relu": (transformers.T5Config, transformers.T5EncoderModel, "relu")}


def randomize_(model, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1.0 + 0.1 * noise if "layer_norm" in name else 0.2 * noise)
    return model


@pytest.mark.parametrize("name", list(CASES))
def test_matches_transformers(name, tmp_path):
    config_class, model_class, projection = CASES[name]
    model = randomize_(model_class(config_class(**SIZES, feed_forward_proj=projection)).eval(), len(name))
    model.save_pretrained(tmp_path)
    config, variables = load_t5_encoder(tmp_path)
    assert config.bias_per_layer == (name == "umt5") and config.is_gated_act == (projection != "relu")
    rng = np.random.default_rng(0)
    ids = rng.integers(2, SIZES["vocab_size"], (2, 150))
    mask = np.ones((2, 150), np.int64)
    mask[1, 97:] = 0  # a padded prompt
    ids[1, 97:] = 0
    with torch.no_grad():
        reference = model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
    ours = jax.jit(lambda v, i, m: T5Encoder(config).apply(v, i, m))(variables, ids, mask)
    assert relative_error(ours, reference) < 1e-5


def test_buckets_and_errors(tmp_path):
    from transformers.models.umt5.modeling_umt5 import UMT5Attention

    attention = UMT5Attention(transformers.UMT5Config(**SIZES), has_relative_attention_bias=True)
    offsets = torch.arange(600)[None, :] - torch.arange(600)[:, None]
    np.testing.assert_array_equal(relative_position_buckets(600, 600, 32, 128),
                                  attention._relative_position_bucket(offsets).numpy())
    model = transformers.UMT5EncoderModel(transformers.UMT5Config(**SIZES)).eval()
    model.save_pretrained(tmp_path)
    config_text = (tmp_path / "config.json").read_text()
    (tmp_path / "config.json").write_text(config_text.replace('"num_layers": 3', '"num_layers": 4'))
    with pytest.raises(CheckpointMismatchError, match="block_3"):
        load_t5_encoder(tmp_path)
    (tmp_path / "config.json").write_text(config_text.replace('"umt5"', '"bert"'))
    with pytest.raises(ValueError, match="model_type 'bert'"):
        load_t5_encoder(tmp_path)


def test_tokenizer_matches_transformers(tmp_path):
    from jaxvc.models.t5_tokenizer import T5Tokenizer
    from tests.tiny_models import build_tiny_t5_folder

    folder = build_tiny_t5_folder(tmp_path) / "tokenizer"
    reference = transformers.AutoTokenizer.from_pretrained(folder)
    ours = T5Tokenizer.from_folder(folder, max_length=12)
    texts = ["a red star bouncing", "the  Dog, moving left!", "", "star " * 20, "a xyz subject"]
    expected = reference(texts, padding="max_length", truncation=True, max_length=12).input_ids
    np.testing.assert_array_equal(ours(texts), np.asarray(expected))
    assert ours(["star " * 20])[0, -1] == ours.eos_token_id
    with_cls = ours.with_added_tokens(["<cls>"])
    reference.add_special_tokens({"additional_special_tokens": ["<cls>"]})
    np.testing.assert_array_equal(with_cls(["<cls> a red star"]),
                                  reference(["<cls> a red star"], padding="max_length", max_length=12).input_ids)
