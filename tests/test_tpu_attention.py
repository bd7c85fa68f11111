"""The "splash" backend (jaxvc/models/tpu_attention.py): TPU flash attention through Pallas's splash kernel.

What is proved on a CPU: the kernel (Pallas interpret mode, the same blocked algorithm) computes softmax attention and
its gradients, causal masks aligned as the einsum path aligns them; long odd lengths are padded with the padding
masked by segment ids (forward and backward); short odd lengths go through the einsum path; under an 8-device mesh
it runs in a shard_map split over batch and heads, or in the inference layout over the queries (keys gathered), and
gives the unsharded result. That it compiles for a TPU (Mosaic, sharded, a v5p slice described by libtpu) and writes no score matrix
out is checked by ``test_splash_compiles_for_a_tpu_slice_without_the_score_matrix`` where libtpu is installed
(``setup_env.sh --test``), as in CI.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvc.models.attention import dot_product_attention
from jaxvc.models.tpu_attention import splash_takes
from tests.conftest import softmax_attention
from tests.multidevice import run_with_devices


def _qkv(queries, keys, heads=2, head_dim=40, batch=2, seed=0):
    draws = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(draws[0], (batch, queries, heads, head_dim)),
            jax.random.normal(draws[1], (batch, keys, heads, head_dim)),
            jax.random.normal(draws[2], (batch, keys, heads, head_dim)))


@pytest.mark.parametrize("queries, keys, causal", [(256, 256, False), (128, 384, False), (128, 384, True)])
def test_splash_computes_softmax_attention_and_its_gradients(queries, keys, causal):
    # PISA's shape: queries over own + reference tokens (here 128 + 128), head dim 40 as at SD1.5's first level
    query, key, value = _qkv(queries, keys)
    out = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, backend="splash", causal=causal))(query, key, value)
    np.testing.assert_allclose(out, softmax_attention(query, key, value, causal), rtol=1e-5, atol=2e-6)
    cotangent = jax.random.normal(jax.random.key(3), query.shape)
    loss = lambda backend: (lambda q, k, v: jnp.sum(dot_product_attention(q, k, v, backend=backend, causal=causal)
                                                    * cotangent))
    grads = jax.jit(jax.grad(loss("splash"), argnums=(0, 1, 2)))(query, key, value)
    with jax.enable_x64(True):
        exact = jax.grad(lambda q, k, v: jnp.sum(softmax_attention(q, k, v, causal, xp=jnp) * cotangent),
                         argnums=(0, 1, 2))(*(jnp.asarray(np.asarray(t), jnp.float64) for t in (query, key, value)))
        for name, got, want in zip("qkv", grads, exact):
            np.testing.assert_allclose(got, np.asarray(want), rtol=1e-4, atol=1e-5, err_msg=f"d loss / d {name}")


@pytest.mark.parametrize("queries, keys", [(128, 77), (16, 16), (32, 32), (200, 256)])
def test_lengths_the_kernel_cannot_take_go_through_the_einsum_path(queries, keys):
    # CLIP's 77 tokens, the motion modules' frames, a 256 px UNet's 4x4 level with its reference (16 + 16)
    assert not splash_takes(queries, keys)
    query, key, value = _qkv(queries, keys)
    jaxpr = str(jax.make_jaxpr(lambda q, k, v: dot_product_attention(q, k, v, backend="splash"))(query, key, value))
    assert "pallas_call" not in jaxpr
    np.testing.assert_array_equal(dot_product_attention(query, key, value, backend="splash"),
                                  dot_product_attention(query, key, value, backend="xla"))
    assert splash_takes(256, 512) and splash_takes(8192, 8192)


@pytest.mark.parametrize("queries, keys", [(1030, 1030), (1100, 512), (1024, 257)])
def test_long_odd_lengths_are_padded_and_the_padding_is_masked(queries, keys):
    """Wan's videos have odd token counts (81 x 480 x 832: 32,760): from PAD_FROM tokens the kernel pads them to its
    multiple and keeps the padding out of the softmax with segment ids, forward and backward; causal attention of
    odd length stays on the einsum path."""
    query, key, value = _qkv(queries, keys, batch=1)
    assert splash_takes(queries, keys) and not splash_takes(queries, keys, causal=True)
    attention = lambda q, k, v: dot_product_attention(q, k, v, backend="splash")  # noqa: E731
    assert "pallas_call" in str(jax.make_jaxpr(attention)(query, key, value))
    np.testing.assert_allclose(jax.jit(attention)(query, key, value), softmax_attention(query, key, value),
                               rtol=1e-5, atol=2e-6)
    cotangent = jax.random.normal(jax.random.key(3), query.shape)
    grads = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attention(q, k, v) * cotangent), argnums=(0, 1, 2)))(
        query, key, value)
    exact = jax.grad(lambda q, k, v: jnp.sum(dot_product_attention(q, k, v, backend="xla") * cotangent),
                     argnums=(0, 1, 2))(query, key, value)
    for name, got, want in zip("qkv", grads, exact):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=f"d loss / d {name}")


SHARDED = """
import jax, jax.numpy as jnp, numpy as np
from jaxvc.models.attention import dot_product_attention
from jaxvc.parallel.mesh import make_mesh, activate
draws = jax.random.split(jax.random.key(0), 4)
query = jax.random.normal(draws[0], (4, 128, 4, 40))
key, value = (jax.random.normal(d, (4, 256, 4, 40)) for d in draws[1:3])
cotangent = jax.random.normal(draws[3], query.shape)
loss = lambda q, k, v: jnp.sum(dot_product_attention(q, k, v, backend="splash") * cotangent)
step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
single = step(query, key, value)
with activate(make_mesh({"data": 2, "tensor": 4})):
    hlo = step.lower(query, key, value).as_text()
    # the kernel runs per device: batch split over data (x fsdp), heads over tensor, as the rule table says
    assert '[{"data", "fsdp"}, {}, {"tensor"}, {}]' in hlo, hlo[:2000]
    sharded = step(query, key, value)
