"""Real-size check of the metric backbones: jaxvc vs transformers, same weights, same frames, one process.

    python -m jaxvc.eval.bench [--clip-model DIR] [--dino-model DIR] [--frames 64] [--batch-size 32]

Without folders it builds CLIP ViT-B/32 and DINO ViT-S/16 with random weights at their published sizes (nothing is
downloaded) and saves them in transformers' format first, so the loaders are exercised as with real weights. It
prints, per tower: the largest relative error of the embeddings, and images/s of jaxvc (jitted, float32) and of
torch (eager, float32, no_grad), preprocessing excluded. Medians of 5 timed calls after a warm-up.
"""
from __future__ import annotations

import argparse
import tempfile

import numpy as np


def build_random_towers(folder) -> tuple[str, str]:
    import transformers

    clip_folder, dino_folder = f"{folder}/clip-vit-b32", f"{folder}/dino-vits16"
    transformers.CLIPModel(transformers.CLIPConfig(projection_dim=512)).save_pretrained(clip_folder)
    transformers.ViTModel(transformers.ViTConfig(hidden_size=384, intermediate_size=1536, num_attention_heads=6,
                                                 patch_size=16, layer_norm_eps=1e-12),
                          add_pooling_layer=False).save_pretrained(dino_folder)
    return clip_folder, dino_folder


def compare_tower(name: str, folder: str, frames: int, batch_size: int) -> dict:
    import jax
    import jax.numpy as jnp
    import torch
    import transformers

    from jaxvc.bench.timing import time_calls
    from jaxvc.convert.vision import load_vision_tower
    from jaxvc.models.vision_transformer import VisionTransformer

    config, params = load_vision_tower(folder)
    pixels = np.random.default_rng(0).normal(size=(batch_size, config.image_size, config.image_size, 3))
    pixels = pixels.astype(np.float32)
    embed = jax.jit(lambda p, x: VisionTransformer(config).apply(p, x)["image_embeds"])
    if config.family == "clip":
        model = transformers.CLIPModel.from_pretrained(folder).eval()
        torch_embed = lambda x: model.get_image_features(pixel_values=x).pooler_output  # noqa: E731
    else:
        model = transformers.ViTModel.from_pretrained(folder, add_pooling_layer=False).eval()
        torch_embed = lambda x: model(pixel_values=x).last_hidden_state[:, 0]  # noqa: E731
    torch_pixels = torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())
    ours = np.asarray(embed(params, jnp.asarray(pixels)), np.float64)
    with torch.no_grad():
        reference = torch_embed(torch_pixels).double().numpy()
    error = float(np.max(np.linalg.norm(ours - reference, axis=-1) / np.linalg.norm(reference, axis=-1)))
    calls = max(1, frames // batch_size)
    jax_seconds = time_calls(lambda: [embed(params, jnp.asarray(pixels)) for _ in range(calls)],
                             jax.block_until_ready, warmup=1, iters=5).median_s
    with torch.no_grad():  # torch on the CPU returns when done: nothing to wait for
        torch_seconds = time_calls(lambda: [torch_embed(torch_pixels) for _ in range(calls)], lambda _: None,
                                   warmup=1, iters=5).median_s
    images = calls * batch_size
    return {"tower": name, "params_m": sum(x.size for x in jax.tree.leaves(params)) / 1e6, "rel_error": error,
            "jaxvc_images_s": images / jax_seconds, "torch_images_s": images / torch_seconds}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxvc.eval.bench", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--clip-model", default=None, help="CLIPModel folder (default: random ViT-B/32)")
    parser.add_argument("--dino-model", default=None, help="ViTModel folder (default: random DINO ViT-S/16)")
    parser.add_argument("--frames", type=int, default=64, help="images per timed call (a multiple of the batch)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per tower call")
    args = parser.parse_args(argv)
    import jax
    import torch

    with tempfile.TemporaryDirectory() as folder:
        clip_folder, dino_folder = args.clip_model, args.dino_model
        if clip_folder is None or dino_folder is None:
            random_clip, random_dino = build_random_towers(folder)
            clip_folder, dino_folder = clip_folder or random_clip, dino_folder or random_dino
        rows = [compare_tower("CLIP image (CLIP-I, CLIP-T, T.Cons)", clip_folder, args.frames, args.batch_size),
                compare_tower("DINO (DINO-I)", dino_folder, args.frames, args.batch_size)]
    print(f"device: {jax.devices()[0].device_kind} | jax {jax.__version__} | torch {torch.__version__} "
          f"({torch.get_num_threads()} threads) | float32, batch {args.batch_size}, 224 px")
    print(f"{'tower':<38} {'params':>8} {'max rel err':>12} {'jaxvc img/s':>12} {'torch img/s':>12} {'ratio':>6}")
    for row in rows:
        print(f"{row['tower']:<38} {row['params_m']:>7.1f}M {row['rel_error']:>12.2e} {row['jaxvc_images_s']:>12.1f} "
              f"{row['torch_images_s']:>12.1f} {row['jaxvc_images_s'] / row['torch_images_s']:>5.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
