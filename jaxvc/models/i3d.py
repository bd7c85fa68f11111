"""Inflated Inception-v1 (I3D, Carreira & Zisserman 2017), the video network behind FVD and KVD.

A Flax port of piergiaj's ``pytorch_i3d.InceptionI3d`` as shipped by TATS and cd-fvd
(``cdfvd/third_party/i3d/pytorch_i3d.py``), the module TATS's ``i3d_pretrained_400.pt`` state dict loads into.
Its numerics are copied on purpose, including its quirks:

- every convolution has TF-"same" padding computed from the input size (``compute_pad``): total padding
  ``max(k - s, 0)`` when the size divides by the stride, else ``max(k - size % s, 0)``, the smaller half in front;
- max pools pad with *zeros* (``F.pad``) before pooling, not with -inf (all their inputs are post-ReLU, >= 0);
- BatchNorm runs in eval mode with the running statistics and ``eps = 1e-5`` (TATS/cd-fvd/CustomCrafter's copy;
  piergiaj's original file says 1e-3, hence the ``epsilon`` field);
- the head is AvgPool3d([2, 7, 7], stride 1, no padding) -> dropout (identity in eval) -> a 1x1x1 conv with bias
  and no BN -> squeeze H, W -> mean over the remaining time steps: logits (B, num_classes), FVD's features.

Layout is channels last: videos (B, T, H, W, C), kernels (kt, kh, kw, in, out). Module names equal the torch
attribute names (``Conv3d_1a_7x7/conv3d``, ``Mixed_3b/b1a/bn``, ``logits/conv3d``) so that
``jaxvc.convert.torch_to_flax.fill_params`` maps the checkpoint keys mechanically (``jaxvc/convert/i3d.py``).
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxvc.models.layers import Conv, EvalBatchNorm

Dtype = Any

# The time axis is halved (rounding up) three times: Conv3d_1a (stride 2), MaxPool3d_4a (stride 2) and
# MaxPool3d_5a (stride 2), so the pre-pool map has ceil(T / 8) steps; the [2, 7, 7] average pool needs >= 2 of them.
MIN_FRAMES = 9
# H and W are halved five times (Conv3d_1a, MaxPool3d_2a, 3a, 4a, 5a): ceil(size / 32) must equal the pool's 7, so
# that the logits squeeze to (B, classes) as in torch. preprocess (jaxvc/eval/fvd.py) resizes frames to 224.
POOL_SIZE = 7
MIN_FRAME_SIZE, MAX_FRAME_SIZE = 32 * (POOL_SIZE - 1) + 1, 32 * POOL_SIZE  # 193, 224

# After the stem, in network order: Inception blocks (name, branch widths (b0, b1a, b1b, b2a, b2b, b3b)) and
# max pools (name, kernel, strides); Mixed_5c's output has 384 + 384 + 128 + 128 = 1024 channels.
INCEPTION_LAYOUT = (
    ("Mixed_3b", (64, 96, 128, 16, 32, 32)),
    ("Mixed_3c", (128, 128, 192, 32, 96, 64)),
    ("MaxPool3d_4a_3x3", (3, 3, 3), (2, 2, 2)),
    ("Mixed_4b", (192, 96, 208, 16, 48, 64)),
    ("Mixed_4c", (160, 112, 224, 24, 64, 64)),
    ("Mixed_4d", (128, 128, 256, 24, 64, 64)),
    ("Mixed_4e", (112, 144, 288, 32, 64, 64)),
    ("Mixed_4f", (256, 160, 320, 32, 128, 128)),
    ("MaxPool3d_5a_2x2", (2, 2, 2), (2, 2, 2)),
    ("Mixed_5b", (256, 160, 320, 32, 128, 128)),
    ("Mixed_5c", (384, 192, 384, 48, 128, 128)),
)


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """(front, back) padding of one axis, piergiaj's ``compute_pad``: TF's "same" (output ceil(size / stride))."""
    total = max(kernel - stride, 0) if size % stride == 0 else max(kernel - size % stride, 0)
    return total // 2, total - total // 2


def max_pool_same(x: jax.Array, kernel: Sequence[int], strides: Sequence[int]) -> jax.Array:
    """``MaxPool3dSamePadding``: zero padding (as ``F.pad``), then a VALID max pool. x (B, T, H, W, C)."""
    padding = [(0, 0)] + [same_padding(size, k, s) for size, k, s in zip(x.shape[1:4], kernel, strides)] + [(0, 0)]
    x = jnp.pad(x, padding)
    return jax.lax.reduce_window(x, jnp.array(-jnp.inf, x.dtype), jax.lax.max, (1, *kernel, 1), (1, *strides, 1),
                                 "VALID")


class Unit3D(nn.Module):
    """Conv3d ("same" padding from the input size) -> BatchNorm (eval) -> ReLU, as piergiaj's ``Unit3D``."""
    features: int
    kernel_shape: Sequence[int] = (1, 1, 1)
    strides: Sequence[int] = (1, 1, 1)
    use_batch_norm: bool = True
    use_bias: bool = False
    use_activation: bool = True
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        # x (B, T, H, W, C_in) -> (B, ceil(T / st), ceil(H / sh), ceil(W / sw), features)
        padding = [same_padding(size, k, s) for size, k, s in zip(x.shape[1:4], self.kernel_shape, self.strides)]
        x = Conv(self.features, tuple(self.kernel_shape), tuple(self.strides), padding, use_bias=self.use_bias,
                 dtype=self.dtype, param_dtype=self.param_dtype, name="conv3d")(x)
        if self.use_batch_norm:
            x = EvalBatchNorm(self.epsilon, self.param_dtype, name="bn")(x)
        return nn.relu(x) if self.use_activation else x


