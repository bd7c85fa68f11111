"""The benchmark (jaxvc/bench): the tiny table end to end with the PyTorch eager reference, and the analytic FLOP
count against XLA's cost analysis. Timings are never asserted (the machine is shared); FLOP counts are.

What XLA's ``cost_analysis()["flops"]`` counts: 2 per multiply-add of every dot and convolution (zero-padding taps
excluded) plus 1 per element of elementwise work (norms, softmax, activations, adds, the optimizer). The analytic
count (jaxvc/bench/flops.py) is the dots and convolutions only, so XLA's count must be at least the analytic one and
exceed it by the elementwise share: about 1% at width 256 (checked tightly below), 10-15% at the tiny width 32
(checked loosely on the benchmark's own rows).
"""
import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny benchmark run: 2+1 frames at 16 px (8x8 latents), 2 DDIM steps, one timed call of each."""
    from jaxvc.bench.cli import main

    out = tmp_path_factory.mktemp("bench") / "tiny"
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["--size", "tiny", "--frames", "2", "--image-size", "16", "--sampling-steps", "2",
                     "--warmup", "0", "--iters", "1", "--xla-fast-compile", "--torch-threads", "1",
                     "--profile", str(out.parent / "profile"), "--out", str(out)])
    assert code == 0
    return json.loads(out.with_suffix(".json").read_text()), printed.getvalue(), out


def test_table_has_every_row_with_finite_positive_numbers(tiny_run):
    result, printed, out = tiny_run
    rows = {row["workload"]: row for row in result["table"]}
    assert set(rows) == {"train step @16px", "sampling @16px", "VAE decode @16px"}
    for name in rows:
        assert name in printed  # the printed table has the row too
    measured = {(m["workload"], m["implementation"]): m for m in result["measurements"]}
    for workload in ("train step", "sampling", "VAE decode"):
        for implementation in ("jaxvc", "torch eager"):
            m = measured[(workload, implementation)]
            assert m["error"] is None, m
            for field in ("step_s", "samples_per_s", "peak_memory_bytes", "mfu", "analytic_flops"):
                value = m[field]
                assert value is not None and math.isfinite(value) and value > 0, (workload, implementation, field)
        assert measured[(workload, "jaxvc")]["xla_flops"] > 0
    assert result["header"]["peak_flops_per_s"] > 0
    assert out.with_suffix(".csv").read_text().count("\n") == 1 + 6  # header + 3 workloads x 2 implementations


def test_profile_traces_each_row_outside_the_timings(tiny_run):
    """--profile: per row, a JAX trace of the jaxvc program (2 calls after the timed one) and a torch Chrome trace."""
    from jaxvc.train.profiling import trace_files

    result, _, out = tiny_run
    for workload, program in (("train_step", "train_step"), ("sampling", "generate"), ("vae_decode", "vae_decode")):
        traces = trace_files(out.parent / "profile" / f"jaxvc_{workload}_16px")
        assert len(traces) == 1, workload
        spans = sorted((event.start_ns, event.start_ns + event.duration_ns)
                       for plane in jax.profiler.ProfileData.from_file(str(traces[0])).planes
                       for line in plane.lines if line.name == "python" for event in line.events
                       if event.name.startswith("PjitFunction") and f"({program})" in event.name)
        calls = [span for i, span in enumerate(spans) if not any(s <= span[0] and span[1] <= e
                                                                 for s, e in spans[:i])]  # outermost: a call
        assert len(calls) == 2, (workload, spans)
        chrome = json.loads((out.parent / "profile" / f"torch_eager_{workload}_16px.json").read_text())
        assert any(event.get("name", "").startswith("aten::") for event in chrome["traceEvents"]), workload
    assert all(len(m["extra"]["times_s"]) == 1 for m in result["measurements"])  # --iters 1: one timed call


def test_benchmark_flop_counts_bracket_xla_at_tiny_width(tiny_run):
    """Every row: analytic <= XLA <= 1.2 x analytic (train: fwd + the backward JAX computes; sampling: the scan
    body, which XLA counts once, times the steps)."""
    result, _, _ = tiny_run
    for m in result["measurements"]:
        if m["implementation"] == "jaxvc":
            ratio = m["xla_flops"] / m["analytic_flops"]
            assert 1.0 <= ratio <= 1.2, (m["workload"], ratio)


def _wide_unet():
    """The tiny topology at width 256 (head dim 128): elementwise work is ~1% of the FLOPs there."""
    from jaxvc.models.unet import unet_config

    config = unet_config("tiny", "v3", block_out_channels=(256, 512), attention_heads=2, norm_num_groups=8)
    return dataclasses.replace(config, motion=dataclasses.replace(config.motion, heads=2))


def test_analytic_train_flops_match_xla_cost_analysis():
    """Gradient of a loss on the UNet with PISA w.r.t. VideoMaker's trainable subset (spatial attn1 + motion modules):
    XLA's count is within [0%, +3%] of forward + the backward JAX actually computes (weight gradients of trainable
    layers only, input gradients only downstream of the first trainable layer). A naive 3 x forward would be +27%."""
    from flax import linen as nn

    from jaxvc.bench import flops
    from jaxvc.methods.videomaker import is_motion_module, is_spatial_self_attention
    from jaxvc.models.unet import UNetMotion
    from jaxvc.train.metrics import compiled_flops
    from jaxvc.train.state import merge_params, split_params

    config, batch, frames, latent = _wide_unet(), 1, 2, 8
    model = UNetMotion(config)
    video = jax.ShapeDtypeStruct((batch, frames, latent, latent, 4), jnp.float32)
    reference = jax.ShapeDtypeStruct((batch, 1, latent, latent, 4), jnp.float32)
    text = jax.ShapeDtypeStruct((batch, 77, config.cross_attention_dim), jnp.float32)
    timesteps = jax.ShapeDtypeStruct((batch,), jnp.int32)
    params = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), video, timesteps, text))["params"]
    trains = lambda path: is_spatial_self_attention(path) or is_motion_module(path)
    trainable, frozen = split_params(params, trains)

    def loss(trainable, frozen, video, timesteps, text, reference):
        out = model.apply({"params": merge_params(trainable, frozen)}, video, timesteps, text,
                          reference_latent=reference)
        return jnp.mean(out ** 2)

    compiled = jax.jit(jax.grad(loss)).lower(trainable, frozen, video, timesteps, text, reference).compile(
        FAST_COMPILE)
    counter = flops.FlopCounter(lambda path: trains(tuple(path.split("/"))))
    flops.unet(counter, config, batch, frames + 1, latent, latent, injection=True)
    analytic = counter.forward + counter.backward
    ratio = compiled_flops(compiled) / analytic
    assert 1.0 <= ratio <= 1.03, ratio
    assert counter.backward < 2 * counter.forward * 0.9  # frozen layers really are spared their weight gradients


def test_valid_taps_excludes_padding():
    from jaxvc.bench.flops import valid_taps

    assert valid_taps(8, 3, 1, 1) == 8 * 3 - 2      # the two border outputs lose one tap each
    assert valid_taps(8, 1, 1, 0) == 8
    assert valid_taps(8, 3, 2, 1) == 4 * 3 - 1      # stride 2: only the first output reads the padding


@pytest.mark.parametrize("size", ["tiny", "sd15"])
def test_torch_reference_has_the_same_architecture(size):
    """The diffusers/transformers modules built from sizes.py hold exactly as many weights as jaxvc's, component by
    component (torch on the meta device and jax.eval_shape: nothing is allocated)."""
    import diffusers
    import torch
    import transformers

    from jaxvc.bench.jax_workloads import build_method
    from jaxvc.bench.sizes import (diffusers_unet_kwargs, diffusers_vae_kwargs, model_configs,
                                   transformers_clip_kwargs)
    from jaxvc.train.state import unbox

    configs = model_configs(size, dtype=jnp.float32)
    abstract = unbox(build_method(configs, 4, 64).abstract_params())["params"]
    with torch.device("meta"):
        reference = {"unet": diffusers.UNetMotionModel(**diffusers_unet_kwargs(configs.unet)),
                     "vae": diffusers.AutoencoderKL(**diffusers_vae_kwargs(configs.vae)),
                     "text_encoder": transformers.CLIPTextModel(
                         transformers.CLIPTextConfig(**transformers_clip_kwargs(configs.text)))}
    for name, module in reference.items():
        ours = sum(leaf.size for leaf in jax.tree.leaves(abstract[name]))
        assert ours == sum(p.numel() for p in module.parameters()), name
    if size == "sd15":
        assert sum(leaf.size for leaf in jax.tree.leaves(abstract["unet"])) == 1_276_658_564
