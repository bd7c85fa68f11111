"""The ``splash`` attention backend: flash attention on TPUs through Pallas's splash-attention kernel.

Why: the einsum path writes out every attention score. At SD1.5 size (16 x 512², PISA over 4096 own + 4096
reference tokens) that is what makes one clip per chip need about 68 GiB of temporaries on a TPU (README, "Planning a
TPU pod run"), too much for a 32 GiB v6e or a 16 GiB v5e. The kernel keeps the scores in VMEM, one block at a time.

* Layout: the models' (B, L, H, D) is turned into the kernel's (H, L, D) per example, and the kernel is vmapped over B.
  The scale goes on the queries (the kernel does not scale).
* Sharding: Mosaic kernels cannot be partitioned by XLA, so under a mesh (``jaxvc.parallel.mesh.activate``) the
  call runs in a ``shard_map``. Batch and heads are split the way the rule table splits the logical axes "batch" and
  "heads"; an axis whose size the mesh does not divide stays whole. The queries are split as the rule table splits
  "tokens" (axes batch and heads do not use), the keys and values are gathered whole: each device attends its
  share of the queries to every key (sequence parallelism; the inference layout's ``sequence`` x ``fsdp``).
* Platform: the kernel is compiled by Mosaic for a TPU, including an abstract one (``jaxvc plan`` on a CPU host
  compiles it for the slice's chips). Anywhere else it runs in Pallas's interpret mode, which computes the same
  blocked algorithm with ordinary ops: slow, and there only to check it (tests).
* What it takes (``splash_takes``): query and key lengths that are multiples of 128, the kernel's lane width, or
  (without a causal mask) any lengths once one of them reaches ``PAD_FROM``: those are padded to the kernel's
  multiple and the padding is kept out of the softmax by segment ids (Wan's 81 x 480 x 832 video is 32,760 tokens;
  its score matrix on the einsum path is what keeps a 14 B DiT off 16 GiB chips). Short odd lengths go through the
  einsum path, where padding would cost more than it saves: the cross-attention to CLIP's 77 tokens, the motion
  modules' 16-32 frames, and the 4x4 deepest level of a 256 px UNet (16 tokens + 16 reference tokens).
"""
from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import PartitionSpec

LANES = 128  # the kernel's block sizes are multiples of this
MAX_BLOCK = 512
PAD_FROM = 1024  # a length at least this long is padded to the kernel's multiple (at most 1/8 more work)


def splash_takes(query_length: int, key_length: int, causal: bool = False) -> bool:
    """Whether the ``splash`` backend runs this attention on the kernel (else the einsum path)."""
    if query_length % LANES == 0 and key_length % LANES == 0:
        return True
    return not causal and max(query_length, key_length) >= PAD_FROM


def _block(length: int) -> int:
    """The largest of 512, 256, 128 that divides ``length`` (a multiple of 128)."""
    return next(size for size in (MAX_BLOCK, 256, LANES) if length % size == 0)


_ASSUMED_PLATFORM: list[str] = []


@contextlib.contextmanager
def assume_platform(platform: str):
    """Trace for ``platform`` whatever this host is: lowering for a TPU from a CPU host with no mesh of TPU devices
    (``python -m jaxvc.bench --lower-for tpu``) must emit the Mosaic kernel, not interpret mode."""
    _ASSUMED_PLATFORM.append(platform)
    try:
        yield
    finally:
        _ASSUMED_PLATFORM.pop()


def target_platform() -> str:
    """The platform the current trace is for: an ``assume_platform``, else the context mesh's devices (an abstract
    TPU slice when planning on a CPU host), else JAX's default backend."""
    if _ASSUMED_PLATFORM:
        return _ASSUMED_PLATFORM[-1]
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    return getattr(device, "platform", None) or jax.default_backend()