class InceptionModule(nn.Module):
    """Four branches concatenated on channels: 1x1; 1x1 -> 3x3x3; 1x1 -> 3x3x3; 3x3x3 max pool -> 1x1.
    ``branch_features`` = (b0, b1a, b1b, b2a, b2b, b3b) output widths; output width b0 + b1b + b2b + b3b."""
    branch_features: Sequence[int]
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        def unit(index, kernel, name):
            return Unit3D(self.branch_features[index], kernel, epsilon=self.epsilon, dtype=self.dtype,
                          param_dtype=self.param_dtype, name=name)

        point, cube = (1, 1, 1), (3, 3, 3)
        b0 = unit(0, point, "b0")(x)
        b1 = unit(2, cube, "b1b")(unit(1, point, "b1a")(x))
        b2 = unit(4, cube, "b2b")(unit(3, point, "b2a")(x))
        b3 = unit(5, point, "b3b")(max_pool_same(x, cube, (1, 1, 1)))  # torch's b3a has no parameters
        return jnp.concatenate([b0, b1, b2, b3], axis=-1)


def check_video_shape(shape: Sequence[int], what: str = "I3D input") -> None:
    """Raise ValueError unless ``shape`` is (B, T, H, W, C) with T >= 9 and 193 <= H, W <= 224."""
    if len(shape) != 5:
        raise ValueError(f"{what}: expected videos (batch, frames, height, width, channels), got shape {tuple(shape)}")
    frames, height, width = shape[1:4]
    if frames < MIN_FRAMES:
        raise ValueError(f"{what}: {frames} frames; I3D needs at least {MIN_FRAMES} (its time axis shrinks 8x "
                         "before a 2-step average pool), got shape " f"{tuple(shape)}")
    if not (MIN_FRAME_SIZE <= height <= MAX_FRAME_SIZE and MIN_FRAME_SIZE <= width <= MAX_FRAME_SIZE):
        raise ValueError(f"{what}: frames of {height}x{width}; I3D needs {MIN_FRAME_SIZE}..{MAX_FRAME_SIZE} pixels "
                         f"per side (a {POOL_SIZE}x{POOL_SIZE} map before its average pool; FVD resizes to 224), "
                         f"got shape {tuple(shape)}")


class InceptionI3d(nn.Module):
    """I3D: videos (B, T, H, W, C) in [-1, 1] (T >= 9, H and W in 193..224) -> logits (B, num_classes).

    ``return_endpoints=True`` also returns ``{name: activation}``: every torch endpoint up to ``Mixed_5c`` (its
    output is torch's ``return_pre_pool``), ``avg_pool`` (B, T', 1, 1, 1024) and ``logits_per_step`` (B, T', classes),
    the values before the mean over time."""
    num_classes: int = 400
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, videos, return_endpoints: bool = False):
        check_video_shape(videos.shape)
        common = dict(epsilon=self.epsilon, dtype=self.dtype, param_dtype=self.param_dtype)
        endpoints = {}
        x = videos.astype(self.dtype)
        # stem: (B, T, 224, 224, 3) -> Conv3d_1a (B, T/2, 112, 112, 64) -> MaxPool3d_2a (B, T/2, 56, 56, 64)
        x = endpoints["Conv3d_1a_7x7"] = Unit3D(64, (7, 7, 7), (2, 2, 2), name="Conv3d_1a_7x7", **common)(x)
        x = endpoints["MaxPool3d_2a_3x3"] = max_pool_same(x, (1, 3, 3), (1, 2, 2))
        x = endpoints["Conv3d_2b_1x1"] = Unit3D(64, (1, 1, 1), name="Conv3d_2b_1x1", **common)(x)
        x = endpoints["Conv3d_2c_3x3"] = Unit3D(192, (3, 3, 3), name="Conv3d_2c_3x3", **common)(x)
        # -> (B, T/2, 28, 28, 192)
        x = endpoints["MaxPool3d_3a_3x3"] = max_pool_same(x, (1, 3, 3), (1, 2, 2))
        # Inception blocks; pools 4a and 5a halve T, H, W: Mixed_5c is (B, ceil(T/8), 7, 7, 1024)
        for name, *spec in INCEPTION_LAYOUT:
            if name.startswith("MaxPool"):
                x = max_pool_same(x, *spec)
            else:
                x = InceptionModule(spec[0], name=name, **common)(x)
            endpoints[name] = x
        # head: AvgPool3d([2, 7, 7], stride 1, VALID) -> (B, ceil(T/8) - 1, 1, 1, 1024); dropout is the identity
        window = (2, POOL_SIZE, POOL_SIZE)
        summed = jax.lax.reduce_window(x.astype(jnp.float32), jnp.float32(0), jax.lax.add, (1, *window, 1),
                                       (1, 1, 1, 1, 1), "VALID")
        x = endpoints["avg_pool"] = (summed / (window[0] * window[1] * window[2])).astype(self.dtype)
        x = Unit3D(self.num_classes, (1, 1, 1), use_batch_norm=False, use_bias=True, use_activation=False,
                   name="logits", **common)(x)
        per_step = endpoints["logits_per_step"] = x[:, :, 0, 0, :].astype(jnp.float32)  # (B, T', classes)
        logits = per_step.mean(axis=1)  # (B, classes)
        return (logits, endpoints) if return_endpoints else logits


def abstract_i3d_params(num_classes: int = 400, epsilon: float = 1e-5) -> dict:
    """The (boxed) shape tree of ``InceptionI3d(...).init``'s ``params``, without running it."""
    model = InceptionI3d(num_classes, epsilon)
    videos = jax.ShapeDtypeStruct((1, MIN_FRAMES, MAX_FRAME_SIZE, MAX_FRAME_SIZE, 3), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), videos)["params"]
