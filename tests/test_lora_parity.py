"""LoRA files against peft 0.21.2 + diffusers 0.42.1 on UNetMotionModel.

A tiny random UNetMotionModel gets a peft LoRA (``unet.add_adapter``) with random factors on both sides; diffusers
saves it (``save_lora_weights``, with its alpha metadata); jaxvc reads the file onto the same base weights, and the
adapted UNet's output must equal torch's (float32, relative error < 1e-5). The same file renamed to the kohya / A1111
layout, the LoRA merged into the weights, a scaled LoRA, and a jaxvc adapter exported with ``save_lora`` and loaded
by diffusers' own ``load_lora_weights`` all give the same numbers.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from jaxvc.convert.lora import LoraFileError, read_lora, save_lora  # noqa: E402
from jaxvc.convert.unet import load_unet  # noqa: E402
from jaxvc.models import lora  # noqa: E402
from jaxvc.models.unet import UNetMotion  # noqa: E402
from tests.conftest import relative_error  # noqa: E402
from tests.test_unet_parity import CASES, from_video, randomize, run_jitted, to_video  # noqa: E402

TOLERANCE = 1e-5
# peft target_modules as a regex over torch module names (full match): CustomCrafter's spatial q/k/v of self- and
# cross-attention plus the ResNets' 3x3 convolutions (the conv path), and Still-Moving's temporal q/k/v
TARGETS = {
    "spatial_attention_and_conv": r"(down|up)_blocks\.\d+\.(attentions\.\d+\.transformer_blocks\.\d+\.attn[12]\."
                                  r"to_[qkv]|resnets\.\d+\.conv1)",
    "temporal_attention": r".*motion_modules\.\d+\.transformer_blocks\.\d+\.attn[12]\.to_[qkv]",
}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    unet_kwargs, adapter_kwargs, (b, f, h, w), length = CASES["tiny_v1"]
    unet2d = randomize(diffusers.UNet2DConditionModel(**unet_kwargs), 7).eval()
    adapter = randomize(diffusers.MotionAdapter(**adapter_kwargs), 107).eval()
    folder = tmp_path_factory.mktemp("lora_base")
    unet2d.save_pretrained(folder / "unet")
    adapter.save_pretrained(folder / "adapter")
    generator = torch.Generator().manual_seed(3)
    sample = torch.randn(b, 4, f, h, w, generator=generator)
    context = torch.randn(b, length, unet_kwargs["cross_attention_dim"], generator=generator)
    config, variables = load_unet(folder / "unet", folder / "adapter")
    return dict(unet2d=unet2d, adapter=adapter, folder=folder, sample=sample, context=context,
                timesteps=torch.tensor([10, 900][:b]), config=config, variables=variables)


def torch_model(base):
    return diffusers.UNetMotionModel.from_unet2d(base["unet2d"], base["adapter"]).eval()


def torch_output(model, base):
    frames = base["sample"].shape[2]
    with torch.no_grad():
        return model(base["sample"], base["timesteps"], base["context"].repeat_interleave(frames, dim=0)).sample.numpy()


def jaxvc_output(base, adapters=(), variables=None):
    model = UNetMotion(base["config"])

    def forward(variables, sample, timesteps, context):
        with lora.applied(adapters):
            return model.apply(variables, sample, timesteps, context)

    out = run_jitted(forward, variables or base["variables"], to_video(base["sample"]),
                     jnp.asarray(base["timesteps"]), jnp.asarray(base["context"].numpy()))
    return from_video(out)


def add_peft_lora(model, target: str, rank=4, alpha=8, seed=0):
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=target, init_lora_weights="gaussian")
    model.add_adapter(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:  # both factors random: lora_B starts at zero and would hide a transposed factor
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))
    return config


@pytest.fixture(scope="module", params=sorted(TARGETS))
def peft_lora(request, base, tmp_path_factory):
    from peft.utils import get_peft_model_state_dict

    model = torch_model(base)
    config = add_peft_lora(model, TARGETS[request.param], seed=sorted(TARGETS).index(request.param))
    layers = get_peft_model_state_dict(model)
    folder = tmp_path_factory.mktemp("lora_" + request.param)
    diffusers.AnimateDiffPipeline.save_lora_weights(folder, unet_lora_layers=layers,
                                                    unet_lora_adapter_metadata=config.to_dict())
    return dict(name=request.param, model=model, file=folder / "pytorch_lora_weights.safetensors",
                layers={k: v.numpy() for k, v in layers.items()}, reference=torch_output(model, base))


def test_diffusers_lora_file_matches_peft(base, peft_lora):
    loaded = read_lora(peft_lora["file"], {"unet": base["variables"]["params"]})
    assert loaded.format == "diffusers"
    adapter = loaded.adapters["unet"]
    assert len(lora.adapter_sites(adapter.tree)) * 2 == len(peft_lora["layers"])
    plain = relative_error(jaxvc_output(base), peft_lora["reference"])
    assert plain > 1e-2  # the LoRA changes the output: the comparison below is not the base model's
    error = relative_error(jaxvc_output(base, [adapter]), peft_lora["reference"])
    print(f"{peft_lora['name']}: relative error {error:.2e} (without the LoRA {plain:.2e})")
    assert error < TOLERANCE

    # merged into the weights: the same function
    merged = {**base["variables"], "params": lora.merge(base["variables"]["params"], adapter)}
    assert relative_error(jaxvc_output(base, variables=merged), peft_lora["reference"]) < TOLERANCE


def test_lora_scale_matches_diffusers(base, peft_lora):
    from diffusers.utils.peft_utils import scale_lora_layers, unscale_lora_layers

    model = peft_lora["model"]
    scale_lora_layers(model, 0.5)
    try:
        reference = torch_output(model, base)
    finally:
        unscale_lora_layers(model, 0.5)
    loaded = read_lora(peft_lora["file"], {"unet": base["variables"]["params"]}, scale=0.5)
    assert relative_error(jaxvc_output(base, [loaded.adapters["unet"]]), reference) < TOLERANCE


def kohya_state(layers: dict, alpha: float) -> dict:
    """diffusers keys -> kohya's: ``down_blocks.0...to_q.lora_A.weight`` -> ``lora_unet_down_blocks_0_..._to_q
    .lora_down.weight``, with each module's ``.alpha``."""
    out = {}
    for key, value in layers.items():
        module, _, leaf = key.partition(".lora_")
        name = "lora_unet_" + module.removeprefix("unet.").replace(".", "_")
        out[f"{name}.lora_{'down' if leaf.startswith('A') else 'up'}.weight"] = value
        out[f"{name}.alpha"] = np.asarray(alpha, np.float32)
    return out


