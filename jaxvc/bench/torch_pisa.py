"""VideoMaker's reference injection for diffusers' PyTorch ``UNetMotionModel``: the reference side of parity tests and
benchmarks (imports torch; never imported by jaxvc itself).

``install_reference_injection(unet, num_frames)`` replaces the processor of every spatial ``attn1`` (not the motion
modules') with PISA, written from the paper's equation (2) as the authors' ``PersonalizedInjectionAttnProcessor2_0``
does: the last of every ``num_frames`` images is the reference; each generated frame attends over
``[own tokens; reference tokens]`` with SDPA, and the reference's per-frame outputs are averaged. With
``reference_cross_attention=False`` the reference frame's ``attn2`` output is zeroed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class ReferenceInjectionProcessor:
    """PISA for a diffusers ``Attention`` (spatial attn1). hidden (B*(F+1), L, C) -> (B*(F+1), L, C)."""

    def __init__(self, num_frames: int):
        self.num_frames = num_frames

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        images, tokens, channels = hidden_states.shape
        videos, generated = images // self.num_frames, self.num_frames - 1
        video = hidden_states.view(videos, self.num_frames, tokens, channels)
        own = video[:, :generated]
        reference = video[:, generated:].expand(videos, generated, tokens, channels)
        joint = torch.cat([own, reference], dim=2).reshape(videos * generated, 2 * tokens, channels)
        query, key, value = attn.to_q(joint), attn.to_k(joint), attn.to_v(joint)
        inner = key.shape[-1]
        head_dim = inner // attn.heads
        split = lambda t: t.view(videos * generated, 2 * tokens, attn.heads, head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(split(query), split(key), split(value))
        out = out.transpose(1, 2).reshape(videos * generated, 2 * tokens, inner).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))  # linear, dropout
        out = out.view(videos, generated, 2 * tokens, channels)
        reference_out = out[:, :, tokens:].mean(dim=1, keepdim=True)
        return torch.cat([out[:, :, :tokens], reference_out], dim=1).reshape(images, tokens, channels)


class ReferenceSkipsCrossAttention:
    """Wraps the default processor of a spatial attn2 and zeroes the reference frame's output ("W/O Cross")."""

    def __init__(self, base, num_frames: int):
        self.base, self.num_frames = base, num_frames

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        out = self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        images, tokens, channels = out.shape
        keep = (torch.arange(self.num_frames) < self.num_frames - 1).to(out.dtype)
        return (out.view(images // self.num_frames, self.num_frames, tokens, channels)
                * keep[None, :, None, None]).view(images, tokens, channels)


def install_reference_injection(unet, num_frames: int, reference_cross_attention: bool = True) -> None:
    """Set PISA processors on a diffusers ``UNetMotionModel``; ``num_frames`` counts the reference frame."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    processors = {}
    for name in unet.attn_processors:
        spatial = "motion_modules" not in name
        if spatial and name.endswith("attn1.processor"):
            processors[name] = ReferenceInjectionProcessor(num_frames)
        elif spatial and name.endswith("attn2.processor") and not reference_cross_attention:
            processors[name] = ReferenceSkipsCrossAttention(AttnProcessor2_0(), num_frames)
        else:
            processors[name] = AttnProcessor2_0()
    unet.set_attn_processor(processors)


def remove_reference_injection(unet) -> None:
    """Back to plain SDPA attention everywhere."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet.set_attn_processor(AttnProcessor2_0())
