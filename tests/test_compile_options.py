"""jaxvc's per-backend XLA compile defaults (jaxvc/compile_options.py): what is added, what overrides it, what is
dropped, and that the programs it compiles compute the same numbers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvc import compile_options
from jaxvc.models.attention import dot_product_attention
from tests.conftest import softmax_attention

YNN = "xla_cpu_experimental_ynn_fusion_type"


@pytest.fixture(autouse=True)
def fresh_probe():
    compile_options.platform_defaults.cache_clear()
    yield
    compile_options.platform_defaults.cache_clear()


def test_cpu_defaults_are_added_and_user_options_win():
    merged = compile_options.merged(platform="cpu")
    if compile_options.jaxlib_version().startswith("0.10."):  # the pinned jaxlib, which the default was measured on
        assert merged == {YNN: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
    user = {YNN: "LIBRARY_FUSION_TYPE_DOT", "xla_backend_optimization_level": 0}
    assert compile_options.merged(user, platform="cpu") == user
    assert compile_options.merged(platform="tpu") is None  # no defaults there (nor a TPU here to probe)


def test_defaults_apply_to_the_jaxlib_versions_they_were_measured_on(monkeypatch):
    # jaxlib 0.11 and 0.12 fuse better on their own: the option made the tiny UNet forward slower there
    monkeypatch.setattr(compile_options, "jaxlib_version", lambda: "0.12.0.1")
    assert compile_options.merged(platform="cpu") is None
    compile_options.platform_defaults.cache_clear()
    monkeypatch.setitem(compile_options.DEFAULTS, "cpu", [(("0.12.",), {YNN: "LIBRARY_FUSION_TYPE_DOT"})])
    assert compile_options.merged(platform="cpu") == {YNN: "LIBRARY_FUSION_TYPE_DOT"}


def test_options_this_jaxlib_rejects_are_dropped(monkeypatch):
    any_version = ("",)
    monkeypatch.setitem(compile_options.DEFAULTS, "cpu", [(any_version, {"xla_cpu_no_such_option_anywhere": True,
                                                                         YNN: "NOT_A_FUSION_TYPE"})])
    assert compile_options.merged(platform="cpu") is None
    assert compile_options.merged({"xla_backend_optimization_level": 0}, platform="cpu") == {
        "xla_backend_optimization_level": 0}


def test_defaults_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("JAXVC_XLA_DEFAULTS", "0")
    assert compile_options.merged(platform="cpu") is None


def test_attention_compiled_with_the_defaults_matches_the_plain_compile():
    # the softmax around the dots is what the default takes away from YNNPACK: same numbers either way
    keys = jax.random.split(jax.random.key(0), 3)
    query, key, value = (jax.random.normal(k, (2, 96, 4, 8), jnp.float32) for k in keys)
    attend = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, backend="xla"))
    plain = attend.lower(query, key, value).compile()(query, key, value)
    options = compile_options.merged(platform="cpu")
    tuned = attend.lower(query, key, value).compile(options)(query, key, value)
    np.testing.assert_allclose(np.asarray(tuned), np.asarray(plain), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(tuned), softmax_attention(query, key, value), rtol=1e-5, atol=1e-5)


def test_jit_compiles_with_the_defaults(monkeypatch):
    options = compile_options.merged()  # probed (with a jit of its own) before jax.jit is watched
    seen = []
    real_jit = jax.jit
    monkeypatch.setattr(jax, "jit", lambda fn, **kwargs: seen.append(kwargs) or real_jit(fn, **kwargs))
    double = compile_options.jit(lambda x: 2 * x)
    np.testing.assert_array_equal(double(jnp.arange(3.0)), [0.0, 2.0, 4.0])
    assert seen == ([{"compiler_options": options}] if options else [{}])
