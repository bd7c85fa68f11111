"""PISA under sharding: the reference-injected UNet on 8 simulated CPU devices (batch over data x fsdp, the F+1
frames of the video axis over ``sequence``) equals one device, with the einsum attention and with the TPU flash
attention ("splash"). Runs in a subprocess: the device count must be set
before JAX initialises."""
import textwrap

from tests.multidevice import run_with_devices

SCRIPT = textwrap.dedent('''
    import dataclasses
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
    config = unet_config("tiny", motion="v3")
    boxed = abstract_variables(config)["params"]
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda leaf: np.asarray(0.1 * rng.standard_normal(leaf.shape), np.float32), nn.unbox(boxed))
    video = np.asarray(rng.standard_normal((4, 3, 8, 8, 4)), np.float32)      # (B, F, H, W, C): F+1 = 4 frames
    reference = np.asarray(rng.standard_normal((4, 1, 8, 8, 4)), np.float32)  # (B, 1, H, W, C)
    context = np.asarray(rng.standard_normal((4, 5, 32)), np.float32)
    timesteps = np.array([10, 300, 600, 999], np.float32)
    model = UNetMotion(config)

    def forward(params, video, reference, timesteps, context):
        return model.apply({"params": params}, video, timesteps, context, reference_latent=reference)

    args = (params, video, reference, timesteps, context)
    single = np.asarray(jax.jit(forward).lower(*args).compile(fast)(*args))
    assert single.shape == (4, 4, 8, 8, 4)

    # the sharded runs may use another attention backend than the single-device reference (xla)
    sharded_model = UNetMotion(dataclasses.replace(config, attention_backend="SHARDED_BACKEND"))

    def forward(params, video, reference, timesteps, context):
        return sharded_model.apply({"params": params}, video, timesteps, context, reference_latent=reference)

    for sizes in ({"data": 2, "fsdp": 2, "sequence": 2}, {"fsdp": 4, "tensor": 2}):
        mesh = make_mesh(sizes)
        with activate(mesh):
            shardings = param_shardings(boxed, mesh)
            batch = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
            inputs = [jax.device_put(params, shardings)] + [jax.device_put(x, batch)
                                                           for x in (video, reference, timesteps, context)]
            uses_kernel = "pallas_call" in str(jax.make_jaxpr(forward)(*inputs))
            assert uses_kernel == ("SHARDED_BACKEND" == "splash"), uses_kernel
            out = jax.jit(forward).lower(*inputs).compile(fast)(*inputs)
            assert not out.sharding.is_fully_replicated, out.sharding
            out = np.asarray(out)
        error = float(np.linalg.norm(out - single) / np.linalg.norm(single))
        print(f"PISA mesh {sizes}: relative error {error:.2e}")
        assert error < 1e-5, error
    print("SHARDED_OK")
''')


def test_reference_injected_unet_sharded_matches_single_device():
    run_with_devices(SCRIPT.replace("SHARDED_BACKEND", "xla"))


def test_splash_attention_unet_sharded_matches_the_einsum_unet_on_one_device():
    """The TPU flash-attention backend through the whole UNet (its 64 + 64 PISA tokens are one kernel block; the
    cross-attention and motion modules stay on einsums), in interpret mode, in a shard_map under both meshes: the
    same output as the einsum UNet on one device."""
    run_with_devices(SCRIPT.replace("SHARDED_BACKEND", "splash"))
