"""Lowering the benchmark's programs for a GPU from this CPU host (jaxvc/bench/cross_lower.py): the cuDNN attention
calls the train step and sampling would run, and the H200 failure of 2026-12-04 reproduced and fixed."""
import json
import re

import jax.numpy as jnp
import pytest
from flax import traverse_util

from jaxvc.bench import cross_lower
from jaxvc.bench import jax_workloads
from jaxvc.bench.cli import main
from jaxvc.bench.sizes import model_configs
from jaxvc.models import attention
from jaxvc.train.state import unbox
from tests.conftest import has_cuda_plugin

FRAMES, IMAGE_SIZE = 4, 32  # tiny: 16x16 latents, levels of 256 and 64 tokens (+ as many reference tokens)


def _method(remat=False):
    configs = model_configs("tiny", dtype=jnp.bfloat16, attention_backend="cudnn", remat=remat)
    return jax_workloads.build_method(configs, FRAMES, IMAGE_SIZE)


def _lower(workload, method):
    with cross_lower.platform_rules("cuda"):
        params = unbox(method.abstract_params())
        build = {"train step": lambda: jax_workloads.train_step_program(method, params, 1),
                 "sampling": lambda: jax_workloads.sampling_program(method, params, 1, steps=3, guidance=8.0)}
        return cross_lower.lower_workload(workload, build[workload], "cuda", IMAGE_SIZE)


def _spatial_self_attentions(method) -> int:
    """The UNet's PISA layers (spatial attn1; not the motion modules'): at 32 px each attends over 2 x 256 or 2 x 64
    keys, even and over CUDNN_MIN_KEYS, so each should be a cuDNN call."""
    with cross_lower.platform_rules("cuda"):
        params = unbox(method.abstract_params())
    paths = ["/".join(path) for path in traverse_util.flatten_dict(params["params"]["unet"])]
    return len({path.split("/attn1/")[0] for path in paths if re.search(r"/attentions_\d+/.*/attn1/", path)})


def test_train_step_lowers_for_cuda_with_pisa_on_cudnn_and_cross_attention_on_einsum():
    method = _method()
    layers = _spatial_self_attentions(method)
    assert layers == 4
    train = _lower("train step", method)
    assert train.ok, train.error
    # one cuDNN forward and one backward per PISA layer; the cross-attention to 77 text tokens and the motion
    # modules' 5-frame attention are einsums (dot_general), which cuDNN would refuse or gain nothing on
    assert (train.cudnn_attention, train.cudnn_attention_backward) == (layers, layers)
    assert train.dot_generals > 0 and train.convolutions > 0
    sampling = _lower("sampling", method)
    assert sampling.ok, sampling.error
    assert (sampling.cudnn_attention, sampling.cudnn_attention_backward) == (layers, 0)  # the scan body, once


def test_full_remat_recomputes_the_cudnn_attention_in_the_backward_pass():
    method = _method(remat="full")
    train = _lower("train step", method)
    assert train.ok, train.error
    layers = _spatial_self_attentions(method)
    assert (train.cudnn_attention, train.cudnn_attention_backward) == (2 * layers, layers)


def test_the_h200_failure_reproduces_with_the_rule_it_had(monkeypatch):
    """Before the fix, "cudnn" sent every attention with >= 64 keys to cuDNN, CLIP's 77 included; jax's
    differentiated cuDNN rule refuses odd lengths. On the H200 this was "Unsupported sequence length Q 17408, KV 77"
    (SD1.5 at 256 px); here, at tiny size, Q is 5 frames x 256 tokens."""
    monkeypatch.setattr(attention, "_cudnn_takes", lambda query_length, key_length, head_dim: key_length >= 64)
    train = _lower("train step", _method())
    assert not train.ok
    assert re.search(r"Unsupported sequence length Q \d+, KV 77", train.error), train.error


