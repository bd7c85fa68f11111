"""Real-size check of the metric backbones: jaxvc vs the reference implementation, same weights, same inputs, one
process.

    python -m jaxvc.eval.bench [--clip-model DIR] [--dino-model DIR] [--frames 64] [--batch-size 32]
                               [--flow-size 256] [--flow-pairs 4] [--interp-size 256] [--interp-pairs 4]
                               [--faces 16] [--i3d-videos 2] [--c3d-videos 4]

Without folders it builds CLIP ViT-B/32 and DINO ViT-S/16 with random weights at their published sizes (nothing is
downloaded) and saves them in transformers' format first, so the loaders are exercised as with real weights; RAFT
(large, 20 steps; the reference is princeton-vl's code as VBench ships it), AMT-S (VBench's copy), I3D (16 x 224 x
224; cd-fvd's copy of TATS's) and C3D (16 x 112 x 112; a torch transcription of TGANv2's chainer model) are random
too, saved as torch files and read by jaxvc's loaders; ArcFace IResNet-50 is exported to ONNX and run by jaxvc's
ONNX runner against onnxruntime on the same file (what insightface runs). It
prints, per network: the relative error of the outputs, and items/s of jaxvc (jitted, float32) and of the reference
(torch eager, float32, no_grad; or onnxruntime), preprocessing excluded. Medians of 5 timed calls after a warm-up.
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
            "jaxvc_per_s": images / jax_seconds, "reference_per_s": images / torch_seconds, "unit": "img"}


def compare_torch_network(name: str, unit: str, count: int, ours, params, reference, inputs) -> dict:
    """One row: ``ours(params, *inputs)`` (jitted, NHWC) against ``reference(*torch inputs)`` (NCHW / NCTHW)."""
    import jax
    import torch

    from jaxvc.bench.timing import time_calls

    channels_first = [torch.from_numpy(np.moveaxis(x, -1, 1).copy()) for x in inputs]
    with torch.no_grad():  # channels back to last (a no-op for (B, classes) logits)
        expected = np.moveaxis(reference(*channels_first).double().numpy(), 1, -1)
    got = np.asarray(ours(params, *inputs), np.float64)
    error = float(np.linalg.norm(got - expected) / np.linalg.norm(expected))
    jax_seconds = time_calls(lambda: ours(params, *inputs), jax.block_until_ready, warmup=1, iters=5).median_s
    with torch.no_grad():
        torch_seconds = time_calls(lambda: reference(*channels_first), lambda _: None, warmup=1, iters=5).median_s
    return {"tower": name, "params_m": sum(x.size for x in jax.tree.leaves(params)) / 1e6, "rel_error": error,
            "jaxvc_per_s": count / jax_seconds, "reference_per_s": count / torch_seconds, "unit": unit}


def compare_raft(folder: str, size: int, pairs: int) -> dict:
    """RAFT large, 20 refinement steps, ``pairs`` frame pairs of size x size per call (dynamic degree's network)."""
    import jax
    import torch

    from jaxvc.bench.reference_code import vbench_raft
    from jaxvc.convert.raft import load_raft
    from jaxvc.models.raft import RAFT

    raft_class, _ = vbench_raft()
    torch.manual_seed(0)
    model = raft_class(argparse.Namespace(small=False, mixed_precision=False, alternate_corr=False)).eval()
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, f"{folder}/raft-things.pth")
    config, params = load_raft(f"{folder}/raft-things.pth", allow_pickle=True)
    rng = np.random.default_rng(0)
    first = rng.uniform(0, 255, (pairs, size, size, 3)).astype(np.float32)
    second = np.roll(first, (2, -3), axis=(1, 2))
    flow = jax.jit(lambda p, a, b: RAFT(config).apply(p, a, b))
    reference = lambda a, b: model(a, b, iters=config.iters, test_mode=True)[1]  # noqa: E731
    return compare_torch_network(f"RAFT large, 20 steps, {size}px (DD)", "pair", pairs, flow, params, reference,
                                 (first, second))


