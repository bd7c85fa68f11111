"""UNetMotion under sharding: 8 simulated CPU devices, parameters sharded by the logical-axis rule table.

The check runs in a subprocess because the device count (``XLA_FLAGS=--xla_force_host_platform_device_count=8``)
must be set before JAX initialises, and the pytest process may already have JAX running with one device.
"""
import textwrap

from tests.multidevice import run_with_devices

SCRIPT = textwrap.dedent('''
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np
    from flax import linen as nn
    from jax.sharding import NamedSharding, PartitionSpec
    jax.config.update("jax_default_matmul_precision", "highest")
    from jaxvc.convert.unet import abstract_variables
    from jaxvc.models.unet import UNetMotion, unet_config
    from jaxvc.parallel.mesh import activate, make_mesh
    from jaxvc.parallel.rules import param_shardings

    assert jax.device_count() == 8, jax.devices()
    fast = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
    config = unet_config("tiny", motion="v2")
    boxed = abstract_variables(config)["params"]
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda leaf: np.asarray(0.1 * rng.standard_normal(leaf.shape), np.float32), nn.unbox(boxed))
    sample = np.asarray(rng.standard_normal((8, 4, 8, 8, 4)), np.float32)   # (B, F, H, W, C)
    context = np.asarray(rng.standard_normal((8, 5, 32)), np.float32)
    timesteps = np.arange(8, dtype=np.float32) * 100
    model = UNetMotion(config)

    def forward(params, sample, timesteps, context):
        return model.apply({"params": params}, sample, timesteps, context)

    args = (params, sample, timesteps, context)
    single = np.asarray(jax.jit(forward).lower(*args).compile(fast)(*args))

    for sizes in ({"fsdp": 8}, {"data": 2, "fsdp": 2, "tensor": 2}):
        mesh = make_mesh(sizes)
        with activate(mesh):
            shardings = param_shardings(boxed, mesh)
            sharded_params = jax.device_put(params, shardings)
            batch = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
            inputs = [jax.device_put(x, batch) for x in (sample, timesteps, context)]
            split = [s.spec for s in jax.tree.leaves(shardings) if any(p is not None for p in s.spec)]
            assert len(split) > 20, f"too few parameters sharded: {len(split)}"
            kernel = sharded_params["up_blocks_1"]["resnets_0"]["conv1"]["kernel"]
            assert len(kernel.addressable_shards) == 8 and kernel.addressable_shards[0].data.size < kernel.size
            out = jax.jit(forward).lower(sharded_params, *inputs).compile(fast)(sharded_params, *inputs)
            assert not out.sharding.is_fully_replicated, out.sharding
            out = np.asarray(out)
        error = float(np.linalg.norm(out - single) / np.linalg.norm(single))
        print(f"mesh {sizes}: {len(split)} sharded parameters, output {out.shape}, relative error {error:.2e}")
        assert error < 1e-5, error
        np.testing.assert_allclose(out, single, rtol=1e-5, atol=1e-5)
    print("SHARDED_OK")
''')


def test_sharded_forward_matches_single_device():
    run_with_devices(SCRIPT)