def test_assume_cuda_device_restores_jax_rules():
    from jax._src.cudnn import fused_attention_stablehlo as rules

    before = rules.check_cudnn_version
    with cross_lower.assume_cuda_device(90100, "8.0"):
        assert rules.check_cudnn_version() == 90100
        assert rules.check_compute_capability("8.0") and not rules.check_compute_capability("9.0")
        assert rules.is_cuda_compute_capability_equal("8.0")
    assert rules.check_cudnn_version is before


def test_cli_lower_for_cuda_writes_json_and_exit_status(tmp_path, capsys):
    out = tmp_path / "lowered"
    assert main(["--size", "tiny", "--lower-for", "cuda", "--workloads", "vae", "--out", str(out)]) == 0
    record = json.loads((tmp_path / "lowered.json").read_text())
    assert record["lower_for"] == "cuda" and record["settings"]["attention"] == "cudnn"
    (row,) = record["lowerings"]
    assert row["ok"] and row["workload"] == "VAE decode" and row["convolutions"] > 0
    assert "| VAE decode @32px | cuda | yes |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="cuda only"):
        main(["--size", "tiny", "--lower-for", "tpu", "--attention", "cudnn"])
    with pytest.raises(SystemExit, match="--assume-cudnn"):
        main(["--size", "tiny", "--lower-for", "cuda", "--assume-cudnn", "nine"])


# ------------------------------------------------------------------ compiling for a GPU without one (--compile-for)
def test_gpu_targets_by_name_and_from_a_file(tmp_path):
    from jaxvc.bench.gpu_targets import resolve_target

    h200 = resolve_target("h200", cudnn="9.19")
    assert (h200.compute_capability, h200.memory_bytes) == ("9.0", 143_771 * 2 ** 20)
    assert "core_count: 132" in h200.config_text and "dnn_version_info { major: 9 minor: 19 }" in h200.config_text
    assert resolve_target("a100").compute_capability == "8.0"
    spec = tmp_path / "l4.txtpb"
    spec.write_text('gpu_device_info {\n  core_count: 58\n  device_memory_size: 23034134528\n'
                    '  cuda_compute_capability {\n    major: 8\n    minor: 9\n  }\n}\nplatform_name: "CUDA"\n')
    l4 = resolve_target(str(spec))
    assert (l4.name, l4.compute_capability, l4.memory_bytes) == ("l4.txtpb", "8.9", 23_034_134_528)
    spec.write_text('platform_name: "ROCM"\n')
    with pytest.raises(ValueError, match="no cuda_compute_capability"):
        resolve_target(str(spec))
    with pytest.raises(ValueError, match="not one of"):
        resolve_target(str(tmp_path / "missing.txtpb"))


@pytest.mark.skipif(has_cuda_plugin(), reason="jax's CUDA plugin is installed here")
def test_compile_for_without_the_cuda_plugin_says_what_to_install():
    with pytest.raises(SystemExit, match=r"setup_env.sh --gpu-compile"):
        main(["--size", "tiny", "--compile-for", "h200", "--workloads", "vae"])


@pytest.mark.skipif(not has_cuda_plugin(), reason="needs jax's CUDA plugin (launch/setup_env.sh --gpu-compile); no GPU")
def test_compile_for_h200_plans_the_train_step(tmp_path):
    """XLA's GPU compiler, for an H200 that is not here: the train step compiles with its cuDNN attention, and the
    plan holds at least the state (weights + AdamW moments, donated and aliased) and some temporaries."""
    out = tmp_path / "compiled"
    assert main(["--size", "tiny", "--compile-for", "h200", "--workloads", "train", "--out", str(out)]) == 0
    (row,) = json.loads((tmp_path / "compiled.json").read_text())["lowerings"]
    assert row["ok"] and row["cudnn_attention"] == 4 and row["compile_s"] > 0
    assert row["alias_bytes"] > 0 and row["temp_bytes"] > 0
    assert row["planned_bytes"] == row["argument_bytes"] + row["output_bytes"] + row["temp_bytes"] - row["alias_bytes"]
