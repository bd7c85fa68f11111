"""RAFT optical flow (Teed & Deng, ECCV 2020) in Flax, channels last: the network of princeton-vl/RAFT's ``core/``
(the code VBench ships and the dynamic-degree metric runs, with ``raft-things.pth``), in its two sizes.

One forward pass, for two images (N, H, W, 3) in [0, 255] with H and W multiples of 8 (``pad_to_multiple_of_8``):

1. ``fnet`` encodes both images to 1/8 resolution (instance norm); ``cnet`` encodes the first (batch norm, eval
   statistics) into the GRU's initial hidden state (tanh) and its context input (relu);
2. the all-pairs correlation of the two feature maps, ``<f1(i, j), f2(k, l)> / sqrt(D)``, is pooled into a 4-level
   pyramid over (k, l);
3. ``iters`` times: look the correlation up in a (2r + 1)^2 window around where each pixel's flow now points (every
   level), encode it with the flow, update the GRU and add its flow delta (a ``flax.linen.scan``: one compiled body);
4. the final 1/8 flow goes to full resolution by the learned convex upsampling (large) or bilinearly (small).

Names follow the torch modules (``fnet/layer2_0/conv1``, ``update_block/gru/convz1``), so the checkpoint maps onto
the parameters mechanically (``jaxvc.convert.raft``). Evaluation only: dropout and batch-norm updates are absent.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jaxvc.models.layers import Conv, EvalBatchNorm
from jaxvc.models.resample import pad_to_multiple


@dataclasses.dataclass(frozen=True)
class RAFTConfig:
    small: bool = False
    iters: int = 20  # refinement steps; the dynamic-degree metric (VBench and Tao Wu's code) uses 20
    corr_levels: int = 4

    @property
    def hidden_dim(self) -> int:
        return 96 if self.small else 128

    @property
    def context_dim(self) -> int:
        return 64 if self.small else 128

    @property
    def corr_radius(self) -> int:
        return 3 if self.small else 4


VARIANTS = {"large": RAFTConfig(), "small": RAFTConfig(small=True)}


class InstanceNorm(nn.Module):
    """torch's InstanceNorm2d (no affine, no running statistics): per image and channel over (H, W), eps 1e-5."""

    @nn.compact
    def __call__(self, x):
        mean = x.mean(axis=(1, 2), keepdims=True)
        var = jnp.square(x - mean).mean(axis=(1, 2), keepdims=True)
        return (x - mean) * jax.lax.rsqrt(var + 1e-5)


def make_norm(norm_fn: str, name: str):
    if norm_fn == "instance":
        return InstanceNorm(name=name)
    if norm_fn == "batch":
        return EvalBatchNorm(name=name)
    if norm_fn == "none":
        return lambda x: x
    raise ValueError(f"RAFT norm '{norm_fn}': expected 'instance', 'batch' or 'none' (the released models' norms)")


class ResidualBlock(nn.Module):
    """Two 3x3 convs; a strided block shortcuts through a 1x1 conv + norm (torch's ``downsample.0``/``.1``)."""
    planes: int
    norm_fn: str
    stride: int = 1

    @nn.compact
    def __call__(self, x):
        y = nn.relu(make_norm(self.norm_fn, "norm1")(Conv(self.planes, (3, 3), self.stride, 1, name="conv1")(x)))
        y = nn.relu(make_norm(self.norm_fn, "norm2")(Conv(self.planes, (3, 3), 1, 1, name="conv2")(y)))
        if self.stride != 1:
            x = make_norm(self.norm_fn, "downsample_1")(Conv(self.planes, (1, 1), self.stride, 0,
                                                             name="downsample_0")(x))
        return nn.relu(x + y)


