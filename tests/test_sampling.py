"""The sampling loop: one lax.scan compiled once, classifier-free guidance, per-step schedules, progress callback.

Proves: the whole loop traces to a single scan of num_steps iterations with the model traced once, and a jitted
generate function compiles once for new inputs; CFG with w=1 is exactly the conditional prediction and the single
batched [uncond; cond] call equals two separate calls combined; guidance_rescale equals diffusers'
``rescale_noise_cfg``; a per-step scalar (a LoRA-scale switch at step K) inside the scan equals a Python loop;
the host progress callback fires once per step, in order, also when the loop is sharded over 4 devices.
"""
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvc.diffusion.ddim import DDIMSampler
from jaxvc.diffusion.flow import FlowMatchEulerSampler
from jaxvc.diffusion.sampling import (cfg_combine, classifier_free_guidance, piecewise_constant, reference_guidance,
                                      sample, step_noise)
from jaxvc.diffusion.schedule import make_schedule
from tests.conftest import relative_error

SHAPE = (2, 3, 4, 4, 8)  # (B, F, H, W, C)
C = SHAPE[-1]
SCHEDULE = make_schedule()
RS = np.random.RandomState(0)
W_X = jnp.asarray(RS.randn(C, C).astype(np.float32) * 0.3)
W_CTX = jnp.asarray(RS.randn(5, C).astype(np.float32) * 0.5)
CTX_COND = jnp.asarray(RS.randn(SHAPE[0], 5).astype(np.float32))
CTX_UNCOND = jnp.zeros((SHAPE[0], 5), jnp.float32)


def net(x, t, ctx, scale=1.0):
    """A small per-example conditional 'model': channels mix + a context bias, scaled per step."""
    bias = (ctx @ W_CTX)[:, None, None, None, :]
    return jnp.tanh(x @ W_X * scale + bias + jnp.sin(jnp.asarray(t, jnp.float32) / 300.0))


def test_loop_is_one_scan_traced_once_and_compiled_once():
    sampler = DDIMSampler(SCHEDULE, 12, clip_sample=False)
    calls = []

    def denoise(x, t, i):
        calls.append(1)  # Python side effect: counts traces, not steps
        return net(x, t, CTX_COND)

    jaxpr = jax.make_jaxpr(lambda x: sample(denoise, x, sampler))(jnp.zeros(SHAPE))
    scans = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
    assert len(scans) == 1 and scans[0].params["length"] == 12
    assert len(calls) == 1

    calls.clear()
    generate = jax.jit(lambda x: sample(denoise, x, sampler))
    a = generate(jnp.asarray(RS.randn(*SHAPE), jnp.float32))
    b = generate(jnp.asarray(RS.randn(*SHAPE), jnp.float32))
    assert len(calls) == 1 and generate._cache_size() == 1
    assert not np.allclose(a, b)

    # And the scan equals the same steps run one by one in Python.
    x_T = jnp.asarray(RS.randn(*SHAPE), jnp.float32)
    x = x_T
    for i, t in enumerate(sampler.timesteps):
        x = sampler.step(net(x, t, CTX_COND), i, x).prev_sample
    assert relative_error(generate(x_T), x) < 1e-6


def test_cfg_scale_one_is_the_conditional_prediction():
    def model(x2, t, i):  # first half unconditional, second conditional
        return net(x2, t, jnp.concatenate([CTX_UNCOND, CTX_COND]))

    x = jnp.asarray(RS.randn(*SHAPE), jnp.float32)
    guided = classifier_free_guidance(model, 1.0)(x, jnp.int32(500), jnp.int32(0))
    # uncond + 1 * (cond - uncond) is cond up to one float32 rounding of the subtraction/addition.
    assert relative_error(guided, net(x, 500, CTX_COND)) < 1e-6
    assert relative_error(guided, net(x, 500, CTX_UNCOND)) > 0.1  # and the two halves really differ


