"""AMT-S (Li et al., "AMT: All-Pairs Multi-Field Transforms for Efficient Frame Interpolation", CVPR 2023) in Flax,
channels last: the network of MCG-NKU/AMT's ``networks/AMT-S.py`` as VBench ships it, which VBench's motion
smoothness runs with ``amt-s.pth`` to synthesise the frame between two frames.

One forward pass, for two frames (N, H, W, 3) in [0, 1] with H and W multiples of 16 and the time t = 1/2:

1. both frames lose their common mean (one scalar per pair); RAFT's small feature encoder (``feat_encoder``,
   instance norm, 84 channels at 1/8) gives the bidirectional all-pairs correlation: ``corr`` over frame 1's
   positions for every frame-0 pixel and its transpose, each pooled into a 4-level pyramid;
2. a context pyramid (``encoder``: four stride-2 conv + PReLU stages, 1/2 .. 1/16) of each frame;
3. coarse to fine, decoders 4, 3, 2 predict the flows from the intermediate frame to frames 0 and 1 and an
   intermediate feature, upsampling 2x each (a stride-2 transposed conv); after each, the flows scaled to 0 -> 1 and
   1 -> 0 (linear motion: x 1/t and x 1/(1 - t)) look the correlation up in a (2r + 1)^2 window (r = 3, at 1/8: the
   finer flows are first shrunk), and an update block adds residual flows and features;
4. decoder 1 predicts ``num_flows`` (3) flow pairs at full resolution with blend masks and residual images; each
   pair warps both frames (bilinear, border padding), and the warps are averaged plus a learned 3x3 correction
   (``comb_block``); the frame is clamped to [0, 1].

Names follow the torch modules with ``nn.Sequential`` indices joined (``decoder4/convblock_0_0`` is
``decoder4.convblock.0.0``, a conv; ``..._0_1`` its PReLU), so ``jaxvc.convert.amt`` maps the checkpoint
mechanically. Evaluation only (no dropout; the training outputs, all flow levels, are not returned).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jaxvc.models.layers import Conv
from jaxvc.models.raft import Encoder, coordinate_grid, correlation_pyramid, lookup_correlation
from jaxvc.models.resample import rescale_bilinear


@dataclasses.dataclass(frozen=True)
class AMTConfig:
    """AMT-S, the size VBench's motion smoothness uses (``AMT-S.yaml``: corr_radius 3, corr_lvls 4, num_flows 3)."""
    corr_radius: int = 3
    corr_levels: int = 4
    num_flows: int = 3
    channels: tuple[int, ...] = (20, 32, 44, 56)  # context pyramid widths at 1/2, 1/4, 1/8, 1/16
    skip_channels: int = 20  # the ResBlocks' side channels
    feature_dim: int = 84  # correlation features
    hidden_dim: int = 76  # update blocks
    flow_dim: int = 20
    corr_dim: int = 64
    fc_dim: int = 68


VARIANTS = {"small": AMTConfig()}
MULTIPLE = 16  # the side multiple the network needs (its context pyramid reaches 1/16)


def leaky_relu(x):
    return nn.leaky_relu(x, negative_slope=0.1)


class PReLU(nn.Module):
    """torch's ``nn.PReLU(C)``: max(0, x) + a_c min(0, x), one learned slope per channel (initially 0.25)."""

    @nn.compact
    def __call__(self, x):
        slope = self.param("negative_slope", nn.initializers.constant(0.25), (x.shape[-1],), jnp.float32)
        return jnp.where(x >= 0, x, slope * x)


