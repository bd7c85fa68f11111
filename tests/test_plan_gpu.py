"""``jaxvc plan`` for NVIDIA GPU clusters (``h100:2x8``): device-less CUDA topologies from jax's CUDA plugin.

Without the plugin (CI): topology names parse, and asking for a GPU cluster says how to install the plugin. With it
(`launch/setup_env.sh --gpu-compile`): XLA's GPU compiler plans the mini VideoMaker on 2 H100s in bf16 with cuDNN
attention; data parallelism all-reduces exactly the gradients (in bf16 with jaxlib 0.10), and the device-less GPU
compile honestly reports no FLOPs.
"""
import json

import pytest

from jaxvc.cli import main
from jaxvc.plan.gpus import gpu_chip, is_gpu_topology, parse_gpu_topology
from jaxvc.plan.hardware import TopologyError, slice_devices
from tests.conftest import has_cuda_plugin
from tests.plan_configs import MINI_CONFIG


def test_gpu_topology_names():
    assert parse_gpu_topology("h100:8") == ("h100", 1, 8)
    assert parse_gpu_topology("H200:2x8") == ("h200", 2, 8)
    assert is_gpu_topology("a100:4") and not is_gpu_topology("v5p:2x2x1")
    with pytest.raises(TopologyError, match="expected GPU:N or GPU:HOSTSxN"):
        parse_gpu_topology("h100:2x2x2")
    with pytest.raises(TopologyError, match="must be >= 1"):
        parse_gpu_topology("h100:0x8")
    chip = gpu_chip("h100")
    assert chip.peak_bf16_flops == 989e12 and chip.ici_bandwidth == 900e9 and chip.hbm_bytes > 79 * 2 ** 30


@pytest.mark.skipif(has_cuda_plugin(), reason="jax's CUDA plugin is installed here")
def test_gpu_cluster_without_the_plugin_says_what_to_install():
    with pytest.raises(TopologyError, match="setup_env.sh --gpu-compile"):
        slice_devices("h100:1x2")


@pytest.mark.skipif(not has_cuda_plugin(), reason="needs jax's CUDA plugin (launch/setup_env.sh --gpu-compile)")
def test_data_parallel_plan_on_two_h100s(tmp_path):
    config = tmp_path / "mini.py"
    config.write_text(MINI_CONFIG)
    out = tmp_path / "plan.json"
    # as a GPU user trains: bf16 with cuDNN attention (jax's cuDNN rules are answered for the H100)
    assert main(["plan", "--config", str(config), "--topology", "h100:1x2", "--mesh", "data=2",
                 "--batch-per-chip", "2", "--dtype", "bfloat16", "--config.model.attention_backend=cudnn",
                 "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    (r,) = report["layouts"]
    assert report["topology"] == "h100:1x2" and r["devices"] == 2 and r["global_batch"] == 4 and r["fits"]
    assert r["memory"]["arguments"] > 0 and r["memory"]["aliased"] >= 0.99 * r["memory"]["outputs"]
    comms = r["collectives"]
    # the gradients and nothing else. jaxlib 0.10's GPU compiler sends them at half their f32 size: with bf16 compute
    # each weight's gradient arrives in bf16 (the gradient of its cast) and it all-reduces that before converting it
    # back to f32. jaxlib 0.11 (checked with 0.11.2) all-reduces them in f32.
    from jaxvc.compile_options import jaxlib_version

    wire_bytes = r["trainable_bytes"] / 2 if jaxlib_version().startswith("0.10.") else r["trainable_bytes"]
    assert comms["all-reduce"]["bytes"] == pytest.approx(wire_bytes, rel=0.01)
    assert comms["all-gather"]["count"] == 0 and comms["reduce-scatter"]["count"] == 0
    assert r["flops_per_device"] is None and r["roofline"] is None  # no cost analysis without the device