def compare_amt(folder: str, size: int, pairs: int) -> dict:
    """AMT-S, ``pairs`` frame pairs of size x size per call (motion smoothness's network)."""
    import jax
    import torch

    from jaxvc.bench.reference_code import vbench_amt
    from jaxvc.convert.amt import load_amt
    from jaxvc.models.amt import AMT

    model_class, _ = vbench_amt()
    torch.manual_seed(0)
    model = model_class().eval()
    torch.save({"state_dict": model.state_dict()}, f"{folder}/amt-s.pth")
    config, params = load_amt(f"{folder}/amt-s.pth", allow_pickle=True)
    rng = np.random.default_rng(0)
    first = rng.uniform(0, 1, (pairs, size, size, 3)).astype(np.float32)
    second = np.roll(first, (2, -3), axis=(1, 2))
    middle = jax.jit(lambda p, a, b: AMT(config).apply(p, a, b))
    half = torch.full((pairs, 1, 1, 1), 0.5)
    reference = lambda a, b: model(a, b, half, eval=True)["imgt_pred"]  # noqa: E731
    return compare_torch_network(f"AMT-S, {size}px (motion smoothness)", "pair", pairs, middle, params, reference,
                                 (first, second))


def compare_arcface(folder: str, faces: int) -> dict:
    """ArcFace IResNet-50 (``w600k_r50.onnx``'s network, random) exported to ONNX: jaxvc's OnnxGraph (jitted)
    against onnxruntime on the same file, ``faces`` aligned 112 x 112 faces per call (face similarity's network)."""
    import jax
    import onnxruntime
    import torch

    from jaxvc.bench.timing import time_calls
    from jaxvc.bench.torch_face_models import IResNet, export, randomize_norms
    from jaxvc.models.onnx_graph import OnnxGraph

    torch.manual_seed(0)
    model = randomize_norms(IResNet((3, 4, 14, 3), (64, 64, 128, 256, 512)), seed=1)
    path = export(model, torch.randn(1, 3, 112, 112), f"{folder}/w600k_r50.onnx", ["input.1"], ["683"],
                  {"input.1": {0: "batch"}, "683": {0: "batch"}})
    graph = OnnxGraph.from_file(path)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    crops = np.random.default_rng(0).uniform(-1, 1, (faces, 3, 112, 112)).astype(np.float32)
    embed = jax.jit(lambda params, x: graph(params, x)[0])
    expected = session.run(None, {"input.1": crops})[0].astype(np.float64)
    got = np.asarray(embed(graph.params, crops), np.float64)
    error = float(np.linalg.norm(got - expected) / np.linalg.norm(expected))
    jax_seconds = time_calls(lambda: embed(graph.params, crops), jax.block_until_ready, warmup=1, iters=5).median_s
    ort_seconds = time_calls(lambda: session.run(None, {"input.1": crops}), lambda _: None, warmup=1,
                             iters=5).median_s
    return {"tower": "ArcFace R50 ONNX (face sim; ref: ORT)", "rel_error": error,
            "params_m": sum(x.size for x in graph.params.values()) / 1e6, "jaxvc_per_s": faces / jax_seconds,
            "reference_per_s": faces / ort_seconds, "unit": "face"}


def compare_i3d(folder: str, videos: int) -> dict:
    """I3D logits of ``videos`` clips of 16 x 224 x 224 per call (FVD's network)."""
    import jax
    import torch

    from jaxvc.bench.reference_code import cdfvd_i3d
    from jaxvc.convert.i3d import load_i3d
    from jaxvc.models.i3d import InceptionI3d

    pytorch_i3d, _ = cdfvd_i3d()
    torch.manual_seed(0)
    model = pytorch_i3d.InceptionI3d(400, in_channels=3).eval()
    torch.save(model.state_dict(), f"{folder}/i3d_pretrained_400.pt")
    _, params = load_i3d(f"{folder}/i3d_pretrained_400.pt", allow_pickle=True)
    clips = np.random.default_rng(0).uniform(-1, 1, (videos, 16, 224, 224, 3)).astype(np.float32)
    logits = jax.jit(lambda p, x: InceptionI3d().apply(p, x))
    return compare_torch_network("I3D, 16 x 224px (FVD, KVD)", "video", videos, logits, params, model, (clips,))