def conv_prelu(x, features: int, name: str, kernel: int = 3, stride: int = 1):
    """AMT's ``convrelu``: ``nn.Sequential(Conv2d, PReLU)``, named ``<name>_0`` and ``<name>_1`` (call it inside a
    compact method: the two modules belong to the caller)."""
    x = Conv(features, (kernel, kernel), stride, kernel // 2, name=f"{name}_0")(x)
    return PReLU(name=f"{name}_1")(x)


class ConvTranspose(nn.Module):
    """torch's ``ConvTranspose2d(in, features, 4, stride=2, padding=1)``: doubles H and W. ``kernel`` is torch's
    (in, out, 4, 4) weight moved to (4, 4, out, in), as ``jaxvc.convert`` moves every conv weight; the transposed
    conv is the conv of the 2x-dilated input with the spatially flipped kernel, padded 4 - 1 - 1 = 2 each side."""
    features: int
    kernel_size: int = 4
    stride: int = 2
    padding: int = 1

    @nn.compact
    def __call__(self, x):
        k = self.kernel_size
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, self.features, x.shape[-1]),
                            jnp.float32)
        flipped = jnp.swapaxes(kernel[::-1, ::-1], 2, 3)  # (k, k, in, out)
        edge = k - 1 - self.padding
        y = jax.lax.conv_general_dilated(x, flipped, window_strides=(1, 1), padding=[(edge, edge)] * 2,
                                         lhs_dilation=(self.stride, self.stride),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)


class ResBlock(nn.Module):
    """IFRNet's residual block: five 3x3 convs; the 2nd and 4th refine only the last ``side_channels`` channels."""
    side_channels: int

    @nn.compact
    def __call__(self, x):
        channels, side = x.shape[-1], self.side_channels
        out = conv_prelu(x, channels, "conv1")
        out = jnp.concatenate([out[..., :-side], conv_prelu(out[..., -side:], side, "conv2")], -1)
        out = conv_prelu(out, channels, "conv3")
        out = jnp.concatenate([out[..., :-side], conv_prelu(out[..., -side:], side, "conv4")], -1)
        out = Conv(channels, (3, 3), 1, 1, name="conv5")(out)
        return PReLU(name="prelu")(x + out)


class ContextEncoder(nn.Module):
    """Four stages of (stride-2 conv + PReLU, conv + PReLU): (N, H, W, 3) -> features at 1/2, 1/4, 1/8, 1/16."""
    channels: tuple[int, ...]

    @nn.compact
    def __call__(self, x):
        pyramid = []
        for level, width in enumerate(self.channels, start=1):
            x = conv_prelu(x, width, f"pyramid{level}_0", stride=2)
            x = conv_prelu(x, width, f"pyramid{level}_1")
            pyramid.append(x)
        return pyramid


def warp(image, flow):
    """``flow_utils.warp``: sample ``image`` (N, H, W, C) at each pixel + ``flow`` (N, H, W, 2) as (dx, dy), bilinear,
    positions outside clamped to the border (``grid_sample(padding_mode="border", align_corners=True)``), with
    torch's normalise/unnormalise arithmetic so the sample positions round the same."""
    _, height, width, _ = flow.shape
    xs = torch_linspace(-1.0, 1.0, width)[None, None, :]
    ys = torch_linspace(-1.0, 1.0, height)[None, :, None]
    grid_x = xs + flow[..., 0] / ((width - 1.0) / 2.0)
    grid_y = ys + flow[..., 1] / ((height - 1.0) / 2.0)
    x = jnp.clip((grid_x + 1) / 2 * (width - 1), 0, width - 1)  # (N, H, W)
    y = jnp.clip((grid_y + 1) / 2 * (height - 1), 0, height - 1)
    x0, y0 = jnp.floor(x), jnp.floor(y)
    n, channels = image.shape[0], image.shape[-1]
    flat = image.reshape(n, height * width, channels)
    out = 0.0
    for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):
        cx, cy = x0 + dx, y0 + dy
        weight = (1 - jnp.abs(x - cx)) * (1 - jnp.abs(y - cy))
        inside = (cx <= width - 1) & (cy <= height - 1)  # after the clamp only the +1 neighbours can fall outside
        index = (jnp.minimum(cy, height - 1) * width + jnp.minimum(cx, width - 1)).astype(jnp.int32)
        values = jnp.take_along_axis(flat, index.reshape(n, -1, 1), axis=1).reshape(image.shape)
        out = out + jnp.where(inside[..., None], values * weight[..., None], 0.0)
    return out


