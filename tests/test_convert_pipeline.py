"""`jaxvc convert` round trip: a tiny diffusers AnimateDiff pipeline folder -> Orbax checkpoint -> identical outputs."""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from jaxvc.cli import main as jaxvc_main  # noqa: E402
from jaxvc.convert.pipeline import PipelineFolderError, load_diffusers_pipeline, load_pipeline, tree_equal  # noqa: E402
from jaxvc.models.clip_text import CLIPTextEncoder  # noqa: E402
from jaxvc.models.tokenizer import CLIPTokenizer  # noqa: E402
from jaxvc.models.unet import UNetMotion  # noqa: E402
from jaxvc.models.vae import AutoencoderKL  # noqa: E402
from tests.tiny_models import build_tiny_animatediff_folder  # noqa: E402


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    return build_tiny_animatediff_folder(tmp_path_factory.mktemp("pipeline"))


def _outputs(weights):
    """UNet, VAE and text-encoder outputs on fixed inputs."""
    rng = np.random.default_rng(0)
    sample = jnp.asarray(rng.standard_normal((1, 4, 8, 8, 4)), jnp.float32)
    context = jnp.asarray(rng.standard_normal((1, 7, 32)), jnp.float32)
    # jitted (eagerly, ~350 small programs compile): both sides run the same programs, so outputs stay bit-equal
    unet = jax.jit(UNetMotion(weights.unet_config).apply)(weights.unet_params, sample, jnp.array([321]), context)
    images = jnp.asarray(rng.standard_normal((1, 16, 16, 3)), jnp.float32)
    vae = AutoencoderKL(weights.vae_config)
    decoded = jax.jit(functools.partial(vae.apply, method=AutoencoderKL.decode))(weights.vae_params, sample[:, 0])
    mean, _ = jax.jit(functools.partial(vae.apply, method=AutoencoderKL.encode))(weights.vae_params, images)
    ids = CLIPTokenizer.from_folder(weights.tokenizer_folder)(["a red star moves left"])
    text = CLIPTextEncoder(weights.text_config).apply(weights.text_params, ids)["last_hidden_state"]
    return [np.asarray(x) for x in (unet, decoded, mean, text)]


def test_convert_round_trip_is_exact(pipeline_folder, tmp_path, capsys):
    direct = load_diffusers_pipeline(pipeline_folder)
    assert direct.unet_config.motion is not None and direct.unet_config.motion.max_seq_length == 32
    out = tmp_path / "converted"
    assert jaxvc_main(["convert", str(pipeline_folder), str(out)]) == 0
    assert "converted" in capsys.readouterr().out
    index = json.loads((out / "jaxvc_pipeline.json").read_text())
    assert index["scheduler"]["timestep_spacing"] == "linspace"
    converted = load_pipeline(out)
    assert converted.unet_config == direct.unet_config
    assert converted.vae_config == direct.vae_config and converted.text_config == direct.text_config
    for a, b in ((direct.unet_params, converted.unet_params), (direct.vae_params, converted.vae_params),
                 (direct.text_params, converted.text_params)):
        assert tree_equal(a, b)
    for ours, theirs in zip(_outputs(direct), _outputs(converted)):
        np.testing.assert_array_equal(ours, theirs)


def test_convert_refuses_to_overwrite_and_names_missing_parts(pipeline_folder, tmp_path):
    out = tmp_path / "converted"
    out.mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        jaxvc_main(["convert", str(pipeline_folder), str(out)])
    with pytest.raises(PipelineFolderError, match="neither a jaxvc checkpoint"):
        load_pipeline(tmp_path)


def test_stored_positional_tables_survive_conversion_and_methods_refuse_them(pipeline_folder, tmp_path):
    """Motion positional tables that differ from the formula (the loader keeps them in ``variables['buffers']``,
    ``tests/test_animatediff_convert.py``) are written by `jaxvc convert` and read back; the methods, which apply
    the UNet with its parameters only, refuse to fine-tune such weights instead of silently using the formula."""
    from flax import traverse_util

    from jaxvc.config_utils import ConfigError
    from jaxvc.convert.pipeline import save_converted
    from jaxvc.methods import build_method
    from tests.tiny_models import method_config

    weights = load_diffusers_pipeline(pipeline_folder)
    flat = traverse_util.flatten_dict(weights.unet_params["params"])
    blocks = [path[:-2] for path in flat if path[-2:] == ("norm1", "scale")
              and any(part.startswith("motion_modules") for part in path)]
    length = weights.unet_config.motion.max_seq_length
    rng = np.random.default_rng(0)
    tables = {block + ("pos_embed",): rng.standard_normal((length, flat[block + ("norm1", "scale")].shape[0]))
              .astype(np.float32) for block in blocks}
    assert tables
    weights.unet_params = {**weights.unet_params, "buffers": traverse_util.unflatten_dict(tables)}
    save_converted(weights, tmp_path / "converted")
    converted = load_pipeline(tmp_path / "converted")
    assert tree_equal(converted.unet_params, weights.unet_params)  # the params and the stored tables

    config = method_config("configs/videomaker.py:tiny", **{"model.pretrained": str(tmp_path / "converted")})
    with pytest.raises(ConfigError, match="positional tables that differ from the sinusoidal formula"):
        build_method(config)
