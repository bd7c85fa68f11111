"""The ``ring`` attention backend: context parallelism over the mesh's ``sequence`` axis (ring attention).

Why: under a ``sequence`` mesh axis the tokens of a long video (the Wan DiT's 21 x 30 x 45 = 28,350 latent tokens at
81 x 480 x 720) are split over n devices, but plain attention needs every key for every query, so XLA gathers the
whole key/value sequence on each device and writes scores for (L / n) x L pairs there. The ring keeps each device's
key/value block local and passes the blocks around the ring instead: at step s a device attends its queries to the
block of device (i - s) mod n while the next block is sent on (``ppermute``). Per step it holds (L / n) x (L / n)
scores, and the blocks' results are merged with the online softmax (running max, running sum, rescaled output), in
float32. The result equals plain attention's up to float rounding.

* Layout (B, L, H, D), as every backend; batch and heads are split the way the rule table splits "batch" and
  "heads" (``jaxvc.models.tpu_attention.batch_heads_spec``), the sequence over ``sequence``.
* Causal masks are aligned bottom-right as the einsum path aligns them, from the blocks' global positions;
  ``key_mask`` (B, Lk) travels with its key block. Every query must keep one key, as for every backend.
* Memory: the steps are a ``lax.scan`` (one after another) and each is rematerialized (``jax.checkpoint``), so the
  forward and the backward pass hold one block of scores at a time, not n of them; ``ppermute``'s transpose is the
  reverse permutation. At L = 8192 (1 x 8192 x 2 heads x 16) over 8 devices XLA:CPU plans 16.7 MiB of temporaries
  for the forward pass and 34.8 MiB for the gradients, against 129 and 258 MiB with the einsum path, which gathers
  the keys (``tests/test_context_parallel.py``).
* What it takes (``ring_takes``): a mesh whose ``sequence`` axis has n > 1 devices and query and key lengths
  divisible by n. Anything else (no mesh, cross-attention to 77 CLIP tokens over 2 devices, ...) goes through the
  einsum path, which XLA partitions as it sees fit.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

AXIS = "sequence"


def sequence_ways() -> int:
    """The size of the current mesh's ``sequence`` axis (1 without a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty else int(dict(mesh.shape).get(AXIS, 1))


def ring_takes(query_length: int, key_length: int) -> bool:
    """Whether the ``ring`` backend runs this attention on the ring (else the einsum path)."""
    ways = sequence_ways()
    return ways > 1 and query_length % ways == 0 and key_length % ways == 0


def _block_update(carry, key, value, allowed, query):
    """One key/value block into the running (output, max, sum): query (b, cq, h, D) scaled, key/value (b, ck, h, D),
    allowed (b, 1 or h, cq, ck) bool; output (b, cq, h, D) float32, max and sum (b, h, cq) float32."""
    out, running_max, running_sum = carry
    logits = jnp.einsum("bqhd,bkhd->bhqk", query, key, preferred_element_type=jnp.float32)
    logits = jnp.where(allowed, logits, jnp.finfo(jnp.float32).min)
    # the max only shifts the exponents: the result does not depend on it, so no gradient flows through it
    new_max = jax.lax.stop_gradient(jnp.maximum(running_max, logits.max(axis=-1)))
    correction = jnp.exp(running_max - new_max)  # (b, h, cq): rescales what the earlier blocks added
    weights = jnp.exp(logits - new_max[..., None])  # (b, h, cq, ck)
    running_sum = running_sum * correction + weights.sum(axis=-1)
    block = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(value.dtype), value, preferred_element_type=jnp.float32)
    out = out * jnp.transpose(correction, (0, 2, 1))[..., None] + block
    return out, new_max, running_sum


def _ring_local(query, key, value, key_mask, *, ways: int, causal: bool, offset: int):
    """One device's share: query (b, cq, h, D) (scaled), key/value (b, ck, h, D), key_mask (b, ck) -> (b, cq, h, D).
    ``offset`` = Lk - Lq of the whole sequences (the causal mask's bottom-right alignment)."""
    index = jax.lax.axis_index(AXIS)
    batch, chunk_q, heads, _ = query.shape
    chunk_k = key.shape[1]
    to_next = [(device, (device + 1) % ways) for device in range(ways)]

    @jax.checkpoint  # the backward pass recomputes one block's scores at a time instead of keeping all n
    def attend(stats, step, key, value, key_mask):
        allowed = key_mask[:, None, None, :]  # (b, 1, 1, ck)
        if causal:
            source = (index - step) % ways  # whose block this is
            query_positions = index * chunk_q + jnp.arange(chunk_q)
            key_positions = source * chunk_k + jnp.arange(chunk_k)
            allowed = allowed & (key_positions[None, :] <= query_positions[:, None] + offset)[None, None]
        return _block_update(stats, key, value, allowed, query)

    def step_and_pass(carry, step):
        stats, blocks = carry
        stats = attend(stats, step, *blocks)
        return (stats, tuple(jax.lax.ppermute(t, AXIS, to_next) for t in blocks)), None

    stats = (jnp.zeros(query.shape, jnp.float32), jnp.full((batch, heads, chunk_q), jnp.finfo(jnp.float32).min),
             jnp.zeros((batch, heads, chunk_q), jnp.float32))
    # a scan, not an unrolled loop: the steps run one after another, so one block of scores is alive at a time
    (stats, blocks), _ = jax.lax.scan(step_and_pass, (stats, (key, value, key_mask)), jnp.arange(ways - 1))
    out, _, total = attend(stats, ways - 1, *blocks)  # the last block is not passed on
    return (out / jnp.transpose(total, (0, 2, 1))[..., None]).astype(value.dtype)


def ring_attention(query, key, value, *, scale: float, causal: bool = False, key_mask=None):
    """Attention with the sequence split over the mesh's ``sequence`` axis. query (B, Lq, H, D), key/value
    (B, Lk, H, D) -> (B, Lq, H, D); the lengths must satisfy ``ring_takes``. ``key_mask`` (B, Lk) bool or None."""
    from jaxvc.models.tpu_attention import batch_heads_spec

    ways = sequence_ways()
    if not ring_takes(query.shape[1], key.shape[1]):
        raise ValueError(f"ring attention: lengths {query.shape[1]} x {key.shape[1]} over a sequence axis of {ways} "
                         "devices (needs > 1 devices, dividing both lengths)")
    mesh = jax.sharding.get_abstract_mesh()
    query = (query.astype(jnp.float32) * scale).astype(query.dtype)
    if key_mask is None:
        key_mask = jnp.ones(key.shape[:2], bool)
    # batch and heads split as the rule table says, where both shapes allow it; the sequence over the ring
    query_spec, key_spec = batch_heads_spec(query.shape, mesh), batch_heads_spec(key.shape, mesh)
    batch, _, heads, _ = (q if q == k else None for q, k in zip(query_spec, key_spec))
    spec = PartitionSpec(batch, AXIS, heads, None)
    local = functools.partial(_ring_local, ways=ways, causal=causal, offset=key.shape[1] - query.shape[1])
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, PartitionSpec(batch, AXIS)), out_specs=spec,
                         check_vma=False)(query, key, value, key_mask)