def torch_linspace(start: float, end: float, steps: int) -> np.ndarray:
    """float32 ``torch.linspace``: the first half counts up from ``start``, the second down from ``end``."""
    if steps == 1:
        return np.full(1, start, np.float32)
    step = np.float32((end - start) / (steps - 1))
    index = np.arange(steps)
    up = np.float32(start) + index.astype(np.float32) * step
    down = np.float32(end) - (steps - 1 - index).astype(np.float32) * step
    return np.where(index < steps // 2, up, down).astype(np.float32)


class InitDecoder(nn.Module):
    """Decoder 4: both frames' 1/16 features and t -> flows to frame 0 and 1 and a feature, at 1/8."""
    out_channels: int
    skip_channels: int

    @nn.compact
    def __call__(self, f0, f1, t):
        time = jnp.broadcast_to(t[:, None, None, None], (*f0.shape[:3], 1))
        x = jnp.concatenate([f0, f1, time], -1)
        x = conv_prelu(x, x.shape[-1] - 1, "convblock_0")
        x = ResBlock(self.skip_channels, name="convblock_1")(x)
        out = ConvTranspose(self.out_channels + 4, name="convblock_2")(x)
        return out[..., 0:2], out[..., 2:4], out[..., 4:]


class IntermediateDecoder(nn.Module):
    """Decoders 3 and 2: the feature, both frames' features warped by the current flows, the flows -> residual
    flows on the 2x upsampled flows, and the next feature, at twice the resolution."""
    out_channels: int
    skip_channels: int

    @nn.compact
    def __call__(self, feature, f0, f1, flow0, flow1):
        x = jnp.concatenate([feature, warp(f0, flow0), warp(f1, flow1), flow0, flow1], -1)
        x = conv_prelu(x, 3 * f0.shape[-1], "convblock_0")
        x = ResBlock(self.skip_channels, name="convblock_1")(x)
        out = ConvTranspose(self.out_channels + 4, name="convblock_2")(x)
        flow0 = out[..., 0:2] + 2.0 * rescale_bilinear(flow0, 2.0)
        flow1 = out[..., 2:4] + 2.0 * rescale_bilinear(flow1, 2.0)
        return flow0, flow1, out[..., 4:]


class MultiFlowDecoder(nn.Module):
    """Decoder 1: ``num_flows`` flow pairs at full resolution (residuals on the 2x upsampled flow, repeated), their
    blend masks (sigmoid) and residual images: (N, H, W, 2n), (N, H, W, 2n), (N, H, W, n), (N, H, W, 3n)."""
    num_flows: int
    skip_channels: int

    @nn.compact
    def __call__(self, feature, f0, f1, flow0, flow1):
        n = self.num_flows
        x = jnp.concatenate([feature, warp(f0, flow0), warp(f1, flow1), flow0, flow1], -1)
        x = conv_prelu(x, 3 * f0.shape[-1], "convblock_0")
        x = ResBlock(self.skip_channels, name="convblock_1")(x)
        out = ConvTranspose(8 * n, name="convblock_2")(x)
        delta0, delta1, mask, residual = jnp.split(out, np.cumsum([2 * n, 2 * n, n]), axis=-1)
        flow0 = delta0 + 2.0 * jnp.tile(rescale_bilinear(flow0, 2.0), (1, 1, 1, n))
        flow1 = delta1 + 2.0 * jnp.tile(rescale_bilinear(flow1, 2.0), (1, 1, 1, n))
        return flow0, flow1, jax.nn.sigmoid(mask), residual


class UpdateBlock(nn.Module):
    """``SmallUpdateBlock``: the looked-up correlation and the flows -> residual feature and flows. ``scale``: the
    feature is at ``scale`` x the correlation's 1/8 resolution; it is shrunk to 1/8 and the deltas grown back."""
    config: AMTConfig
    feature_channels: int
    scale: int = 1

    @nn.compact
    def __call__(self, feature, flow, corr):
        c = self.config
        if self.scale != 1:
            feature = rescale_bilinear(feature, 1 / self.scale)
        cor = leaky_relu(Conv(c.corr_dim, (1, 1), 1, 0, name="convc1")(corr))
        flo = leaky_relu(Conv(2 * c.flow_dim, (7, 7), 1, 3, name="convf1")(flow))
        flo = leaky_relu(Conv(c.flow_dim, (3, 3), 1, 1, name="convf2")(flo))
        inp = leaky_relu(Conv(c.fc_dim, (3, 3), 1, 1, name="conv")(jnp.concatenate([cor, flo], -1)))
        inp = jnp.concatenate([inp, flow, feature], -1)
        out = Conv(c.hidden_dim, (3, 3), 1, 1, name="gru_2")(leaky_relu(Conv(c.hidden_dim, (3, 3), 1, 1,
                                                                              name="gru_0")(inp)))
        head = lambda width, name: Conv(width, (3, 3), 1, 1, name=f"{name}_2")(  # noqa: E731
            leaky_relu(Conv(c.hidden_dim, (3, 3), 1, 1, name=f"{name}_0")(out)))
        delta_feature, delta_flow = head(self.feature_channels, "feat_head"), head(4, "flow_head")
        if self.scale != 1:
            delta_feature = rescale_bilinear(delta_feature, self.scale)
            delta_flow = self.scale * rescale_bilinear(delta_flow, self.scale)
        return delta_feature, delta_flow


class AMT(nn.Module):
    config: AMTConfig = AMTConfig()

    def lookup(self, pyramids, coords, flow0, flow1, t, downsample: int):
        """The correlation where the flows, scaled to frame-to-frame flows (linear motion), point from the 1/8 grid
        ``coords``; the flows are first shrunk to 1/8. Returns (correlation (N, h, w, 2 L (2r+1)^2), flows
        (N, h, w, 4) at 1/8)."""
        if downsample != 1:
            flow0 = rescale_bilinear(flow0, 1 / downsample) / downsample
            flow1 = rescale_bilinear(flow1, 1 / downsample) / downsample
        t = t[:, None, None, None]
        radius = self.config.corr_radius
        corr0 = lookup_correlation(pyramids[0], coords + flow1 * (1.0 / t), radius)
        corr1 = lookup_correlation(pyramids[1], coords + flow0 * (1.0 / (1.0 - t)), radius)
        return jnp.concatenate([corr0, corr1], -1), jnp.concatenate([flow0, flow1], -1)

    @nn.compact
    def __call__(self, frame0, frame1, t=None):
        """frame0, frame1 (N, H, W, 3) in [0, 1], H and W multiples of 16; t (N,) in (0, 1) (default 1/2) ->
        the frame at time t, (N, H, W, 3) in [0, 1]. ``apply(..., mutable=["intermediates"])`` also returns the
        flows from the frame at t to frames 0 and 1 after each level (``flow0_4`` at 1/8 ... ``flow0_1``)."""
        c = self.config
        n, height, width, _ = frame0.shape
        if height % MULTIPLE or width % MULTIPLE:
            raise ValueError(f"AMT needs frame sides that are multiples of {MULTIPLE}, got {height}x{width} (pad "
                             "with jaxvc.models.resample.pad_to_multiple)")
        t = jnp.full((n,), 0.5, jnp.float32) if t is None else jnp.asarray(t, jnp.float32)
        mean = jnp.concatenate([frame0, frame1], axis=1).mean(axis=(1, 2, 3), keepdims=True)  # (N, 1, 1, 1)
        frame0, frame1 = frame0 - mean, frame1 - mean

        features = Encoder(c.feature_dim, "instance", small=True, name="feat_encoder")(
            jnp.concatenate([frame0, frame1], axis=0))  # (2N, H/8, W/8, 84), both frames in one batch
        pyramids = (correlation_pyramid(features[:n], features[n:], c.corr_levels),  # over frame 1's positions
                    correlation_pyramid(features[n:], features[:n], c.corr_levels))  # over frame 0's
        coords = coordinate_grid(n, height // 8, width // 8)
        context = ContextEncoder(c.channels, name="encoder")
        f0, f1 = context(frame0), context(frame1)  # each [1/2, 1/4, 1/8, 1/16]

        flow0, flow1, feature = InitDecoder(c.channels[2], c.skip_channels, name="decoder4")(f0[3], f1[3], t)
        for level, scale in ((4, 1), (3, 2), (2, 4)):
            if level != 4:
                flow0, flow1, feature = IntermediateDecoder(c.channels[level - 2], c.skip_channels,
                                                            name=f"decoder{level}")(feature, f0[level - 1],
                                                                                    f1[level - 1], flow0, flow1)
            corr, flows = self.lookup(pyramids, coords, flow0, flow1, t, downsample=scale)
            delta_feature, delta_flow = UpdateBlock(c, feature.shape[-1], scale,
                                                    name=f"update{level}")(feature, flows, corr)
            flow0, flow1 = flow0 + delta_flow[..., :2], flow1 + delta_flow[..., 2:]
            feature = feature + delta_feature
            self.sow("intermediates", f"flow0_{level}", flow0)  # probes: torch's flow0_pred / flow1_pred
            self.sow("intermediates", f"flow1_{level}", flow1)

        flow0, flow1, mask, residual = MultiFlowDecoder(c.num_flows, c.skip_channels, name="decoder1")(
            feature, f0[0], f1[0], flow0, flow1)
        self.sow("intermediates", "flow0_1", flow0)  # (N, H, W, 2 num_flows)
        self.sow("intermediates", "flow1_1", flow1)
        comb_block = lambda x: Conv(3, (3, 3), 1, 1, name="comb_block_2")(PReLU(name="comb_block_1")(  # noqa: E731
            Conv(6 * c.num_flows, (3, 3), 1, 1, name="comb_block_0")(x)))
        return jnp.clip(multi_flow_combine(comb_block, frame0, frame1, flow0, flow1, mask, residual, mean), 0, 1)


def multi_flow_combine(comb_block, frame0, frame1, flow0, flow1, mask, residual, mean):
    """Every flow pair warps both frames, blended by its mask, plus its residual image and the mean: the mean of the
    ``num_flows`` candidates plus ``comb_block``'s learned 3x3 correction of all of them. frames (N, H, W, 3), flows
    (N, H, W, 2n), mask (N, H, W, n), residual (N, H, W, 3n), mean (N, 1, 1, 1) -> (N, H, W, 3)."""
    n, height, width, _ = frame0.shape
    flows = mask.shape[-1]

    def per_flow(x, channels):  # (N, H, W, flows * channels) -> (N * flows, H, W, channels)
        x = x.reshape(n, height, width, flows, channels)
        return jnp.moveaxis(x, 3, 1).reshape(n * flows, height, width, channels)

    repeat = lambda frame: jnp.repeat(frame, flows, axis=0)  # noqa: E731  (N * flows, ...), flows minor
    mask = per_flow(mask, 1)
    warps = (mask * warp(repeat(frame0), per_flow(flow0, 2)) + (1 - mask) * warp(repeat(frame1), per_flow(flow1, 2))
             + repeat(mean) + per_flow(residual, 3))
    warps = jnp.moveaxis(warps.reshape(n, flows, height, width, 3), 1, 3)  # (N, H, W, flows, 3)
    return warps.mean(axis=3) + comb_block(warps.reshape(n, height, width, flows * 3))
