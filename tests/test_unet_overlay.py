"""``--unet-weights`` / ``from_pretrained(unet_weights=...)`` (``jaxvc/convert/unet_overlay.py``): a partial UNet
state dict over an AnimateDiff folder's UNet, as VideoMaker's authors load ``human_pytorch_model.bin``
(``unet.load_state_dict(sd, strict=False)``): the result equals converting the whole diffusers ``UNetMotionModel``
after torch's own ``strict=False`` load, whether the file has diffusers keys or AnimateDiff's UNet3D keys (motion
modules in the original layout) under a ``module.`` prefix; a key the model lacks is an error, not skipped."""
import json
import re

import numpy as np
import pytest
from flax import traverse_util

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from jaxvc.convert.torch_to_flax import CheckpointMismatchError  # noqa: E402
from jaxvc.convert.unet import variables_from_state_dict  # noqa: E402
from jaxvc.convert.unet_overlay import overlay_unet_weights  # noqa: E402
from tests.tiny_models import build_tiny_animatediff_folder  # noqa: E402

# diffusers' motion-module keys -> AnimateDiff's original ones (the inverse of jaxvc.convert.animatediff's renames)
TO_ORIGINAL = ((r"(motion_modules\.\d+)\.", r"\1.temporal_transformer."), (r"\.norm1\.", ".norms.0."),
               (r"\.norm2\.", ".norms.1."), (r"\.norm3\.", ".ff_norm."), (r"\.attn1\.", ".attention_blocks.0."),
               (r"\.attn2\.", ".attention_blocks.1."))


def animatediff_keys(key: str) -> list[str]:
    """The AnimateDiff UNet3D key(s) of a diffusers key: a block's positional table is in both its attentions."""
    if "motion_modules" not in key:
        return [key]  # AnimateDiff's UNet3D names its spatial layers as diffusers does
    if key.endswith(".pos_embed.pe"):
        block = key[:-len(".pos_embed.pe")]
        return [animatediff_keys(f"{block}.attn{i}.pos_encoder.pe")[0] for i in (1, 2)]
    for pattern, replacement in TO_ORIGINAL:
        key = re.sub(pattern, replacement, key)
    return [key]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_animatediff_folder(tmp_path_factory.mktemp("overlay"))


def _release(folder):
    """What VideoMaker trains and releases: the spatial self-attention and the motion modules, changed (their
    positional tables saved as they are, the sinusoidal formula)."""
    unet = diffusers.UNetMotionModel.from_pretrained(str(folder / "unet"))
    state = unet.state_dict()
    rng = np.random.default_rng(0)
    noise = lambda k, v: 0 if k.endswith(".pe") else torch.from_numpy(  # noqa: E731
        rng.normal(0, 0.02, tuple(v.shape)).astype(np.float32))
    trained = {k: v + noise(k, v) for k, v in state.items() if ".attn1." in k or "motion_modules" in k}
    unet.load_state_dict(trained, strict=False)  # the authors' load
    return unet, trained


def _expected(folder, unet):
    config = json.loads((folder / "unet" / "config.json").read_text())
    from jaxvc.convert.unet import translate_diffusers_config

    unet_config = translate_diffusers_config(config, source="unet/config.json")
    state = {k: v.numpy() for k, v in unet.state_dict().items()}
    return unet_config, variables_from_state_dict(unet_config, state, source="after strict=False")


@pytest.mark.parametrize("layout", ["diffusers", "animatediff"])
def test_a_partial_state_dict_loads_as_torch_strict_false_does(folder, tmp_path, layout):
    from jaxvc.pipeline import CustomVideoPipeline

    unet, trained = _release(folder)
    config, expected = _expected(folder, unet)
    rename = animatediff_keys if layout == "animatediff" else (lambda key: [key])
    path = tmp_path / "human_pytorch_model.bin"
    # as saved from a DDP-wrapped UNet
    torch.save({"module." + name: v for k, v in trained.items() for name in rename(k)}, path)

    base = CustomVideoPipeline.from_pretrained(folder).params["unet"]
    overlaid, replaced = overlay_unet_weights(config, base, path, allow_pickle=True)
    assert replaced == sum(not k.endswith(".pe") for k in trained)  # the tables are the formula: nothing to keep
    assert set(overlaid) == set(expected) == {"params"}
    got, want = (traverse_util.flatten_dict(v["params"]) for v in (overlaid, expected))
    assert set(got) == set(want)
    for key in want:
        np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]), err_msg="/".join(key))
    before = traverse_util.flatten_dict(base["params"])
    changed = [k for k in want if not np.array_equal(np.asarray(before[k]), np.asarray(want[k]))]
    assert changed and all("attn1" in k or any(p.startswith("motion_modules") for p in k) for k in changed)

    pipe = CustomVideoPipeline.from_pretrained(folder, unet_weights=str(path), allow_pickle=True)
    assert all(np.array_equal(np.asarray(leaf), np.asarray(want[key]))
               for key, leaf in traverse_util.flatten_dict(pipe.params["unet"]["params"]).items())


def test_keys_the_model_lacks_are_errors_and_runs_refuse_it(folder, tmp_path):
    from safetensors.numpy import save_file

    from jaxvc.cli import main as jaxvc_main

    path = tmp_path / "wrong.safetensors"
    save_file({"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight": np.zeros((32, 32), np.float32),
               "down_blocks.0.no_such_layer.weight": np.zeros((3,), np.float32)}, str(path))
    from jaxvc.pipeline import CustomVideoPipeline

    with pytest.raises(CheckpointMismatchError, match=r"1 unexpected in the checkpoint:\s+down_blocks.0."
                                                      r"no_such_layer.weight"):
        CustomVideoPipeline.from_pretrained(folder, unet_weights=str(path))
    code = jaxvc_main(["generate", "--model", str(folder), "--unet-weights", str(path), "--prompt", "a dog",
                       "--reference", str(path), "--out", str(tmp_path / "out")])
    assert code == 2  # a clear one-line error, not a traceback
