"""WanTransformer3D under sharding: 8 simulated CPU devices, parameters sharded by the logical-axis rule table, the
token axis split over ``sequence``. The forward pass and the parameter gradients equal the single-device ones."""
import textwrap

from tests.multidevice import run_with_devices

SCRIPT = textwrap.dedent('''
    import jax, jax.numpy as jnp, numpy as np
    from flax import linen as nn
    from jax.sharding import NamedSharding, PartitionSpec
    jax.config.update("jax_default_matmul_precision", "highest")
    from jaxvc.models.wan import WanTransformer3D, abstract_wan_params, wan_config
    from jaxvc.parallel.mesh import activate, make_mesh
    from jaxvc.parallel.rules import param_shardings

    assert jax.device_count() == 8, jax.devices()
    fast = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
    config = wan_config("tiny", num_attention_heads=4, attention_head_dim=6, ffn_dim=32)
    boxed = abstract_wan_params(config)["params"]
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda leaf: np.asarray(0.1 * rng.standard_normal(leaf.shape), np.float32), nn.unbox(boxed))
    latents = np.asarray(rng.standard_normal((8, 2, 4, 8, 4)), np.float32)   # (B, F, H, W, C): 16 tokens
    text = np.asarray(rng.standard_normal((8, 5, 32)), np.float32)
    timesteps = np.linspace(1.0, 999.0, 8, dtype=np.float32)
    model = WanTransformer3D(config)

    def loss_and_grad(params, latents, timesteps, text):
        def loss(params):
            out = model.apply({"params": params}, latents, timesteps, text)
            return jnp.mean(jnp.square(out - latents)), out
        (value, out), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return value, out, grads

    args = (params, latents, timesteps, text)
    single = jax.jit(loss_and_grad).lower(*args).compile(fast)(*args)

    for sizes in ({"fsdp": 8}, {"data": 2, "tensor": 2, "sequence": 2}):
        mesh = make_mesh(sizes)
        with activate(mesh):
            shardings = param_shardings(boxed, mesh)
            sharded_params = jax.device_put(params, shardings)
            batch = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
            inputs = [jax.device_put(x, batch) for x in (latents, timesteps, text)]
            split = [s.spec for s in jax.tree.leaves(shardings) if any(p is not None for p in s.spec)]
            assert len(split) > 20, f"too few parameters sharded: {len(split)}"
            result = jax.jit(loss_and_grad).lower(sharded_params, *inputs).compile(fast)(sharded_params, *inputs)
            kernel = sharded_params["blocks_1"]["attn1"]["to_q"]["kernel"]
            assert kernel.addressable_shards[0].data.size < kernel.size, kernel.sharding
        for name, ours, reference in zip(("loss", "output", "gradients"), result, single):
            ours, reference = jax.tree.leaves(ours), jax.tree.leaves(reference)
            error = max(float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / (np.linalg.norm(np.asarray(b)) + 1e-30))
                        for a, b in zip(ours, reference))
            print(f"mesh {sizes}: {name} relative error {error:.2e} ({len(split)} sharded parameters)")
            assert error < 1e-5, (name, error)
    print("SHARDED_OK")
''')


def test_sharded_forward_and_gradients_match_single_device():
    run_with_devices(SCRIPT)
