"""Disentangled identity/motion subject-to-video (Kim et al., arXiv 2504.17816) on jaxvc's Wan video DiT.

Read top to bottom. A zero-shot subject-to-video model is a text-to-video DiT taught two things at once, by
*stochastic task switching* (each step draws u ~ U(0, 1); the whole batch is one task):

  identity injection (u >= p, image pairs)    target = the other view of the subject as a 1-frame video,
                                              reference = one view (which is which alternates in the data);
  motion preservation (u < p = 0.2, videos)   target = the clip, reference = a random frame of it, and with
                                              probability 0.5 the reference stream is dropped (a plain T2V step).

The reference stream (``jaxvc/models/wan.py``): the clean reference latent, patch-embedded by the video's own
``patch_embedding``, becomes tokens R before the video's tokens X in every block's self-attention, at RoPE frame 0
(X at frames 1..F), with its own modulation: the shared time projection plus a LoRA on it enabled for R only
(``reference_time_lora``; the paper's adaLN linear "with LoRA enabled" for R). Text enters as in Wan, by
cross-attention, prefixed with a new ``<cls>`` token whose embedding row stays at its resize init (the text encoder
is frozen). Only LoRA trains (rank 128, alpha 64): q/k/v/out of both attentions, ``patch_embedding`` (the paper's
patch ``proj``), the text projection (``text_proj``) and ``ffn.net.2``; every base weight is frozen.

Objective: the paper trains CogVideoX with its v-prediction; on Wan jaxvc keeps Wan's own flow matching
(x_sigma = (1 - sigma) x0 + sigma eps, target eps - x0, plain MSE), shifted sigmas as in Wan's scheduler.
Sampling (``jaxvc/dit_pipeline.py``): flow-matching Euler, classifier-free guidance on the text only (the reference
tokens are in both halves), 50 steps, guidance 6, prompt "<cls> ...".

Ref-token dropping: ``drop_mode="full"`` drops the whole stream (the released code), ``"subset"`` each reference
token with probability ``drop_prob`` (the paper's text). Dropping masks the tokens as keys of the self-attention,
which for the video's tokens is exactly removing them.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxvc.config_utils import ConfigError
from jaxvc.diffusion.flow import flow_add_noise, flow_target, sample_flow_sigmas
from jaxvc.methods.base import Method, PipelineValidation, frame_size, init_program, model_frame_size
from jaxvc.methods.video_base import options_from_mapping
from jaxvc.models import lora
from jaxvc.models.clip_text import CLIPTextConfig, CLIPTextEncoder, abstract_clip_text_params
from jaxvc.models.t5_encoder import T5Encoder, T5EncoderConfig, abstract_t5_params
from jaxvc.models.vae import VAEConfig
from jaxvc.models.video_vae import VideoVAE, video_vae_config
from jaxvc.models.wan_vae import WanVAEConfig
from jaxvc.models.wan import WanConfig, WanTransformer3D, abstract_wan_params
from jaxvc.train.state import unbox as strip_boxes

LORA_TARGETS = (r"blocks_\d+/attn[12]/to_(q|k|v|out_0)", r"patch_embedding",
                r"condition_embedder/text_embedder/linear_[12]", r"blocks_\d+/ffn/net_2")
DROP_MODES = ("full", "subset")


@dataclasses.dataclass(frozen=True)
class DisentangledS2VOptions:
    rank: int = 128
    alpha: float = 64.0
    lora_targets: tuple[str, ...] = LORA_TARGETS
    reference_time_lora: bool = True   # R's own modulation: a LoRA on time_proj enabled for the reference only
    cls_token: str = "<cls>"           # prefixed to every prompt; "" = none (the paper's "w/o <cls>" ablation)
    drop_mode: str = "full"
    drop_prob: float = 0.5             # video batches only: the reference stream (or each token) dropped
    drop_text_prob: float = 0.0
    flow_shift: float = 5.0            # Wan 2.1's sampling shift; training sigmas use the same
    lora_dropout: float = 0.0          # the LoRA's input dropout in training (v3 text: 0.2; the code's LoraConfig: 0)
    num_train_timesteps: int = 1000

    def __post_init__(self):
        if self.drop_mode not in DROP_MODES:
            raise ConfigError(f"disentangled_s2v: drop_mode={self.drop_mode!r} is not one of {DROP_MODES}")
        if not 0.0 <= self.drop_prob <= 1.0 or not 0.0 <= self.drop_text_prob <= 1.0:
            raise ConfigError(f"disentangled_s2v: drop_prob={self.drop_prob}, drop_text_prob={self.drop_text_prob} "
                             "must be probabilities")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> "DisentangledS2VOptions":
        values = dict(values or {})
        if "lora_targets" in values:
            values["lora_targets"] = tuple(values["lora_targets"])
        return options_from_mapping(cls, values, "disentangled_s2v")


class DisentangledS2V(PipelineValidation, Method):
    """Parameters: ``{"params": {"transformer", "text_encoder", "vae", "adapters": {"lora"},
    "reference_time_lora": {"down", "up"}}}`` (``vae`` absent in pixel space)."""
    name = "disentangled_s2v"
    init_in_parts = True  # init_params: the transformer, text encoder, VAE and adapters each their own program
    uses_reference = True
    flow_matching = True  # velocity outputs on flow sigmas: the flow samplers of jaxvc.diffusion.samplers

    def __init__(self, wan_config: WanConfig, text_config: CLIPTextConfig | T5EncoderConfig,
                 vae_config: VAEConfig | WanVAEConfig | None, options: DisentangledS2VOptions, tokenizer, *,
                 num_frames: int, image_size: int, pretrained: Mapping[str, Any] | None = None,
                 vae_chunk_frames: int | None = None, vae_tile: int | None = None, vae_tile_stride: int = 192):
        latent_channels = 3 if vae_config is None else vae_config.latent_channels
        if wan_config.in_channels != latent_channels or wan_config.out_channels != latent_channels:
            raise ValueError(f"disentangled_s2v: the DiT's in/out channels ({wan_config.in_channels}, "
                             f"{wan_config.out_channels}) must equal the latent channels ({latent_channels})")
        self.t5 = isinstance(text_config, T5EncoderConfig)  # Wan's UMT5; else a CLIP text encoder
        width = text_config.d_model if self.t5 else text_config.hidden_size
        if wan_config.text_dim != width:
            raise ValueError(f"disentangled_s2v: the DiT's text_dim {wan_config.text_dim} != the text encoder's width "
                             f"{width}")
        self.transformer = WanTransformer3D(wan_config)
        self.vae = None if vae_config is None else VideoVAE(vae_config, vae_chunk_frames, vae_tile, vae_tile_stride)
        self.latent_frames(num_frames)  # a Wan VAE codes 1 + 4k frames: refuse other lengths here
        self.options = options
        # the training frames: (height, width), square from an int
        multiple = (1 if self.vae is None else self.vae.downsample_factor) * wan_config.patch_size[1]
        self.num_frames = num_frames
        self.height, self.width = frame_size(image_size, multiple=multiple, owner=self.name)
        self.pretrained = dict(pretrained or {})
        self.spec = lora.AdapterSpec(include=options.lora_targets, rank=options.rank, alpha=options.alpha,
                                     dropout=options.lora_dropout)
        self.base_vocab_size = text_config.vocab_size
        self.tokenizer = tokenizer
        if options.cls_token:  # <cls>'s row in the (frozen) token table: transformers' resize_token_embeddings
            self.tokenizer = tokenizer.with_added_tokens([options.cls_token])
            # UMT5's table has spare rows past its tokenizer's ids: <cls> may already have one
            rows = max(text_config.vocab_size, self.tokenizer.added_tokens[options.cls_token] + 1)
            text_config = dataclasses.replace(text_config, vocab_size=rows)
        self.text_encoder = (T5Encoder if self.t5 else CLIPTextEncoder)(text_config)
        self.empty_prompt_tokens = jnp.asarray(self.tokenizer([""]), jnp.int32)  # (1, L): the negative prompt
        self.validation: list = []
        self.validation_settings: dict = {}

    def prompt(self, text: str) -> str:
        """What the text encoder reads: ``"<cls> " + text``."""
        return f"{self.options.cls_token} {text}".strip() if self.options.cls_token else text

    # ---------------------------------------------------------------- shapes and parameters
    @property
    def latent_frame_size(self) -> tuple[int, int]:
        """(h, w) of the latent grid the DiT patchifies."""
        factor = 1 if self.vae is None else self.vae.downsample_factor
        return self.height // factor, self.width // factor

    def latent_frames(self, frames: int) -> int:
        """Latent frames of a ``frames``-frame video: the same per-frame (pixels, SD VAE), 1 + (frames - 1) / 4
        with the Wan VAE."""
        return frames if self.vae is None else self.vae.latent_frames(frames)

    def _dit_example(self):
        cfg = self.transformer.config
        latents = jnp.zeros((1, 1, *self.latent_frame_size, cfg.in_channels))
        return latents, jnp.zeros((1,)), jnp.zeros((1, 1, cfg.text_dim))

    def lora_sites(self):
        return lora.find_sites(lambda: self.transformer.init(jax.random.key(0), *self._dit_example()), self.spec)

    def _reference_time_lora(self, rng):
        """{"down": (D, r) kaiming, "up": (r, 6D) zeros} on ``condition_embedder/time_proj`` (boxed)."""
        dim, rank = self.transformer.config.inner_dim, self.options.rank
        if rng is None:
            down, up = jax.ShapeDtypeStruct((dim, rank), jnp.float32), jax.ShapeDtypeStruct((rank, 6 * dim),
                                                                                            jnp.float32)
        else:
            down = jax.random.uniform(rng, (dim, rank), jnp.float32, -1.0, 1.0) / jnp.sqrt(dim)  # kaiming(a=sqrt 5)
            up = jnp.zeros((rank, 6 * dim), jnp.float32)
        return {"down": nn.LogicallyPartitioned(down, ("embed", None)),
                "up": nn.LogicallyPartitioned(up, (None, "mlp"))}

    def _text_example(self):
        return jnp.asarray(self.empty_prompt_tokens)

    def abstract_params(self):
        tree = {"transformer": abstract_wan_params(self.transformer.config)["params"],
                "text_encoder": (abstract_t5_params if self.t5 else abstract_clip_text_params)(
                    self.text_encoder.config)["params"]}
        if self.vae is not None:
            tree["vae"] = self.vae.abstract_params()
        sites = self.lora_sites()
        tree["adapters"] = {"lora": jax.eval_shape(lambda: lora.init_adapter(jax.random.key(0), sites, self.spec,
                                                                               boxed=True))}
        if self.options.reference_time_lora:
            tree["reference_time_lora"] = self._reference_time_lora(None)
        return {"params": tree}

    def init_params(self, rng):
        rngs = jax.random.split(rng, 5)
        fresh = {"transformer": (rngs[0], lambda r: self.transformer.init(r, *self._dit_example())),
                 "text_encoder": (rngs[1], lambda r: self.text_encoder.init(r, self._text_example()))}
        # loaded weights replace a component's init, which is then not run (UMT5-XXL alone is 5.7B parameters);
        # a fresh one is its own program (init_program)
        tree = {name: self.pretrained[name] if name in self.pretrained
                else init_program(self, name, lambda r, make=make: nn.unbox(make(r))["params"])(component_rng)
                for name, (component_rng, make) in fresh.items()}
        if self.vae is not None:
            tree["vae"] = self.pretrained["vae"] if "vae" in self.pretrained else init_program(
                self, "vae", self.vae.init)(rngs[2])
        tree["text_encoder"] = self._resized_token_table(tree["text_encoder"])

        def extras(rngs):
            added = {"adapters": {"lora": strip_boxes(lora.init_adapter(rngs[3], self.lora_sites(), self.spec,
                                                                        boxed=True))}}
            if self.options.reference_time_lora:
                added["reference_time_lora"] = strip_boxes(self._reference_time_lora(rngs[4]))
            return added
        tree.update(extras(rngs) if self.pretrained else init_program(self, "extras", extras)(rngs))
        return {"params": tree}

    def _resized_token_table(self, text_params):
        """Loaded text weights whose token table lacks <cls>'s row get one, the mean of its rows (transformers'
        mean-resizing); a table that already has the row (a fresh init, UMT5's spare rows) is left as it is."""
        path = ("shared",) if self.t5 else ("embeddings", "token_embedding")
        node = text_params
        for key in path:
            node = node[key]
        table, rows = node["embedding"], self.text_encoder.config.vocab_size
        if table.shape[0] == rows:
            return text_params
        resized = jnp.concatenate([table, jnp.broadcast_to(table.mean(axis=0, keepdims=True),
                                                           (rows - table.shape[0], table.shape[1]))], axis=0)
        if self.t5:
            return {**text_params, "shared": {"embedding": resized}}
        return {**text_params, "embeddings": {**text_params["embeddings"], "token_embedding": {"embedding": resized}}}

    def trainable(self, path: tuple[str, ...]) -> bool:
        return len(path) >= 2 and path[1] in ("adapters", "reference_time_lora")

    def exported_adapters(self, params):
        """``jaxvc export-lora``: the DiT's LoRA (diffusers' names); the reference's time LoRA has no diffusers
        counterpart and stays in the run."""
        return ({"transformer": lora.AppliedAdapter(self.spec, params["params"]["adapters"]["lora"])},
                ["reference_time_lora"] if self.options.reference_time_lora else [])

    # ---------------------------------------------------------------- the model
    def encode_text(self, params, tokens):
        """tokens (B, L), ``<cls>`` included -> (B, L, D); the text encoder is frozen. UMT5's states are zero past
        each prompt's ``</s>``, as Wan's pipelines feed them."""
        variables = {"params": params["params"]["text_encoder"]}
        if self.t5:
            mask = self.tokenizer.attention_mask(tokens)
            states = self.text_encoder.apply(variables, tokens, mask) * mask[..., None]
        else:
            states = self.text_encoder.apply(variables, tokens)["last_hidden_state"]
        return jax.lax.stop_gradient(states)

    def with_cls(self, tokens):
        """Caption ids (B, L) as the data gives them -> the ids of "<cls> " + caption (inserted after BOS; a full
        sequence loses its last word, never its EOS)."""
        if not self.options.cls_token:
            return tokens
        cls_id = self.tokenizer.added_tokens[self.options.cls_token]
        start = 0 if self.tokenizer.bos_token_id is None else 1  # after CLIP's BOS; T5 has none
        shifted = jnp.concatenate([tokens[:, :start], jnp.full_like(tokens[:, :1], cls_id), tokens[:, start:-1]],
                                  axis=1)
        eos = self.tokenizer.eos_token_id
        last = jnp.where(tokens[:, -1:] == eos, eos, shifted[:, -1:])  # a full sequence keeps its EOS
        return jnp.concatenate([shifted[:, :-1], last], axis=1)

    def encode_pixels(self, params, video):
        if self.vae is None:
            return video
        return jax.lax.stop_gradient(self.vae.encode({"params": params["params"]["vae"]}, video))

    def decode_latents(self, params, latents):
        if self.vae is None:
            return jnp.clip(latents, -1.0, 1.0)
        return self.vae.decode({"params": params["params"]["vae"]}, latents)

    def reference_time_delta(self, params):
        """silu(temb) (B, D) -> the reference's LoRA addition to the time projection (B, 6D), or None."""
        if not self.options.reference_time_lora:
            return None
        pair = params["params"]["reference_time_lora"]
        scaling = self.options.alpha / self.options.rank
        return lambda h: scaling * (h @ pair["down"].astype(h.dtype)) @ pair["up"].astype(h.dtype)

    def velocity(self, params, noisy, timesteps, text, reference_latent, reference_mask=None, dropout_rng=None):
        """The DiT with its LoRA: (B, F, h, w, c) + reference (B, 1, h, w, c) -> the velocity (B, F, h, w, c);
        ``dropout_rng`` (training) applies ``options.lora_dropout``."""
        adapter = lora.AppliedAdapter(self.spec, params["params"]["adapters"]["lora"], dropout_rng=dropout_rng)
        with lora.applied([adapter]):
            return self.transformer.apply({"params": params["params"]["transformer"]}, noisy, timesteps, text,
                                          reference_latent=reference_latent, reference_mask=reference_mask,
                                          reference_time_delta=self.reference_time_delta(params))

    # ---------------------------------------------------------------- the loss
    def reference_mask(self, rng, batch_size: int, reference_tokens: int):
        """Which reference tokens a video batch keeps: all or none per example ("full"), or each token ("subset")."""
        opts = self.options
        if opts.drop_mode == "full":
            keep = jax.random.uniform(rng, (batch_size, 1)) >= opts.drop_prob
            return jnp.broadcast_to(keep, (batch_size, reference_tokens))
        return jax.random.uniform(rng, (batch_size, reference_tokens)) >= opts.drop_prob

    def loss(self, params, batch, rng):
        """Flow matching on the batch's task: a 1-frame target is the identity task (image pairs), a longer one
        the motion task (videos, reference tokens dropped). The task is the batch's shape, so each has its own
        compiled step."""
        opts = self.options
        rng_sigma, rng_noise, rng_drop, rng_text = jax.random.split(rng, 4)
        latents = self.encode_pixels(params, batch["video"])  # (B, F, h, w, c)
        reference = self.encode_pixels(params, batch["reference"][:, None])  # (B, 1, h, w, c), clean
        batch_size, frames = latents.shape[:2]
        tokens = self.with_cls(batch["tokens"])
        drop_text = jax.random.uniform(rng_text, (batch_size,)) < opts.drop_text_prob
        tokens = jnp.where(drop_text[:, None], self.empty_prompt_tokens, tokens)
        text = self.encode_text(params, tokens)

        is_video = frames > 1
        mask = None
        if is_video:
            p_t, p_h, p_w = self.transformer.config.patch_size
            count = (reference.shape[2] // p_h) * (reference.shape[3] // p_w) // p_t
            mask = self.reference_mask(rng_drop, batch_size, count)
        sigma, timesteps = sample_flow_sigmas(rng_sigma, batch_size, shift=opts.flow_shift,
                                              num_train_timesteps=opts.num_train_timesteps)
        noise = jax.random.normal(rng_noise, latents.shape, latents.dtype)
        noisy = flow_add_noise(latents, noise, sigma)
        dropout_rng = jax.random.fold_in(rng, 5) if opts.lora_dropout else None  # (the other keys as without it)
        prediction = self.velocity(params, noisy, timesteps, text, reference, mask, dropout_rng=dropout_rng)
        loss = jnp.mean(jnp.square(prediction.astype(jnp.float32) - flow_target(latents, noise)))
        kept = jnp.mean(mask.astype(jnp.float32)) if mask is not None else jnp.asarray(1.0)
        return loss, {"flow_loss": loss, "video_task": jnp.asarray(float(is_video)), "reference_kept": kept}

    # ---------------------------------------------------------------- sampling
    def scheduler_config(self) -> dict:
        return {"shift": self.options.flow_shift, "num_train_timesteps": self.options.num_train_timesteps}

    def pipeline(self, params, tokenizer=None):
        from jaxvc.dit_pipeline import SubjectDiTPipeline

        return SubjectDiTPipeline(self, params, tokenizer or self.tokenizer)

    def example_batch(self, batch_size: int):
        size = self.frame_size
        return {"video": jax.ShapeDtypeStruct((batch_size, self.num_frames, *size, 3), jnp.float32),
                "reference": jax.ShapeDtypeStruct((batch_size, *size, 3), jnp.float32),
                "tokens": jax.ShapeDtypeStruct((batch_size, self.empty_prompt_tokens.shape[1]), jnp.int32)}


def from_config(config) -> DisentangledS2V:
    """Build the method from ``configs/disentangled_s2v.py``: named sizes, or local files: a diffusers Wan pipeline
    folder (``config.model.pretrained``: its ``transformer/``, ``text_encoder/``, ``tokenizer/`` and ``vae/``), or
    each part on its own (``config.model.transformer``, ``text_encoder`` + ``tokenizer``: transformers folders,
    ``vae``: a Wan VAE folder or the original ``Wan2.1_VAE.pth``); a part given on its own wins."""
    from pathlib import Path

    from jaxvc.methods.video_base import configure_validation
    from jaxvc.models.tokenizer import load_tokenizer
    from jaxvc.models.wan import wan_config
    from jaxvc.train.compute import compute_dtype

    model = config.model
    dtype = compute_dtype(config.get("compute_dtype", "float32"))
    remat = config.get("remat_policy", "none") or "none"
    parts = {name: model.get(name) or "" for name in ("transformer", "text_encoder", "tokenizer", "vae")}
    if model.get("pretrained"):
        root = Path(model.pretrained)
        if not root.is_dir():
            raise FileNotFoundError(f"config.model.pretrained: {root} is not a diffusers Wan pipeline folder")
        parts = {name: value or (str(root / name) if (root / name).is_dir() else "") for name, value in parts.items()}
    pretrained = {}
    if parts["vae"]:
        from jaxvc.convert.wan_vae import load_wan_vae

        vae, weights = load_wan_vae(parts["vae"], allow_pickle=bool(model.get("allow_pickle", False)))
        pretrained["vae"] = weights["params"]
    else:
        vae = video_vae_config(model.vae_variant)
    channels = 3 if vae is None else vae.latent_channels
    if parts["text_encoder"]:  # Wan's UMT5 (or any T5 encoder) from a transformers folder
        from jaxvc.convert.t5 import load_t5_encoder
        from jaxvc.models.t5_tokenizer import T5Tokenizer

        if not parts["tokenizer"]:
            raise ConfigError("config.model.text_encoder needs config.model.tokenizer (the pipeline's tokenizer/)")
        text, weights = load_t5_encoder(parts["text_encoder"], dtype=dtype)
        pretrained["text_encoder"] = weights["params"]
        tokenizer = T5Tokenizer.from_folder(parts["tokenizer"], max_length=model.get("max_text_length", 512))
        width = text.d_model
    elif not model.get("text_variant"):
        raise ConfigError("disentangled_s2v: this variant reads Wan's UMT5 text encoder from files: set "
                         "config.model.pretrained (a diffusers Wan pipeline folder) or config.model.text_encoder and "
                         "config.model.tokenizer")
    else:
        text = CLIPTextConfig.variant(model.text_variant)
        tokenizer, width = load_tokenizer(parts["tokenizer"] or None), text.hidden_size
    overrides = dict(dtype=dtype, remat=remat, attention_backend=model.get("attention_backend", "xla") or "xla")
    if parts["transformer"]:
        from jaxvc.convert.wan import load_wan

        wan, weights = load_wan(parts["transformer"], **overrides)
        pretrained["transformer"] = weights["params"]
    else:
        wan = wan_config(model.transformer_variant, in_channels=channels, out_channels=channels,
                         text_dim=width, **overrides)
    method = DisentangledS2V(wan, text, vae, DisentangledS2VOptions.from_mapping(model.options.to_dict()),
                             tokenizer, num_frames=model.num_frames, image_size=model_frame_size(model),
                             pretrained=pretrained, vae_chunk_frames=model.get("vae_chunk_frames") or None,
                             vae_tile=model.get("vae_tile") or None, vae_tile_stride=model.get("vae_tile_stride", 192))
    method.init_params_jittable = not pretrained
    configure_validation(method, config)
    return method
