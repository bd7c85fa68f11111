"""Weight memory of generation, float32 vs ``jaxvc generate --dtype bfloat16`` (matrices of the parts that compute
in bf16 stored in it; ``jaxvc/models/weight_storage.py``), from abstract parameters (shapes only; seconds on a CPU).
Per device with ``--mesh fsdp=N``: divide the DiT and text encoder rows by N.

    .venv/bin/python bench_results/generation_weights.py
"""
import jax.numpy as jnp
from flax import linen as nn

from jaxvc.models.weight_storage import store_weights
from jaxvc.train.metrics import format_bytes
from jaxvc.train.state import tree_bytes

WAN = (("wan21_t2v_1.3b", 1), ("wan22_ti2v_5b", 1), ("wan21_t2v_14b", 1), ("wan22_t2v_a14b", 2))


def row(name: str, abstract, copies: int = 1) -> tuple[int, int]:
    stored = store_weights(abstract, jnp.bfloat16)
    full, half = copies * tree_bytes(abstract), copies * tree_bytes(stored)
    print(f"| {name} | {format_bytes(full)} | {format_bytes(half)} | {half / full:.3f} |", flush=True)
    return full, half


def main() -> None:
    from jaxvc.convert.unet import abstract_variables
    from jaxvc.models.t5_encoder import T5_VARIANTS, T5EncoderConfig, abstract_t5_params
    from jaxvc.models.unet import unet_config
    from jaxvc.models.wan import abstract_wan_params, wan_config

    print("| weights | float32 | `--dtype bfloat16` | ratio |")
    print("|---|---|---|---|")
    umt5 = nn.unbox(abstract_t5_params(T5EncoderConfig(**T5_VARIANTS["umt5_xxl"])))
    text = row("UMT5-XXL (every Wan pipeline)", umt5)
    for variant, experts in WAN:
        name = f"Wan DiT `{variant}`" + (" (two experts)" if experts > 1 else "")
        full, half = row(name, nn.unbox(abstract_wan_params(wan_config(variant))), experts)
        print(f"| + UMT5-XXL: `{variant}` pipeline without its VAE | {format_bytes(full + text[0])} | "
              f"{format_bytes(half + text[1])} | {(half + text[1]) / (full + text[0]):.3f} |", flush=True)
    unet = nn.unbox(abstract_variables(unet_config("sd15", "v2"))["params"])
    row("AnimateDiff UNet (SD1.5 + motion modules v2)", unet)


if __name__ == "__main__":
    main()