def test_batched_cfg_equals_two_separate_calls():
    n_calls = []

    def model(x2, t, i):
        n_calls.append(x2.shape[0])
        return net(x2, t, jnp.concatenate([CTX_UNCOND, CTX_COND]))

    x = jnp.asarray(RS.randn(*SHAPE), jnp.float32)
    for scale in (7.5, 12.0):
        guided = jax.jit(classifier_free_guidance(model, scale))(x, jnp.int32(321), jnp.int32(3))
        cond, uncond = net(x, 321, CTX_COND), net(x, 321, CTX_UNCOND)
        assert relative_error(guided, uncond + scale * (cond - uncond)) < 1e-6
    assert n_calls == [2 * SHAPE[0]] * 2  # one model call per guided evaluation, on the doubled batch

    # Inside the full loop (flow sampler, float timesteps), against an explicit two-call Python loop.
    sampler = FlowMatchEulerSampler(6, shift=3.0)
    x_T = jnp.asarray(RS.randn(*SHAPE), jnp.float32)
    ours = jax.jit(lambda x0: sample(classifier_free_guidance(model, 5.0), x0, sampler))(x_T)
    x = x_T
    for i, t in enumerate(sampler.timesteps):
        cond, uncond = net(x, t, CTX_COND), net(x, t, CTX_UNCOND)
        x = sampler.step(uncond + 5.0 * (cond - uncond), i, x).prev_sample
    assert relative_error(ours, x) < 1e-5


def test_reference_guidance_separates_the_two_conditions():
    """Three thirds (uncond, text only, text + reference) in one call: uncond + s_t (text - uncond) +
    s_r (full - text); equal scales are plain CFG between uncond and full; a per-step reference scale switches."""
    ctx_text = jnp.asarray(RS.randn(SHAPE[0], 5).astype(np.float32))
    calls = []

    def model(x3, t, i):
        calls.append(x3.shape[0])
        return net(x3, t, jnp.concatenate([CTX_UNCOND, ctx_text, CTX_COND]))

    x = jnp.asarray(RS.randn(*SHAPE), jnp.float32)
    uncond, text, full = (net(x, 400, c) for c in (CTX_UNCOND, ctx_text, CTX_COND))
    guided = jax.jit(reference_guidance(model, 2.5, 6.0))(x, jnp.int32(400), jnp.int32(0))
    assert relative_error(guided, uncond + 2.5 * (text - uncond) + 6.0 * (full - text)) < 1e-6
    assert calls == [3 * SHAPE[0]]

    def two_branch(x2, t, i):
        return net(x2, t, jnp.concatenate([CTX_UNCOND, CTX_COND]))

    same = reference_guidance(model, 4.0, 4.0)(x, jnp.int32(400), jnp.int32(0))
    assert relative_error(same, classifier_free_guidance(two_branch, 4.0)(x, jnp.int32(400), jnp.int32(0))) < 1e-5
    switched = reference_guidance(model, 2.5, lambda i: piecewise_constant(i, [3], [2.5, 6.0]))
    assert relative_error(switched(x, jnp.int32(400), jnp.int32(2)), cfg_combine(full, uncond, 2.5)) < 1e-5
    assert relative_error(switched(x, jnp.int32(400), jnp.int32(3)), guided) < 1e-6


def test_guidance_rescale_matches_diffusers():
    torch = pytest.importorskip("torch")
    from diffusers.guiders.guider_utils import rescale_noise_cfg  # same function as the SD pipeline's

    cond = RS.randn(*SHAPE).astype(np.float32)
    uncond = RS.randn(*SHAPE).astype(np.float32)
    guided = uncond + 7.0 * (cond - uncond)
    expected = rescale_noise_cfg(torch.from_numpy(guided), torch.from_numpy(cond), guidance_rescale=0.7).numpy()
    assert relative_error(cfg_combine(cond, uncond, 7.0, guidance_rescale=0.7), expected) < 1e-6


def test_per_step_scalar_schedule_inside_scan():
    """CustomCrafter-style: a LoRA scale 0.4 for the first 5 of 12 steps, then 0.8, and a per-step guidance scale."""
    np.testing.assert_array_equal(piecewise_constant(jnp.arange(8), [2, 5], [1.0, 2.0, 3.0]),
                                  [1, 1, 2, 2, 2, 3, 3, 3])
    with pytest.raises(ValueError, match="len"):
        piecewise_constant(0, [5], [0.4])
    sampler = DDIMSampler(SCHEDULE, 12, clip_sample=False, set_alpha_to_one=False, steps_offset=1)

    def model(x2, t, i):
        lora_scale = piecewise_constant(i, [5], [0.4, 0.8])
        return net(x2, t, jnp.concatenate([CTX_UNCOND, CTX_COND]), scale=lora_scale)

    guidance = lambda i: 4.0 + 0.5 * i  # noqa: E731  (a scale that changes every step)
    x_T = jnp.asarray(RS.randn(*SHAPE), jnp.float32)
    ours = jax.jit(lambda x0: sample(classifier_free_guidance(model, guidance), x0, sampler))(x_T)
    x = x_T
    for i, t in enumerate(sampler.timesteps):
        s = 0.4 if i < 5 else 0.8
        cond, uncond = net(x, t, CTX_COND, s), net(x, t, CTX_UNCOND, s)
        x = sampler.step(uncond + (4.0 + 0.5 * i) * (cond - uncond), i, x).prev_sample
    assert relative_error(ours, x) < 1e-5