class BottleneckBlock(nn.Module):
    """The small encoder's block: 1x1 down to planes / 4, strided 3x3, 1x1 up; same shortcut as ResidualBlock."""
    planes: int
    norm_fn: str
    stride: int = 1

    @nn.compact
    def __call__(self, x):
        y = nn.relu(make_norm(self.norm_fn, "norm1")(Conv(self.planes // 4, (1, 1), 1, 0, name="conv1")(x)))
        y = nn.relu(make_norm(self.norm_fn, "norm2")(Conv(self.planes // 4, (3, 3), self.stride, 1,
                                                          name="conv2")(y)))
        y = nn.relu(make_norm(self.norm_fn, "norm3")(Conv(self.planes, (1, 1), 1, 0, name="conv3")(y)))
        if self.stride != 1:
            x = make_norm(self.norm_fn, "downsample_1")(Conv(self.planes, (1, 1), self.stride, 0,
                                                             name="downsample_0")(x))
        return nn.relu(x + y)


class Encoder(nn.Module):
    """``BasicEncoder`` (large: 64 -> 64, 96, 128 channels, residual blocks) or ``SmallEncoder`` (32 -> 32, 64, 96,
    bottlenecks): a 7x7 stride-2 stem and three stages of two blocks (strides 1, 2, 2): (N, H, W, 3) ->
    (N, H/8, W/8, output_dim)."""
    output_dim: int
    norm_fn: str
    small: bool = False

    @nn.compact
    def __call__(self, x):
        widths, block = ((32, 64, 96), BottleneckBlock) if self.small else ((64, 96, 128), ResidualBlock)
        x = Conv(widths[0], (7, 7), 2, 3, name="conv1")(x)
        x = nn.relu(make_norm(self.norm_fn, "norm1")(x))
        for stage, (width, stride) in enumerate(zip(widths, (1, 2, 2)), start=1):
            x = block(width, self.norm_fn, stride, name=f"layer{stage}_0")(x)
            x = block(width, self.norm_fn, 1, name=f"layer{stage}_1")(x)
        return Conv(self.output_dim, (1, 1), 1, 0, name="conv2")(x)


def correlation_pyramid(fmap1, fmap2, levels: int) -> tuple[jax.Array, ...]:
    """All-pairs correlation (N, h, w, D) x (N, h, w, D) -> per level (N*h*w, h / 2^l, w / 2^l): torch's
    ``CorrBlock`` (its 2x2 average pools drop an odd last row/column, as avg_pool2d does)."""
    n, h, w, d = fmap1.shape
    corr = jnp.einsum("nijd,nkld->nijkl", fmap1, fmap2) / jnp.sqrt(jnp.float32(d))
    corr = corr.reshape(n * h * w, h, w)
    pyramid = [corr]
    for _ in range(levels - 1):
        rows, cols = corr.shape[1] // 2, corr.shape[2] // 2
        corr = corr[:, :2 * rows, :2 * cols].reshape(-1, rows, 2, cols, 2).mean(axis=(2, 4))
        pyramid.append(corr)
    return tuple(pyramid)


def bilinear_lookup(image, x, y):
    """``F.grid_sample(image, grid, align_corners=True)`` at pixel coordinates, zeros outside: image (M, H, W),
    x and y (M, K) -> (M, K)."""
    _, height, width = image.shape
    # torch normalizes to [-1, 1] and back; doing the same keeps the rounding of the sample positions identical
    x = (2 * x / (width - 1) - 1 + 1) * ((width - 1) / 2)
    y = (2 * y / (height - 1) - 1 + 1) * ((height - 1) / 2)
    x0, y0 = jnp.floor(x), jnp.floor(y)
    flat = image.reshape(image.shape[0], height * width)
    out = 0.0
    for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):
        cx, cy = x0 + dx, y0 + dy
        weight = (1 - jnp.abs(x - cx)) * (1 - jnp.abs(y - cy))
        inside = (cx >= 0) & (cx <= width - 1) & (cy >= 0) & (cy <= height - 1)
        index = (jnp.clip(cy, 0, height - 1) * width + jnp.clip(cx, 0, width - 1)).astype(jnp.int32)
        out = out + jnp.where(inside, jnp.take_along_axis(flat, index, axis=1) * weight, 0.0)
    return out


def lookup_correlation(pyramid, coords, radius: int):
    """The correlation around where each pixel's flow points: coords (N, h, w, 2) as (x, y) -> (N, h, w,
    levels * (2r + 1)^2). Window entry (a, b) samples x + a - r, y + b - r (torch's meshgrid order), flattened a
    major."""
    n, h, w, _ = coords.shape
    offsets = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    x_offsets, y_offsets = jnp.meshgrid(offsets, offsets, indexing="ij")  # (K, K): x varies along a, y along b
    out = []
    for level, corr in enumerate(pyramid):
        centre = coords.reshape(n * h * w, 1, 1, 2) / 2 ** level
        x = (centre[..., 0] + x_offsets).reshape(n * h * w, -1)  # (N*h*w, K*K)
        y = (centre[..., 1] + y_offsets).reshape(n * h * w, -1)
        out.append(bilinear_lookup(corr, x, y).reshape(n, h, w, -1))
    return jnp.concatenate(out, axis=-1)


def coordinate_grid(n: int, h: int, w: int):
    """(N, h, w, 2) pixel coordinates, channel 0 = x (column), 1 = y (row)."""
    ys, xs = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij")
    return jnp.broadcast_to(jnp.stack([xs, ys], axis=-1), (n, h, w, 2))


class MotionEncoder(nn.Module):
    """Correlation features and the current flow -> motion features (with the flow appended)."""
    small: bool = False

    @nn.compact
    def __call__(self, flow, corr):
        if self.small:
            cor = nn.relu(Conv(96, (1, 1), 1, 0, name="convc1")(corr))
            flo = nn.relu(Conv(64, (7, 7), 1, 3, name="convf1")(flow))
            flo = nn.relu(Conv(32, (3, 3), 1, 1, name="convf2")(flo))
            out = nn.relu(Conv(80, (3, 3), 1, 1, name="conv")(jnp.concatenate([cor, flo], -1)))
        else:
            cor = nn.relu(Conv(256, (1, 1), 1, 0, name="convc1")(corr))
            cor = nn.relu(Conv(192, (3, 3), 1, 1, name="convc2")(cor))
            flo = nn.relu(Conv(128, (7, 7), 1, 3, name="convf1")(flow))
            flo = nn.relu(Conv(64, (3, 3), 1, 1, name="convf2")(flo))
            out = nn.relu(Conv(126, (3, 3), 1, 1, name="conv")(jnp.concatenate([cor, flo], -1)))
        return jnp.concatenate([out, flow], -1)


class ConvGRU(nn.Module):
    """GRU with convolutional gates; ``separable``: a (1, 5) pass then a (5, 1) pass (the large model's)."""
    hidden_dim: int
    separable: bool = False

    def gate_pass(self, h, x, kernel, padding, suffix):
        hx = jnp.concatenate([h, x], -1)
        conv = lambda name: Conv(self.hidden_dim, kernel, 1, padding, name=name + suffix)  # noqa: E731
        z = nn.sigmoid(conv("convz")(hx))
        r = nn.sigmoid(conv("convr")(hx))
        q = jnp.tanh(conv("convq")(jnp.concatenate([r * h, x], -1)))
        return (1 - z) * h + z * q

    @nn.compact
    def __call__(self, h, x):
        if not self.separable:
            return self.gate_pass(h, x, (3, 3), 1, "")
        h = self.gate_pass(h, x, (1, 5), [(0, 0), (2, 2)], "1")  # horizontal
        return self.gate_pass(h, x, (5, 1), [(2, 2), (0, 0)], "2")  # vertical


class FlowHead(nn.Module):
    hidden_dim: int

    @nn.compact
    def __call__(self, x):
        return Conv(2, (3, 3), 1, 1, name="conv2")(nn.relu(Conv(self.hidden_dim, (3, 3), 1, 1, name="conv1")(x)))


class UpdateBlock(nn.Module):
    """One refinement step (torch's ``update_block`` plus the correlation lookup before it), the body of the scan.

    carry: (hidden (N, h, w, hdim), coords1 (N, h, w, 2), upsampling mask (N, h, w, 576) of the last step)."""
    config: RAFTConfig

    @nn.compact
    def __call__(self, carry, context, pyramid, coords0):
        hidden, coords1, _ = carry
        corr = lookup_correlation(pyramid, coords1, self.config.corr_radius)
        flow = coords1 - coords0
        motion = MotionEncoder(self.config.small, name="encoder")(flow, corr)
        hidden = ConvGRU(self.config.hidden_dim, separable=not self.config.small,
                         name="gru")(hidden, jnp.concatenate([context, motion], -1))
        delta = FlowHead(128 if self.config.small else 256, name="flow_head")(hidden)
        if self.config.small:
            mask = carry[2]
        else:  # scaled by 0.25 "to balance gradients" (the authors' comment)
            mask = 0.25 * Conv(64 * 9, (1, 1), 1, 0, name="mask_2")(nn.relu(Conv(256, (3, 3), 1, 1,
                                                                                  name="mask_0")(hidden)))
        return (hidden, coords1 + delta, mask), None


def convex_upsample(flow, mask):
    """Learned 8x upsampling: each full-resolution flow is a softmax-weighted mix of the 3x3 coarse neighbourhood
    of 8 * flow. flow (N, h, w, 2), mask (N, h, w, 9 * 64) ordered (neighbour, row, column) -> (N, 8h, 8w, 2)."""
    n, h, w, _ = flow.shape
    weights = jax.nn.softmax(mask.reshape(n, h, w, 9, 8, 8), axis=3)
    padded = jnp.pad(8 * flow, ((0, 0), (1, 1), (1, 1), (0, 0)))
    neighbours = jnp.stack([padded[:, i:i + h, j:j + w] for i in range(3) for j in range(3)], axis=3)  # (N,h,w,9,2)
    up = jnp.einsum("nijkab,nijkc->niajbc", weights, neighbours)  # (N, h, 8, w, 8, 2)
    return up.reshape(n, 8 * h, 8 * w, 2)


def _align_corners_matrix(size_in: int, size_out: int) -> np.ndarray:
    """(size_out, size_in) linear interpolation weights of ``F.interpolate(..., align_corners=True)``."""
    source = np.arange(size_out) * ((size_in - 1) / (size_out - 1) if size_out > 1 else 0.0)
    low = np.clip(np.floor(source).astype(int), 0, size_in - 1)
    high = np.minimum(low + 1, size_in - 1)
    frac = source - low
    matrix = np.zeros((size_out, size_in), np.float32)
    np.add.at(matrix, (np.arange(size_out), low), 1 - frac)
    np.add.at(matrix, (np.arange(size_out), high), frac)
    return matrix


def bilinear_upsample_8x(flow):
    """torch's ``upflow8``: 8 * bilinear (align_corners=True) resize of (N, h, w, 2) to (N, 8h, 8w, 2)."""
    _, h, w, _ = flow.shape
    rows, cols = _align_corners_matrix(h, 8 * h), _align_corners_matrix(w, 8 * w)
    return 8 * jnp.einsum("ai,bj,nijc->nabc", rows, cols, flow)


class RAFT(nn.Module):
    config: RAFTConfig = RAFTConfig()

    @nn.compact
    def __call__(self, image1, image2, iters: int | None = None, return_low_resolution: bool = False):
        """image1, image2 (N, H, W, 3) in [0, 255], H and W multiples of 8 -> flow from image1 to image2
        (N, H, W, 2) as (dx, dy) in pixels; with ``return_low_resolution`` also the 1/8 flow (N, H/8, W/8, 2)."""
        config = self.config
        n, height, width, _ = image1.shape
        if height % 8 or width % 8:
            raise ValueError(f"RAFT needs image sides that are multiples of 8, got {height}x{width} "
                             "(pad with jaxvc.models.raft.pad_to_multiple_of_8)")
        image1 = 2 * (image1.astype(jnp.float32) / 255.0) - 1.0
        image2 = 2 * (image2.astype(jnp.float32) / 255.0) - 1.0
        features = Encoder(128 if config.small else 256, "instance", config.small, name="fnet")(
            jnp.concatenate([image1, image2], axis=0))  # both images in one batch, as torch does
        pyramid = correlation_pyramid(features[:n], features[n:], config.corr_levels)
        context = Encoder(config.hidden_dim + config.context_dim, "none" if config.small else "batch",
                          config.small, name="cnet")(image1)
        hidden = jnp.tanh(context[..., :config.hidden_dim])
        context = nn.relu(context[..., config.hidden_dim:])
        coords0 = coordinate_grid(n, height // 8, width // 8)
        steps = nn.scan(UpdateBlock, variable_broadcast="params", split_rngs={"params": False},
                        in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=iters or config.iters)
        mask = jnp.zeros((n, height // 8, width // 8, 64 * 9), jnp.float32)
        (_, coords1, mask), _ = steps(config, name="update_block")((hidden, coords0, mask), context, pyramid,
                                                                   coords0)
        flow = coords1 - coords0
        flow_up = bilinear_upsample_8x(flow) if config.small else convex_upsample(flow, mask)
        return (flow_up, flow) if return_low_resolution else flow_up


def pad_to_multiple_of_8(images, mode: str = "sintel"):
    """RAFT's ``InputPadder``: edge-replicate (N, H, W, C) images up to multiples of 8, split evenly top/bottom and
    left/right ("sintel", what the dynamic-degree metric uses) or all at the bottom ("kitti"). Returns (padded,
    (top, bottom, left, right))."""
    return pad_to_multiple(images, 8, bottom_only=mode != "sintel")
