"""Analytic FLOP counts of the benchmarked work, written from the architecture (not from XLA), to cross-check the
compiled step's ``cost_analysis()``.

What is counted: every convolution, every dense (matmul) layer and the two matmuls of every attention
(Q K^T and A V), at 2 FLOPs per multiply-add. Convolutions count only the kernel taps that land inside the input
(zero-padding taps are not work; XLA's cost analysis counts them the same way, which matters at tiny sizes where the
border is a large share of a 3x3 conv). Not counted: normalizations, activations, softmax, residual adds, the
optimizer update and the noise arithmetic: elementwise work that XLA's ``flops`` does include, so the compiled count
is a little *higher* than this one (the tolerance in tests/test_bench.py is about that share).

Attention with VideoMaker's reference injection (PISA): each generated frame's spatial self-attention runs over
``[own H*W tokens; reference H*W tokens]``, i.e. B*F sequences of 2*H*W tokens (projections included), and the
reference frame gets no separate attn1; cross-attention attends all B*(F+1) frames' tokens to the 77 text tokens,
the text's keys/values projected once per video; motion modules attend over F+1 frames at every pixel.

Backward pass (train step): only what reverse-mode autodiff in JAX actually computes. A layer's weight gradient
exists when its weight trains (VideoMaker: spatial attn1 and motion modules); its input gradient exists when its
input depends on a trainable weight, i.e. after the first trainable layer in forward order and never for the
text/timestep branches. An attention core costs one more forward per operand that needs a gradient.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from jaxvc.models.clip_text import CLIPTextConfig
from jaxvc.models.unet import UNetConfig
from jaxvc.models.vae import VAEConfig


@dataclasses.dataclass(frozen=True)
class Op:
    name: str
    kind: str                 # "conv" | "dense" | "attention"
    flops: float              # forward FLOPs
    weight_trains: bool = False
    input_needs_grad: bool = False
    context_needs_grad: bool = False  # attention: keys/values depend on trainable weights

    def backward_flops(self) -> float:
        if self.kind == "attention":
            # half the forward is Q K^T, half A V; dQ and dA need the query side, dK and dV the key/value side
            half = self.flops / 2
            query, context = self.input_needs_grad, self.context_needs_grad
            return half * (query + context) + half * ((query or context) + context)
        return self.flops * (self.input_needs_grad + self.weight_trains)


def valid_taps(size: int, kernel: int, stride: int, pad: int) -> int:
    """Sum over output positions of the kernel taps that read inside [0, size) along one axis."""
    out = (size + 2 * pad - kernel) // stride + 1
    return sum(sum(1 for i in range(kernel) if 0 <= o * stride - pad + i < size) for o in range(out))


class FlopCounter:
    """Records ops in forward order. ``depends``: whether the running activation depends on a trainable weight."""

    def __init__(self, trainable: Callable[[str], bool] = lambda path: False):
        self.trainable = trainable
        self.ops: list[Op] = []
        self.depends = False

    def dense(self, path: str, rows: int, fan_in: int, fan_out: int, input_depends: bool | None = None):
        needs = self.depends if input_depends is None else input_depends
        trains = self.trainable(path)
        self.ops.append(Op(path, "dense", 2.0 * rows * fan_in * fan_out, trains, needs))
        if trains:
            self.depends = True

    def conv(self, path: str, images: int, height: int, width: int, fan_in: int, fan_out: int, kernel: int = 3,
             stride: int = 1, pad: int = 1) -> tuple[int, int]:
        taps = valid_taps(height, kernel, stride, pad) * valid_taps(width, kernel, stride, pad)
        trains = self.trainable(path)
        self.ops.append(Op(path, "conv", 2.0 * images * taps * fan_in * fan_out, trains, self.depends))
        if trains:
            self.depends = True
        return (height + 2 * pad - kernel) // stride + 1, (width + 2 * pad - kernel) // stride + 1

    def attention_core(self, path: str, sequences: int, queries: int, keys: int, inner: int,
                       context_depends: bool | None = None):
        context = self.depends if context_depends is None else context_depends
        self.ops.append(Op(path, "attention", 4.0 * sequences * queries * keys * inner, False, self.depends,
                           context))

    def attention(self, path: str, rows: int, sequences: int, queries: int, channels: int, inner: int,
                  context_rows: int | None = None, keys: int | None = None, context_channels: int | None = None):
        """q/k/v projections, the core and to_out_0. Self-attention when no context is given."""
        before = self.depends
        cross = context_rows is not None
        source_rows, source_channels = (context_rows, context_channels) if cross else (rows, channels)
        source_depends = False if cross else before  # the text context never depends on trainable weights
        self.dense(f"{path}/to_q", rows, channels, inner, input_depends=before)
        self.dense(f"{path}/to_k", source_rows, source_channels, inner, input_depends=source_depends)
        self.dense(f"{path}/to_v", source_rows, source_channels, inner, input_depends=source_depends)
        query_depends = before or self.trainable(f"{path}/to_q")
        context_depends = source_depends or self.trainable(f"{path}/to_k") or self.trainable(f"{path}/to_v")
        self.depends = query_depends
        self.attention_core(f"{path}/core", sequences, queries, keys or queries, inner,
                            context_depends=context_depends)
        self.depends = query_depends or context_depends
        self.dense(f"{path}/to_out_0", rows, inner, channels)

    def feed_forward(self, path: str, rows: int, channels: int, mult: int = 4):
        self.dense(f"{path}/net_0/proj", rows, channels, 2 * mult * channels)  # GEGLU: value and gate
        self.dense(f"{path}/net_2", rows, mult * channels, channels)

    # ---------------------------------------------------------------------------------------------- totals
    @property
    def forward(self) -> float:
        return sum(op.flops for op in self.ops)

    @property
    def backward(self) -> float:
        return sum(op.backward_flops() for op in self.ops)


# ------------------------------------------------------------------------------------------------------- models
def clip_text(counter: FlopCounter, cfg: CLIPTextConfig, batch: int, length: int = 77, path: str = "text_encoder"):
    rows, width = batch * length, cfg.hidden_size
    saved, counter.depends = counter.depends, False
    for i in range(cfg.num_layers):
        layer = f"{path}/encoder/layers_{i}"
        counter.attention(f"{layer}/self_attn", rows, batch, length, width, width)
        counter.dense(f"{layer}/mlp/fc1", rows, width, cfg.intermediate_size)
        counter.dense(f"{layer}/mlp/fc2", rows, cfg.intermediate_size, width)
    counter.depends = saved


def _resnet(counter, path, images, height, width, fan_in, fan_out, temb_dim):
    counter.conv(f"{path}/conv1", images, height, width, fan_in, fan_out)
    if temb_dim:
        counter.dense(f"{path}/time_emb_proj", images, temb_dim, fan_out, input_depends=False)
    counter.conv(f"{path}/conv2", images, height, width, fan_out, fan_out)
    if fan_in != fan_out:
        counter.conv(f"{path}/conv_shortcut", images, height, width, fan_in, fan_out, kernel=1, pad=0)


def _transformer(counter, cfg: UNetConfig, path, channels, layers, videos, frames, height, width, context_len,
                 injection):
    images, tokens = videos * frames, height * width
    counter.conv(f"{path}/proj_in", images, height, width, channels, channels, kernel=1, pad=0)
    if cfg.use_linear_projection:
        counter.ops.pop()
        counter.dense(f"{path}/proj_in", images * tokens, channels, channels)
    for k in range(layers):
        block = f"{path}/transformer_blocks_{k}"
        if injection:  # PISA: B*F generated frames, each over [own; reference] tokens
            generated = videos * (frames - 1)
            counter.attention(f"{block}/attn1", generated * 2 * tokens, generated, 2 * tokens, channels, channels)
        else:
            counter.attention(f"{block}/attn1", images * tokens, images, tokens, channels, channels)
        counter.attention(f"{block}/attn2", images * tokens, videos, frames * tokens, channels, channels,
                          context_rows=videos * context_len, keys=context_len,
                          context_channels=cfg.cross_attention_dim)
        counter.feed_forward(f"{block}/ff", images * tokens, channels)
    counter.conv(f"{path}/proj_out", images, height, width, channels, channels, kernel=1, pad=0)
    if cfg.use_linear_projection:
        counter.ops.pop()
        counter.dense(f"{path}/proj_out", images * tokens, channels, channels)


def _motion(counter, cfg: UNetConfig, path, channels, layers, videos, frames, height, width):
    sequences = videos * height * width
    rows = sequences * frames
    counter.dense(f"{path}/proj_in", rows, channels, channels)
    for k in range(layers):
        block = f"{path}/transformer_blocks_{k}"
        counter.attention(f"{block}/attn1", rows, sequences, frames, channels, channels)
        counter.attention(f"{block}/attn2", rows, sequences, frames, channels, channels)
        counter.feed_forward(f"{block}/ff", rows, channels)
    counter.dense(f"{path}/proj_out", rows, channels, channels)


def unet(counter: FlopCounter, cfg: UNetConfig, videos: int, frames: int, height: int, width: int,
         context_len: int = 77, injection: bool = True, path: str = "unet"):
    """UNetMotion on (videos, frames, height, width) latents; ``frames`` counts the reference frame if injected."""
    images = videos * frames
    c0 = cfg.block_out_channels[0]
    counter.dense(f"{path}/time_embedding/linear_1", videos, c0, 4 * c0, input_depends=False)
    counter.dense(f"{path}/time_embedding/linear_2", videos, 4 * c0, 4 * c0, input_depends=False)
    temb = 4 * c0
    counter.conv(f"{path}/conv_in", images, height, width, cfg.in_channels, c0)
    layers = cfg.per_level("layers_per_block")
    transformer_layers = cfg.per_level("transformer_layers_per_block")
    motion_layers = cfg.motion.layers_per_block if cfg.motion is not None else 0
    h, w, channels = height, width, c0
    skips = [(c0, h, w)]
    for i, block_type in enumerate(cfg.down_block_types):
        out = cfg.block_out_channels[i]
        for j in range(layers[i]):
            prefix = f"{path}/down_blocks_{i}"
            _resnet(counter, f"{prefix}/resnets_{j}", images, h, w, channels, out, temb)
            channels = out
            if block_type.startswith("CrossAttn"):
                _transformer(counter, cfg, f"{prefix}/attentions_{j}", out, transformer_layers[i], videos, frames,
                             h, w, context_len, injection)
            if cfg.motion is not None:
                _motion(counter, cfg, f"{prefix}/motion_modules_{j}", out, motion_layers, videos, frames, h, w)
            skips.append((out, h, w))
        if i < cfg.levels - 1:
            h, w = counter.conv(f"{path}/down_blocks_{i}/downsamplers_0/conv", images, h, w, out, out, stride=2,
                                pad=cfg.downsample_padding)
            skips.append((out, h, w))
    top = cfg.block_out_channels[-1]
    _resnet(counter, f"{path}/mid_block/resnets_0", images, h, w, top, top, temb)
    _transformer(counter, cfg, f"{path}/mid_block/attentions_0", top, transformer_layers[-1], videos, frames, h, w,
                 context_len, injection)
    if cfg.motion is not None and cfg.motion.use_mid_block:
        _motion(counter, cfg, f"{path}/mid_block/motion_modules_0", top, cfg.motion.mid_layers_per_block, videos,
                frames, h, w)
    _resnet(counter, f"{path}/mid_block/resnets_1", images, h, w, top, top, temb)
    for i, block_type in enumerate(cfg.up_block_types):
        level = cfg.levels - 1 - i
        out = cfg.block_out_channels[level]
        prefix = f"{path}/up_blocks_{i}"
        for j in range(layers[level] + 1):
            skip_channels, _, _ = skips.pop()
            _resnet(counter, f"{prefix}/resnets_{j}", images, h, w, channels + skip_channels, out, temb)
            channels = out
            if block_type.startswith("CrossAttn"):
                _transformer(counter, cfg, f"{prefix}/attentions_{j}", out, transformer_layers[level], videos,
                             frames, h, w, context_len, injection)
            if cfg.motion is not None:
                _motion(counter, cfg, f"{prefix}/motion_modules_{j}", out, motion_layers, videos, frames, h, w)
        if i < cfg.levels - 1:
            _, h, w = skips[-1]  # nearest upsampling to the next skip's size
            counter.conv(f"{prefix}/upsamplers_0/conv", images, h, w, out, out)
    counter.conv(f"{path}/conv_out", images, h, w, c0, cfg.out_channels)


def vae_decoder(counter: FlopCounter, cfg: VAEConfig, images: int, height: int, width: int, path: str = "vae"):
    """``AutoencoderKL.decode`` of ``images`` latents of size (height, width)."""
    channels = list(reversed(cfg.block_out_channels))
    h, w = height, width
    if cfg.use_post_quant_conv:
        counter.conv(f"{path}/post_quant_conv", images, h, w, cfg.latent_channels, cfg.latent_channels, 1, 1, 0)
    counter.conv(f"{path}/decoder/conv_in", images, h, w, cfg.latent_channels, channels[0])
    mid = f"{path}/decoder/mid_block"
    _resnet(counter, f"{mid}/resnets_0", images, h, w, channels[0], channels[0], 0)
    if cfg.mid_block_add_attention:
        counter.attention(f"{mid}/attentions_0", images * h * w, images, h * w, channels[0], channels[0])
    _resnet(counter, f"{mid}/resnets_1", images, h, w, channels[0], channels[0], 0)
    current = channels[0]
    for i, out in enumerate(channels):
        for j in range(cfg.layers_per_block + 1):
            _resnet(counter, f"{path}/decoder/up_blocks_{i}/resnets_{j}", images, h, w, current, out, 0)
            current = out
        if i < len(channels) - 1:
            h, w = 2 * h, 2 * w
            counter.conv(f"{path}/decoder/up_blocks_{i}/upsamplers_0/conv", images, h, w, out, out)
    counter.conv(f"{path}/decoder/conv_out", images, h, w, channels[-1], cfg.out_channels)


# ------------------------------------------------------------------------------------------------- workloads
def unet_forward_flops(cfg: UNetConfig, batch: int, frames: int, latent: int, injection: bool = True) -> float:
    """One UNet call on ``batch`` videos of ``frames`` generated frames (+1 reference frame when injected)."""
    counter = FlopCounter()
    unet(counter, cfg, batch, frames + int(injection), latent, latent, injection=injection)
    return counter.forward


def train_step_flops(cfg: UNetConfig, text: CLIPTextConfig, batch: int, frames: int, latent: int,
                     trainable: Callable[[str], bool]) -> dict:
    """VideoMaker's train step: frozen text encoder forward, UNet forward with PISA, backward for ``trainable``
    (a predicate on "unet/down_blocks_0/..." paths). Returns forward, backward and total FLOPs."""
    counter = FlopCounter(trainable)
    clip_text(counter, text, batch)
    text_ops = len(counter.ops)
    unet(counter, cfg, batch, frames + 1, latent, latent, injection=True)
    forward = counter.forward
    backward = sum(op.backward_flops() for op in counter.ops[text_ops:])
    return {"forward": forward, "backward": backward, "total": forward + backward}


def sampling_flops(cfg: UNetConfig, batch: int, frames: int, latent: int, steps: int) -> float:
    """``steps`` guided UNet calls on the doubled batch [uncond; cond] (the DDIM update itself is elementwise)."""
    return steps * unet_forward_flops(cfg, 2 * batch, frames, latent, injection=True)


def vae_decode_flops(cfg: VAEConfig, images: int, latent: int) -> float:
    counter = FlopCounter()
    vae_decoder(counter, cfg, images, latent, latent)
    return counter.forward
