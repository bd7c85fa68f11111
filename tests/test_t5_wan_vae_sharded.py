"""The T5/UMT5 text encoder and the Wan video VAE under sharding: 8 simulated CPU devices, parameters sharded by the
logical-axis rule table, inputs split over the batch axes. Under ``activate(mesh, rules)`` the outputs equal the
single-device ones, and the lowered programs hold the models' activation constraints (``constrain`` at block
boundaries: none without a mesh, several with one), so removing them fails here.

Each check runs in a subprocess (``tests/multidevice.run_with_devices``): the device count must be fixed before JAX
initialises."""
import textwrap

from tests.multidevice import run_with_devices

COMMON = '''
    import jax, jax.numpy as jnp, numpy as np
    from flax import linen as nn
    from jax.sharding import NamedSharding, PartitionSpec
    jax.config.update("jax_default_matmul_precision", "highest")
    from jaxvc.parallel.mesh import activate, make_mesh
    from jaxvc.parallel.rules import param_shardings

    assert jax.device_count() == 8, jax.devices()
    fast = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
    rng = np.random.default_rng(0)

    def random_params(boxed, std):
        """Normal(0, std) weights; norm scales (gamma, scale) 1 + Normal(0, 0.1) so the norms stay O(1)."""
        def one(path, leaf):
            noise = rng.standard_normal(leaf.shape)
            name = jax.tree_util.keystr(path)
            return np.asarray(1 + 0.1 * noise if ("gamma" in name or "scale" in name) else std * noise, np.float32)
        return jax.tree_util.tree_map_with_path(one, nn.unbox(boxed))

    def constraints(fn, *args):
        return jax.jit(fn).lower(*args).as_text().count("sharding_constraint")

    def sharded_run(fn, boxed, params, *inputs):
        """fn(params, *inputs) jitted on the mesh: params by the rule table, inputs over (data, fsdp)."""
        shardings = param_shardings(boxed, mesh)
        split = [s for s in jax.tree.leaves(shardings) if any(p is not None for p in s.spec)]
        assert len(split) > 5, f"too few parameters sharded: {len(split)}"
        sharded_params = jax.device_put(params, shardings)
        batch = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
        inputs = [jax.device_put(x, batch) for x in inputs]
        count = constraints(fn, sharded_params, *inputs)
        out = jax.jit(fn).lower(sharded_params, *inputs).compile(fast)(sharded_params, *inputs)
        return out, count, len(split)

    def check_equal(what, ours, reference):
        for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(reference)):
            assert a.shape == b.shape, (what, a.shape, b.shape)
            error = float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
            print(f"{what}: {a.shape} max abs difference {error:.2e} (reference max abs "
                  f"{float(np.max(np.abs(np.asarray(b)))):.2f})")
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5, err_msg=what)
'''

T5_SCRIPT = textwrap.dedent(COMMON + '''
    from jaxvc.models.t5_encoder import T5_VARIANTS, T5Encoder, T5EncoderConfig, abstract_t5_params

    config = T5EncoderConfig(**T5_VARIANTS["tiny"])  # d_model 32, 4 heads of 8, d_ff 48, 2 blocks (UMT5)
    boxed = abstract_t5_params(config)["params"]
    params = random_params(boxed, 0.2)
    ids = rng.integers(2, config.vocab_size, (8, 12)).astype(np.int32)   # (B, L)
    mask = np.ones((8, 12), np.int32)
    mask[1, 7:] = mask[5, 3:] = 0   # padded prompts
    fn = lambda p, i, m: T5Encoder(config).apply({"params": p}, i, m)   # -> (B, L, d_model)

    single = jax.jit(fn).lower(params, ids, mask).compile(fast)(params, ids, mask)
    assert constraints(fn, params, ids, mask) == 0   # constrain is a no-op without a mesh
    # data x fsdp x tensor; and a sequence axis, which splits the tokens
    for sizes in ({"data": 2, "fsdp": 2, "tensor": 2}, {"data": 2, "fsdp": 2, "sequence": 2}):
        mesh = make_mesh(sizes)
        with activate(mesh):
            out, count, split = sharded_run(fn, boxed, params, ids, mask)
        print(f"mesh {sizes}: {split} sharded parameters, {count} activation constraints")
        assert count >= config.num_layers + 1, count   # after the embedding and after every block
        assert not out.sharding.is_fully_replicated, out.sharding
        check_equal(f"t5 {sizes}", out, single)
    print("SHARDED_OK")
''')

WAN_VAE_SCRIPT = textwrap.dedent(COMMON + '''
    from jaxvc.models.wan_vae import AutoencoderKLWan, WanVAEConfig, abstract_wan_vae_params, decode_wan, encode_wan

    config = WanVAEConfig.variant("tiny")   # 3 levels (4x spatial, 4x temporal), z 4
    vae = AutoencoderKLWan(config)
    boxed = abstract_wan_vae_params(config)["params"]
    params = random_params(boxed, 0.15)
    video = rng.uniform(-1, 1, (8, 9, 8, 8, 3)).astype(np.float32)   # (B, 1 + 4k, H, W, 3) -> latents (8, 3, 2, 2, 4)
    # chunked: frame 0, then a lax.scan over 4-frame chunks (encode) / 1-latent-frame chunks (decode), so the causal
    # caches are carried through the scan under the mesh
    encode = lambda p, v: encode_wan(vae, {"params": p}, v, chunk_frames=4)   # -> (mean, logvar)
    decode = lambda p, z: decode_wan(vae, {"params": p}, z, chunk_frames=1)   # -> video

    single_moments = jax.jit(encode).lower(params, video).compile(fast)(params, video)
    latents = np.asarray(single_moments[0])
    single_video = jax.jit(decode).lower(params, latents).compile(fast)(params, latents)
    assert np.mean(np.abs(np.asarray(single_video)) < 0.999) > 0.5   # mostly inside the clamp: the network is seen
    assert constraints(encode, params, video) == constraints(decode, params, latents) == 0
    # data x fsdp x tensor; and a sequence axis, which splits the frames (1 on the first chunk: an uneven split)
    for sizes in ({"data": 2, "fsdp": 2, "tensor": 2}, {"data": 2, "fsdp": 2, "sequence": 2}):
        mesh = make_mesh(sizes)
        with activate(mesh):
            moments, encode_count, split = sharded_run(encode, boxed, params, video)
            recon, decode_count, _ = sharded_run(decode, boxed, params, latents)
        print(f"mesh {sizes}: {split} sharded parameters, {encode_count} + {decode_count} activation constraints")
        assert encode_count >= 10 and decode_count >= 10, (encode_count, decode_count)
        check_equal(f"wan vae encode {sizes}", moments, single_moments)
        check_equal(f"wan vae decode {sizes}", recon, single_video)
    print("SHARDED_OK")
''')


def test_t5_encoder_sharded_matches_single_device_and_is_constrained():
    run_with_devices(T5_SCRIPT)


def test_wan_vae_sharded_encode_decode_match_single_device_and_are_constrained():
    run_with_devices(WAN_VAE_SCRIPT)
