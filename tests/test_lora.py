"""Adapters (jaxvc/models/lora.py) on the tiny UNet: what each placement computes, that a wrong tree fails loudly,
that remat does not change their gradients, and that merging equals applying. (Parity with peft / diffusers LoRA
files is tests/test_lora_parity.py.)"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvc.models import lora
from jaxvc.models.unet import UNetMotion, unet_config
from tests.conftest import random_unet_variables

CONFIG = unet_config("tiny", "v3")
SAMPLE = jax.random.normal(jax.random.key(0), (2, 3, 8, 8, 4))
TIMESTEPS = jnp.array([10, 800])
CONTEXT = jax.random.normal(jax.random.key(1), (2, 5, 32))


def forward(variables, adapters=(), config=CONFIG):
    with lora.applied(adapters):
        return UNetMotion(config).apply(variables, SAMPLE, TIMESTEPS, CONTEXT)


def sites(spec, config=CONFIG):
    return lora.find_sites(lambda: UNetMotion(config).init(jax.random.key(0), SAMPLE, TIMESTEPS, CONTEXT), spec)


def random_tree(site_map, spec, seed=0):
    tree = lora.init_adapter(jax.random.key(seed), site_map, spec)
    return jax.tree.map(lambda x: 0.1 * jax.random.normal(jax.random.key(seed + 1), x.shape), tree)


@pytest.fixture(scope="module")
def variables():
    return random_unet_variables(CONFIG, seed=3)


def test_output_adapter_adds_a_low_rank_map_of_the_output(variables):
    spec = lora.AdapterSpec(include=("conv_out",), rank=2, alpha=4.0, placement="output")
    found = sites(spec)
    assert list(found) == [("conv_out",)] and found[("conv_out",)].in_features == 4
    tree = random_tree(found, spec)
    base = forward(variables)
    adapted = forward(variables, [lora.AppliedAdapter(spec, tree, 0.5)])
    pair = tree["conv_out"]
    want = base + 0.5 * 2.0 * (base @ pair["down"]) @ pair["up"]
    np.testing.assert_allclose(np.asarray(adapted), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_input_adapter_equals_its_merge_and_scale_zero_is_the_base(variables):
    spec = lora.AdapterSpec(include=(r".*attn1/to_[qv]", r".*resnets_0/conv1", "conv_in"), rank=3, alpha=6.0)
    found = sites(spec)
    assert any(site.window == (3, 3) for site in found.values())  # conv sites: the conv path is covered
    adapter = lora.AppliedAdapter(spec, random_tree(found, spec), 0.7)
    merged = {"params": lora.merge(variables["params"], adapter)}
    applied = forward(variables, [adapter])
    assert float(jnp.max(jnp.abs(applied - forward(variables)))) > 1e-3
    np.testing.assert_allclose(np.asarray(applied), np.asarray(forward(merged)), rtol=2e-5, atol=2e-5)
    np.testing.assert_array_equal(np.asarray(forward(variables, [dataclasses.replace(adapter, scale=0.0)])),
                                  np.asarray(forward(variables)))
    with pytest.raises(ValueError, match="only input"):
        lora.merge(variables["params"], lora.AppliedAdapter(dataclasses.replace(spec, placement="output"),
                                                            adapter.tree))


def test_dropout_drops_the_adapter_input_in_training_only(variables):
    """``AdapterSpec.dropout`` (peft's lora_dropout): with a dropout_rng, y = W x + s * B A (dropout(x)), each
    element of the adapter's input zeroed at the rate with its own site mask (``dropout_keep``) and the rest scaled by
    1 / (1 - rate), the layer's own input untouched; without a rng (inference) the plain adapter."""
    from flax import linen as nn

    from jaxvc.models.layers import Dense

    class Projection(nn.Module):
        @nn.compact
        def __call__(self, x):
            return Dense(6, name="proj")(x)

    x = jax.random.normal(jax.random.key(0), (3, 5, 8))
    weights = Projection().init(jax.random.key(1), x)
    spec = lora.AdapterSpec(include=("proj",), rank=2, alpha=3.0, dropout=0.25)
    tree = {"proj": {"down": jax.random.normal(jax.random.key(2), (8, 2)),
                     "up": jax.random.normal(jax.random.key(3), (2, 6))}}
    rng = jax.random.key(7)

    def run(adapter):
        with lora.applied([adapter]):
            return Projection().apply(weights, x)
    base = Projection().apply(weights, x)
    keep = lora.dropout_keep(rng, ("proj",), x.shape, 0.25)
    assert abs(float(jnp.mean(keep)) - 0.75) < 0.1
    expected = base + 1.5 * (jnp.where(keep, x / 0.75, 0.0) @ tree["proj"]["down"]) @ tree["proj"]["up"]
    np.testing.assert_allclose(np.asarray(run(lora.AppliedAdapter(spec, tree, dropout_rng=rng))),
                               np.asarray(expected), rtol=1e-5, atol=1e-5)
    plain = base + 1.5 * (x @ tree["proj"]["down"]) @ tree["proj"]["up"]
    np.testing.assert_allclose(np.asarray(run(lora.AppliedAdapter(spec, tree))), np.asarray(plain), rtol=1e-5,
                               atol=1e-5)
    assert float(jnp.max(jnp.abs(expected - plain))) > 1e-2
    # other sites draw other masks
    assert not np.array_equal(np.asarray(keep), np.asarray(lora.dropout_keep(rng, ("other",), x.shape, 0.25)))
    with pytest.raises(ValueError, match="adapter dropout 1.0"):
        lora.AdapterSpec(include=(".*",), dropout=1.0)
    with pytest.raises(ValueError, match="on an input"):
        lora.AdapterSpec(include=(".*",), dropout=0.1, placement="output")


def test_fresh_adapter_is_the_identity_and_inits_follow_peft(variables):
    spec = lora.AdapterSpec(include=(r".*to_k",), rank=4, down_init="gaussian")
    found = sites(spec)
    tree = lora.init_adapter(jax.random.key(0), found, spec)
    np.testing.assert_array_equal(np.asarray(forward(variables, [lora.AppliedAdapter(spec, tree)])),
                                  np.asarray(forward(variables)))
    downs = np.concatenate([np.ravel(pair["down"]) for pair in lora.adapter_sites(tree).values()])
    assert abs(downs.std() - 1 / 4) < 0.02  # gaussian: std 1 / rank
    kaiming = lora.init_adapter(jax.random.key(0), found, dataclasses.replace(spec, down_init="kaiming"))
    for path, pair in lora.adapter_sites(kaiming).items():
        bound = 1 / np.sqrt(found[path].in_features)  # kaiming_uniform(a=sqrt 5): U(-1/sqrt(fan_in), +)
        assert np.abs(pair["down"]).max() <= bound and np.abs(pair["down"]).max() > 0.8 * bound


def test_a_wrong_tree_or_spec_fails_loudly(variables):
    spec = lora.AdapterSpec(include=(r".*to_k",), rank=2)
    tree = random_tree(sites(spec), spec)
    tree["down_blocks_7"] = tree.pop(next(iter(tree)))  # a site the model does not have
    with pytest.raises(ValueError, match="not reached"):
        forward(variables, [lora.AppliedAdapter(spec, tree)])
    with pytest.raises(ValueError, match="matches no Dense/Conv"):
        sites(lora.AdapterSpec(include=("no_such_layer",)))
    with pytest.raises(ValueError, match="placement"):
        lora.AdapterSpec(include=(".*",), placement="middle")
    with pytest.raises(ValueError, match="rank"):
        lora.AdapterSpec(include=(".*",), rank=0)


def test_remat_does_not_change_adapter_gradients(variables):
    spec = lora.AdapterSpec(include=(r".*motion_modules_\d+/transformer_blocks_\d+/attn1/to_[qkv]",), rank=2)
    tree = random_tree(sites(spec), spec)

    def loss(tree, config):
        return jnp.mean(forward(variables, [lora.AppliedAdapter(spec, tree)], config) ** 2)

    plain = jax.jit(jax.grad(lambda t: loss(t, CONFIG)))(tree)
    remat = jax.jit(jax.grad(lambda t: loss(t, dataclasses.replace(CONFIG, remat="full"))))(tree)
    assert float(sum(jnp.sum(jnp.abs(g)) for g in jax.tree.leaves(plain))) > 0
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(remat)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)