def compare_c3d(folder: str, videos: int) -> dict:
    """C3D class logits of ``videos`` mean-subtracted clips of 16 x 112 x 112 per call (the Inception Score's network);
    the reference is a torch transcription of TGANv2's chainer model (``jaxvc/bench/torch_c3d.py``)."""
    import jax
    from safetensors.torch import save_file

    from jaxvc.bench.torch_c3d import random_c3d
    from jaxvc.convert.c3d import load_c3d
    from jaxvc.models.c3d import C3D

    model = random_c3d()
    save_file({key: value.contiguous() for key, value in model.state_dict().items()}, f"{folder}/c3d.safetensors")
    _, params = load_c3d(f"{folder}/c3d.safetensors")
    clips = np.random.default_rng(0).uniform(-100, 100, (videos, 16, 112, 112, 3)).astype(np.float32)
    logits = jax.jit(lambda p, x: C3D().apply(p, x))
    return compare_torch_network("C3D, 16 x 112px (UCF-101 IS)", "video", videos, logits, params, model, (clips,))


def main(argv=None) -> int:
    from jaxvc.cli import HelpFormatter

    parser = argparse.ArgumentParser(prog="python -m jaxvc.eval.bench", description=__doc__.splitlines()[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--clip-model", default=None, help="CLIPModel folder (default: random ViT-B/32)")
    parser.add_argument("--dino-model", default=None, help="ViTModel folder (default: random DINO ViT-S/16)")
    parser.add_argument("--frames", type=int, default=64, help="images per timed call (a multiple of the batch)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per tower call")
    parser.add_argument("--flow-size", type=int, default=256, help="RAFT frame side (a multiple of 8, >= 128)")
    parser.add_argument("--flow-pairs", type=int, default=4, help="RAFT frame pairs per call")
    parser.add_argument("--interp-size", type=int, default=256, help="AMT frame side (a multiple of 16, >= 128)")
    parser.add_argument("--interp-pairs", type=int, default=4, help="AMT frame pairs per call")
    parser.add_argument("--faces", type=int, default=16, help="aligned faces per ArcFace call")
    parser.add_argument("--i3d-videos", type=int, default=2, help="I3D clips per call")
    parser.add_argument("--c3d-videos", type=int, default=4, help="C3D clips per call")
    args = parser.parse_args(argv)
    import jax
    import torch

    with tempfile.TemporaryDirectory() as folder:
        clip_folder, dino_folder = args.clip_model, args.dino_model
        if clip_folder is None or dino_folder is None:
            random_clip, random_dino = build_random_towers(folder)
            clip_folder, dino_folder = clip_folder or random_clip, dino_folder or random_dino
        rows = [compare_tower("CLIP image (CLIP-I, CLIP-T, T.Cons)", clip_folder, args.frames, args.batch_size),
                compare_tower("DINO (DINO-I)", dino_folder, args.frames, args.batch_size),
                compare_raft(folder, args.flow_size, args.flow_pairs),
                compare_amt(folder, args.interp_size, args.interp_pairs),
                compare_arcface(folder, args.faces),
                compare_i3d(folder, args.i3d_videos),
                compare_c3d(folder, args.c3d_videos)]
    print(f"device: {jax.devices()[0].device_kind} | jax {jax.__version__} | torch {torch.__version__} "
          f"({torch.get_num_threads()} threads) | float32; towers: batch {args.batch_size}, 224 px")
    print(f"{'network':<38} {'params':>8} {'rel err':>9} {'unit':>6} {'jaxvc /s':>9} {'ref /s':>9} {'ratio':>6}")
    for row in rows:
        print(f"{row['tower']:<38} {row['params_m']:>7.1f}M {row['rel_error']:>9.2e} {row['unit']:>6} "
              f"{row['jaxvc_per_s']:>9.2f} {row['reference_per_s']:>9.2f} "
              f"{row['jaxvc_per_s'] / row['reference_per_s']:>5.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
