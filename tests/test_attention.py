"""The attention backend switch (jaxvc/models/attention.py): every backend computes the same attention, and "cudnn"
sends sequences shorter than one flash tile (the motion modules' frames), odd lengths (CLIP's 77 tokens, which
jax's differentiated cuDNN path refuses) and head dims over cuDNN's limit through the einsum path, so it never reaches
cuDNN there (which is why those cases run on a CPU)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvc.models.attention import CUDNN_MIN_KEYS, dot_product_attention
from tests.conftest import softmax_attention


def _qkv(queries, keys, heads=2, head_dim=8, seed=0):
    draws = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(draws[0], (3, queries, heads, head_dim)),
            jax.random.normal(draws[1], (3, keys, heads, head_dim)),
            jax.random.normal(draws[2], (3, keys, heads, head_dim)))


@pytest.mark.parametrize("backend", ["xla", "jax"])
@pytest.mark.parametrize("causal", [False, True])
def test_backends_compute_softmax_attention(backend, causal):
    query, key, value = _qkv(5, 7)
    out = dot_product_attention(query, key, value, backend=backend, causal=causal)
    np.testing.assert_allclose(out, softmax_attention(query, key, value, causal), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("queries, keys, head_dim", [
    (17, CUDNN_MIN_KEYS - 1, 8),  # a motion module over the frames
    (64, 77, 8),                  # cross-attention to CLIP's 77 tokens
    (64, 64, 160),                # SD1.5's deepest level: over the 128 that cuDNN takes without a Hopper GPU
])
def test_cudnn_backend_sends_short_or_odd_sequences_through_the_einsum_path(queries, keys, head_dim):
    query, key, value = _qkv(queries, keys, head_dim=head_dim)
    out = dot_product_attention(query, key, value, backend="cudnn")  # would need a GPU if it reached cuDNN
    np.testing.assert_array_equal(out, dot_product_attention(query, key, value, backend="xla"))
    jaxpr = str(jax.make_jaxpr(lambda q, k, v: dot_product_attention(q, k, v, backend="cudnn"))(query, key, value))
    assert "custom_call" not in jaxpr and "cudnn" not in jaxpr


def test_cudnn_head_dim_limit_follows_the_gpu_generation():
    """jax lets cuDNN take head dims up to 256 from Hopper (compute capability 9.0) on, 128 before, in multiples of
    8; the rule is asked for an assumed GPU as jaxvc/bench/cross_lower.py does."""
    from jaxvc.bench.cross_lower import assume_cuda_device
    from jaxvc.models.attention import _cudnn_takes, cudnn_max_head_dim

    with assume_cuda_device(compute_capability="8.0"):  # A100
        assert cudnn_max_head_dim() == 128
        assert _cudnn_takes(256, 256, 128) and not _cudnn_takes(256, 256, 160)
    with assume_cuda_device(compute_capability="9.0"):  # H100 / H200
        assert cudnn_max_head_dim() == 256
        assert _cudnn_takes(256, 256, 160) and not _cudnn_takes(256, 256, 264) and not _cudnn_takes(256, 256, 36)
    assert cudnn_max_head_dim() == 128  # this CPU host: no GPU to ask


def test_unknown_backend_is_a_clear_error():
    query, key, value = _qkv(2, 2)
    with pytest.raises(ValueError, match="attention backend 'flash' is not one of"):
        dot_product_attention(query, key, value, backend="flash")


@pytest.mark.parametrize("causal", [False, True])
def test_einsum_path_gradients_match_the_float64_formula(causal):
    # the einsum path normalizes after the value product and holds the row max out of the gradient; both must leave
    # the derivative of softmax attention unchanged
    query, key, value = _qkv(6, 9)
    cotangent = jax.random.normal(jax.random.key(7), query.shape)
    loss = lambda fn: (lambda q, k, v: jnp.sum(fn(q, k, v) * cotangent))
    grads = jax.grad(loss(lambda q, k, v: dot_product_attention(q, k, v, backend="xla", causal=causal)),
                     argnums=(0, 1, 2))(query, key, value)
    with jax.enable_x64(True):
        exact = jax.grad(loss(lambda q, k, v: softmax_attention(q, k, v, causal, xp=jnp)), argnums=(0, 1, 2))(
            *(jnp.asarray(np.asarray(t), jnp.float64) for t in (query, key, value)))
        for name, got, want in zip("qkv", grads, exact):
            np.testing.assert_allclose(got, np.asarray(want), rtol=1e-4, atol=1e-5, err_msg=f"d loss / d {name}")


def test_einsum_path_in_bfloat16_stays_close_to_the_formula():
    query, key, value = (t.astype(jnp.bfloat16) for t in _qkv(33, 40))
    out = dot_product_attention(query, key, value, backend="xla")
    assert out.dtype == jnp.bfloat16
    # against the float64 formula on the same (rounded) inputs: the scaled queries, the weights fed to the value
    # product and the output are each rounded to bf16 (2^-8 relative), so two output ulps bound the error
    expected = softmax_attention(*(np.asarray(t, np.float32) for t in (query, key, value)))
    np.testing.assert_allclose(np.asarray(out, np.float32), expected, atol=2 * 2.0 ** -8 * np.abs(expected).max())