def test_progress_callback_fires_in_order_and_noise_is_reproducible(capsys):
    sampler = DDIMSampler(SCHEDULE, 7, eta=1.0, clip_sample=False)
    seen = []
    x_T = jnp.asarray(RS.randn(*SHAPE), jnp.float32)
    denoise = lambda x, t, i: net(x, t, CTX_COND)  # noqa: E731
    run = jax.jit(lambda x0, key: sample(denoise, x0, sampler, rng=key,
                                         progress=lambda i, n: seen.append((int(i), int(n)))))
    key = jax.random.key(0, impl="rbg")  # any key impl works; rbg compiles faster than threefry on CPU
    a = run(x_T, key)
    jax.effects_barrier()
    assert seen == [(i, 7) for i in range(7)]
    b = run(x_T, key)
    c = run(x_T, jax.random.key(1, impl="rbg"))
    np.testing.assert_array_equal(a, b)
    assert relative_error(c, a) > 1e-2

    # eta = 1 noise at step i is step_noise(key, i): replay the loop in Python.
    step = jax.jit(lambda x, t, i: sampler.step(net(x, t, CTX_COND), i, x, step_noise(key, i, SHAPE)).prev_sample)
    x = x_T
    for i, t in enumerate(sampler.timesteps):
        x = step(x, t, i)
    assert relative_error(a, x) < 1e-5

    # progress=True: a tqdm bar that completes inside jit.
    out, inter = jax.jit(lambda x0: sample(denoise, x0, DDIMSampler(SCHEDULE, 3), progress=True,
                                           return_intermediates=True))(x_T)
    jax.effects_barrier()
    assert "3/3" in capsys.readouterr().err
    assert inter["samples"].shape == (3,) + SHAPE and inter["pred_x0"].shape == (3,) + SHAPE
    np.testing.assert_array_equal(inter["samples"][-1], out)


def test_clear_errors():
    x = jnp.zeros(SHAPE)
    with pytest.raises(ValueError, match="rng"):
        sample(lambda x, t, i: x, x, DDIMSampler(SCHEDULE, 4, eta=1.0))
    with pytest.raises(ValueError, match="denoise_fn returned shape"):
        sample(lambda x, t, i: x[:1], x, DDIMSampler(SCHEDULE, 4))
    with pytest.raises(ValueError, match=r"\[uncond; cond\]"):
        classifier_free_guidance(lambda x2, t, i: x2[:2], 3.0)(x, 0, 0)


def test_progress_and_result_under_a_four_device_mesh():
    """Sharded over a 4-device mesh (batch on "data"): the progress callback still fires once per step (an
    ordered debug callback would be refused there) and the result equals the single-device loop (relative error;
    XLA vectorizes the per-shard elementwise math differently, ~1e-7)."""
    code = textwrap.dedent("""
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import NamedSharding, PartitionSpec as P
        from jaxvc.diffusion.ddim import DDIMSampler
        from jaxvc.diffusion.sampling import sample
        from jaxvc.diffusion.schedule import make_schedule
        sampler = DDIMSampler(make_schedule(), 6, eta=1.0, clip_sample=False)
        denoise = lambda x, t, i: jnp.tanh(0.3 * x + jnp.sin(t / 300.0))
        x_T = np.random.RandomState(0).randn(8, 4, 4, 3).astype(np.float32)
        key = jax.random.key(0, impl="rbg")
        seen = []
        run = jax.jit(lambda x, k: sample(denoise, x, sampler, rng=k, progress=lambda i, n: seen.append((i, n))))
        mesh = jax.make_mesh((4,), ("data",))
        sharded = run(jax.device_put(x_T, NamedSharding(mesh, P("data"))), key)
        jax.effects_barrier()
        single = run(jax.device_put(x_T, jax.devices()[0]), key)
        jax.effects_barrier()
        diff = np.asarray(sharded, np.float64) - np.asarray(single, np.float64)
        err = float(np.linalg.norm(diff) / np.linalg.norm(np.asarray(single, np.float64)))
        print("RESULT", len(sharded.sharding.device_set), seen == [(i, 6) for i in range(6)] * 2, err)
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(proc.stdout.strip())
    n_devices, in_order, err = proc.stdout.split("RESULT")[1].split()
    assert n_devices == "4" and in_order == "True" and float(err) < 1e-5, proc.stdout