np.testing.assert_allclose(sharded[0], single[0], rtol=1e-5)
for got, want in zip(sharded[1], single[1]):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

# the inference layout (jaxvc generate --mesh): batch whole, queries split over sequence x fsdp, keys gathered;
# 2000 tokens padded to 2048, 256 queries per device
from jaxvc.parallel.inference import INFERENCE_RULES
query, key, value = (jax.random.normal(d, (2, 2000, 2, 40)) for d in draws[:3])
attention = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, backend="splash"))
single = attention(query, key, value)
with activate(make_mesh({"fsdp": 4, "sequence": 2}), INFERENCE_RULES):
    jaxpr = str(jax.make_jaxpr(lambda q, k, v: dot_product_attention(q, k, v, backend="splash"))(query, key, value))
    assert "f32[2,2,256,40]" in jaxpr and "f32[2,2,2048,40]" in jaxpr, "queries not split per device"
    sharded = attention(query, key, value)
np.testing.assert_allclose(sharded, single, rtol=1e-5, atol=1e-6)
print("SHARDED_OK")
"""


def test_splash_under_an_eight_device_mesh_equals_one_device():
    run_with_devices(SHARDED, devices=8)


def test_splash_compiles_for_a_tpu_slice_without_the_score_matrix():
    from jaxvc.plan.hardware import find_libtpu

    if find_libtpu() is None:
        pytest.skip("libtpu is not installed (bash launch/setup_env.sh --test puts it in .venv/opt/libtpu)")
    run_with_devices(COMPILE_FOR_TPU, devices=1, marker="TPU_OK")


# Compiled by the real TPU compiler (Mosaic for the kernel) for a 4-chip v5p slice that libtpu describes, data=4,
# bf16: PISA's 4096 + 4096 tokens at SD1.5's first level (head dim 40), forward and backward.
COMPILE_FOR_TPU = """
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
from jaxvc.models.attention import dot_product_attention
from jaxvc.parallel.mesh import make_mesh, activate
from jaxvc.plan.hardware import slice_devices
mesh = make_mesh({"data": 4}, devices=slice_devices("v5p:2x2x1").devices)
arg = jax.ShapeDtypeStruct((8, 8192, 8, 40), jnp.bfloat16, sharding=NamedSharding(mesh, PartitionSpec("data")))
temporaries = {}
for backend in ("xla", "splash"):
    loss = lambda q, k, v: jnp.sum(dot_product_attention(q, k, v, backend=backend).astype(jnp.float32))
    with activate(mesh):
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(arg, arg, arg).compile()
    text = compiled.as_text()
    assert ("tpu_custom_call" in text) == (backend == "splash"), backend
    temporaries[backend] = compiled.memory_analysis().temp_size_in_bytes
print(temporaries)
# per chip, 2 clips x 8 heads x 8192^2 scores: the einsum path's fp32 scores alone are 4 GiB
assert temporaries["xla"] > 4 * 2**30 and temporaries["splash"] < temporaries["xla"] / 16, temporaries
print("TPU_OK")
"""


def test_bench_lowers_for_tpu_with_the_kernel_and_refuses_it_elsewhere(tmp_path):
    import json

    from jaxvc.bench.cli import main

    # --lower-for tpu from this CPU host: bf16 by default, so the UNet's attention is "splash", and the PISA layers
    # become Mosaic kernels (not interpret mode: the host is a CPU, the lowering is for a TPU)
    assert main(["--size", "tiny", "--lower-for", "tpu", "--workloads", "train", "--out", str(tmp_path / "tpu")]) == 0
    record = json.loads((tmp_path / "tpu.json").read_text())
    (row,) = record["lowerings"]
    assert record["settings"]["attention"] == "splash" and row["ok"] and row["tpu_kernels"] > 0
    assert main(["--size", "tiny", "--lower-for", "tpu", "--workloads", "train", "--attention", "xla",
                 "--out", str(tmp_path / "xla")]) == 0
    assert json.loads((tmp_path / "xla.json").read_text())["lowerings"][0]["tpu_kernels"] == 0
    with pytest.raises(SystemExit, match="splash lowers for tpu only"):
        main(["--size", "tiny", "--lower-for", "cuda", "--attention", "splash"])
    with pytest.raises(SystemExit, match="--attention splash needs a TPU"):
        main(["--size", "tiny", "--attention", "splash", "--no-torch"])