def _kernel(heads: int, query_length: int, key_length: int, causal: bool, interpret: bool):
    """The kernel for one device's heads. Built anew in every trace, not cached: it holds its mask tables as arrays,
    which would leak from one trace into the next."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    shape = (query_length, key_length)
    # a causal mask aligned bottom-right, as the einsum path aligns it: query i sees keys <= i + (Lk - Lq)
    one = masks.CausalMask(shape, offset=key_length - query_length) if causal else masks.FullMask(shape)
    block_q, block_kv = _block(query_length), _block(key_length)
    sizes = splash.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv, block_q_dkv=block_q,
                              block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv, block_q_dq=block_q,
                              block_kv_dq=block_kv)
    return splash.make_splash_mha(masks.MultiHeadMask([one] * heads), block_sizes=sizes, head_shards=1,
                                  q_seq_shards=1, interpret=interpret)


def _local_attention(query, key, value, *, causal: bool, interpret: bool):
    """One device's share: (b, Lq, h, D) x (b, Lk, h, D) -> (b, Lq, h, D), scale already on the queries. Lengths that
    are not multiples of LANES are padded here, on the device (padding a sharded axis outside would gather it), and
    segment ids keep the padding out of the real tokens' softmax: real tokens are segment 0, padded keys 1, padded
    queries 1 when there are padded keys (a query row needs one key of its segment)."""
    from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel import SegmentIds

    lq, lk = query.shape[1], key.shape[1]
    pad_q, pad_k = -lq % LANES, -lk % LANES
    padded = lambda t, pad: jnp.pad(t, ((0, 0), (0, pad), (0, 0), (0, 0))) if pad else t  # noqa: E731
    query, key, value = padded(query, pad_q), padded(key, pad_k), padded(value, pad_k)  # (b, L + pad, h, D)
    heads_first = lambda t: jnp.transpose(t, (0, 2, 1, 3))  # (b, L, h, D) <-> (b, h, L, D)
    kernel = _kernel(query.shape[2], query.shape[1], key.shape[1], causal, interpret)
    if pad_q or pad_k:
        segments = SegmentIds(jnp.where(jnp.arange(lq + pad_q) < lq, 0, 1 if pad_k else 0).astype(jnp.int32),
                              (jnp.arange(lk + pad_k) >= lk).astype(jnp.int32))
        kernel = functools.partial(kernel, segment_ids=segments)
    return heads_first(jax.vmap(kernel)(heads_first(query), heads_first(key), heads_first(value)))[:, :lq]


def batch_heads_spec(shape: tuple[int, ...], mesh) -> PartitionSpec:
    """(B, L, H, D) split as the rule table splits ("batch", -, "heads", -), where the mesh divides the size (the
    mesh's ``sequence`` axis never: it is the ring backend's, ``jaxvc/models/context_parallel.py``)."""
    spec = nn.logical_to_mesh_axes(("batch", None, "heads", None))
    parts = []
    for size, axes in zip(shape, tuple(spec) + (None,) * (4 - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        names = tuple(name for name in names if name in mesh.shape and name != "sequence")
        ways = int(np.prod([mesh.shape[name] for name in names])) if names else 1
        parts.append(names if names and size % ways == 0 else None)
    return PartitionSpec(*parts)


def query_token_axes(spec: PartitionSpec, mesh) -> tuple[str, ...]:
    """The mesh axes the rule table gives the logical "tokens", less those ``spec`` (batch, heads) already uses."""
    used = {name for part in spec if part for name in ((part,) if isinstance(part, str) else part)}
    axes = nn.logical_to_mesh_axes(("tokens",))[0]
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return tuple(name for name in names if name in mesh.shape and mesh.shape[name] > 1 and name not in used)


def splash_attention(query, key, value, *, scale: float, causal: bool = False):
    """Flash attention on the TPU kernel. query (B, Lq, H, D), key/value (B, Lk, H, D) -> (B, Lq, H, D); the lengths
    must satisfy ``splash_takes``."""
    lq, lk = query.shape[1], key.shape[1]
    if not splash_takes(lq, lk, causal):
        raise ValueError(f"splash attention: lengths {lq} x {lk} are not multiples of {LANES}"
                         + (" (a causal mask is not padded)" if causal else f" and both are under {PAD_FROM}"))
    query = (query.astype(jnp.float32) * scale).astype(query.dtype)
    local = functools.partial(_local_attention, causal=causal, interpret=target_platform() != "tpu")
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return local(query, key, value)
    query_spec, key_spec = batch_heads_spec(query.shape, mesh), batch_heads_spec(key.shape, mesh)
    # query and key/value must be split alike: keep an axis split only where both shapes allow it
    spec = PartitionSpec(*(q if q == k else None for q, k in zip(query_spec, key_spec)))
    # the queries also over the token axes (keys and values whole), where every device gets an equal share and no
    # causal mask would need each share's offset
    token_axes = () if causal else query_token_axes(spec, mesh)
    shards = int(np.prod([mesh.shape[name] for name in token_axes])) if token_axes else 1
    if lq % shards or lq // shards < LANES:
        token_axes = ()
    query_spec = PartitionSpec(spec[0], token_axes or None, spec[2], None)
    return jax.shard_map(local, mesh=mesh, in_specs=(query_spec, spec, spec), out_specs=query_spec,
                         check_vma=False)(query, key, value)
