"""C3D (Tran et al. 2015) fine-tuned on UCF-101: the network behind the video Inception Score on UCF-101.

A Flax port of TGANv2's ``C3DVersion1`` (chainer; ``tgan2/models/c3d/c3d_ucf101.py``), the model that loads
``conv3d_deepnetA_ucf.npz`` (the Caffe C3D ``c3d_ucf101_finetune_whole_iter_20000`` converted to chainer). The
video Inception Score of TGAN/TGANv2, MoCoGAN, StyleGAN-V, Make-A-Video and MicroCinema (UCF-101 IS) is computed
with it. Its numerics, as chainer runs them:

- eight 3x3x3 convolutions (stride 1, padding 1, bias) each followed by ReLU; no normalization layers;
- ``pool1`` is a (1, 2, 2) max pool, ``pool2``..``pool5`` are 2x2x2; all with stride = kernel and chainer's
  default ``cover_all=True``: the output has ceil((n - k) / s) + 1 steps, a window hanging over the end covering
  what is left (pool5 turns 7 x 7 into 4 x 4, hence fc6's 512 * 4 * 4 inputs);
- fc6 (8192 -> 4096) and fc7 (4096 -> 4096) with ReLU and dropout (the identity when evaluating), fc8 (4096 -> 101);
- chainer's ``Linear`` flattens the (B, C, T, H, W) map in that order: this port, channels last, moves the channels
  to the front before flattening, so that fc6's weights are used as stored.

The input is 16 BGR frames of 112 x 112 with the training mean already subtracted (values about -128..128; see
``jaxvc/eval/inception_score.py``): (B, 16, 112, 112, 3) channels last. Kernels are (kt, kh, kw, in, out); module
names equal chainer's link names (``conv1a``, ``fc6``) so ``jaxvc/convert/c3d.py`` maps the file's keys mechanically.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxvc.models.layers import Conv, Dense

Dtype = Any

NUM_CLASSES = 101  # UCF-101
CLIP_FRAMES, CROP_SIZE = 16, 112  # the only input size fc6's 512 x 1 x 4 x 4 inputs allow

# (name, output channels) of the convolutions, and after which of them a max pool (kernel = stride) comes
CONV_LAYOUT = (("conv1a", 64), ("conv2a", 128), ("conv3a", 256), ("conv3b", 256), ("conv4a", 512), ("conv4b", 512),
               ("conv5a", 512), ("conv5b", 512))
POOLS = {"conv1a": ("pool1", (1, 2, 2)), "conv2a": ("pool2", (2, 2, 2)), "conv3b": ("pool3", (2, 2, 2)),
         "conv4b": ("pool4", (2, 2, 2)), "conv5b": ("pool5", (2, 2, 2))}


def max_pool_cover_all(x: jax.Array, window: Sequence[int]) -> jax.Array:
    """chainer's ``max_pooling_nd(x, ksize=window)`` (stride = window, no padding, ``cover_all=True``) for
    x (B, T, H, W, C): each axis of n steps gives ceil((n - k) / k) + 1, the last window clipped at the end."""
    padding = [(0, 0)]
    for size, k in zip(x.shape[1:4], window):
        steps = -(-(size - k) // k) + 1
        padding.append((0, (steps - 1) * k + k - size))
    padding.append((0, 0))
    return jax.lax.reduce_window(x, jnp.array(-jnp.inf, x.dtype), jax.lax.max, (1, *window, 1), (1, *window, 1),
                                 padding)


def check_clip_shape(shape: Sequence[int], what: str = "C3D input") -> None:
    """Raise ValueError unless ``shape`` is (B, 16, 112, 112, 3)."""
    if len(shape) != 5 or tuple(shape[1:]) != (CLIP_FRAMES, CROP_SIZE, CROP_SIZE, 3):
        raise ValueError(f"{what}: expected clips (batch, {CLIP_FRAMES}, {CROP_SIZE}, {CROP_SIZE}, 3) (C3D's fc6 "
                         f"takes exactly a 512 x 1 x 4 x 4 map), got shape {tuple(shape)}")


class C3D(nn.Module):
    """C3D: mean-subtracted BGR clips (B, 16, 112, 112, 3) -> fc8 logits (B, num_classes).

    ``return_endpoints=True`` also returns ``{name: activation}`` for every chainer layer name up to ``fc8``
    (``conv1a`` .. ``pool5``, ``fc6``, ``fc7``: the ReLU outputs; ``fc7`` is the 4096-d feature)."""
    num_classes: int = NUM_CLASSES
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, clips, return_endpoints: bool = False):
        check_clip_shape(clips.shape)
        endpoints = {}
        x = clips.astype(self.dtype)
        # (B, 16, 112, 112, 3) -> pool1 (B, 16, 56, 56, 64) -> pool2 (B, 8, 28, 28, 128) -> pool3 (B, 4, 14, 14,
        # 256) -> pool4 (B, 2, 7, 7, 512) -> pool5 (B, 1, 4, 4, 512)
        for name, features in CONV_LAYOUT:
            x = Conv(features, (3, 3, 3), 1, 1, dtype=self.dtype, param_dtype=self.param_dtype, name=name)(x)
            x = endpoints[name] = nn.relu(x)
            if name in POOLS:
                pool, window = POOLS[name]
                x = endpoints[pool] = max_pool_cover_all(x, window)
        x = jnp.transpose(x, (0, 4, 1, 2, 3)).reshape(x.shape[0], -1)  # chainer's (C, T, H, W) order: (B, 8192)
        for name, features in (("fc6", 4096), ("fc7", 4096)):
            x = endpoints[name] = nn.relu(Dense(features, dtype=self.dtype, param_dtype=self.param_dtype,
                                                name=name)(x))  # dropout: the identity when evaluating
        logits = Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name="fc8")(x)
        logits = logits.astype(jnp.float32)
        return (logits, endpoints) if return_endpoints else logits


def abstract_c3d_params(num_classes: int = NUM_CLASSES) -> dict:
    """The (boxed) shape tree of ``C3D(num_classes).init``'s ``params``, without running it."""
    clips = jax.ShapeDtypeStruct((1, CLIP_FRAMES, CROP_SIZE, CROP_SIZE, 3), jnp.float32)
    return jax.eval_shape(C3D(num_classes).init, jax.random.key(0), clips)["params"]