def test_kohya_file_matches_peft(base, peft_lora, tmp_path):
    path = tmp_path / "kohya.safetensors"
    save_file(kohya_state(peft_lora["layers"], alpha=8.0), str(path))
    loaded = read_lora(path, {"unet": base["variables"]["params"]})
    assert loaded.format == "kohya"
    assert relative_error(jaxvc_output(base, [loaded.adapters["unet"]]), peft_lora["reference"]) < TOLERANCE


def test_saved_adapter_loads_in_diffusers(base, tmp_path):
    """A jaxvc adapter (conv and linear sites, alpha != rank) written with save_lora, read by diffusers."""
    config, params = base["config"], base["variables"]["params"]
    spec = lora.AdapterSpec(include=(r".*attentions_\d+/transformer_blocks_\d+/attn1/to_(q|v)", r".*resnets_0/conv2"),
                            exclude=("motion_modules_",), rank=3, alpha=6.0)
    model = UNetMotion(config)
    sample = to_video(base["sample"])
    sites = lora.find_sites(lambda: model.apply(base["variables"], sample, jnp.asarray(base["timesteps"]),
                                                jnp.asarray(base["context"].numpy())), spec)
    assert any(len(site.window) == 2 for site in sites.values()) and any(not s.window for s in sites.values())
    tree = lora.init_adapter(jax.random.key(0), sites, spec)
    tree = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(1), x.shape), tree)  # up != 0
    adapter = lora.AppliedAdapter(spec, tree)
    path = save_lora(tmp_path / "adapter.safetensors", {"unet": adapter})
    torch_unet = torch_model(base)
    pipe = diffusers.AnimateDiffPipeline(vae=None, text_encoder=None, tokenizer=None, unet=torch_unet,
                                         motion_adapter=None, scheduler=diffusers.DDIMScheduler())
    pipe.load_lora_weights(str(path))
    reference = torch_output(pipe.unet, base)
    ours = jaxvc_output(base, [adapter])
    assert relative_error(ours, jaxvc_output(base)) > 1e-3
    assert relative_error(ours, reference) < TOLERANCE
    # and back: the exported file read by jaxvc is the same adapter
    again = read_lora(path, {"unet": params}).adapters["unet"]
    assert relative_error(jaxvc_output(base, [again]), reference) < TOLERANCE


def test_lora_for_another_model_is_refused(base, tmp_path):
    path = tmp_path / "sdxl.safetensors"
    save_file({"unet.down_blocks.5.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": np.zeros((4, 32),
                                                                                                          np.float32),
               "unet.down_blocks.5.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": np.zeros((32, 4),
                                                                                                          np.float32)},
              str(path))
    with pytest.raises(LoraFileError, match="down_blocks.5.*does not have"):
        read_lora(path, {"unet": base["variables"]["params"]})
    shapes = tmp_path / "shapes.safetensors"
    save_file({"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": np.zeros((4, 7),
                                                                                                     np.float32),
               "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": np.zeros((32, 4),
                                                                                                     np.float32)},
              str(shapes))
    with pytest.raises(LoraFileError, match="do not fit the layer's kernel"):
        read_lora(shapes, {"unet": base["variables"]["params"]})
    dora = tmp_path / "dora.safetensors"
    save_file({"unet.x.lora_magnitude_vector": np.zeros((4,), np.float32)}, str(dora))
    with pytest.raises(LoraFileError, match="DoRA"):
        read_lora(dora, {"unet": base["variables"]["params"]})
