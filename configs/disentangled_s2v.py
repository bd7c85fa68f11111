"""Disentangled identity/motion S2V (jaxvc/methods/disentangled_s2v.py) on the Wan video DiT: LoRA trained by
stochastic task switching between image pairs (identity) and videos (motion, reference tokens dropped half the time).

Variants (``--config configs/disentangled_s2v.py:<variant>``):
  tiny   the tiny Wan DiT, CLIP text encoder and per-frame VAE on the synthetic subject world (CPU tests)
A real-size variant needs the Wan 2.x VAE and the UMT5 text encoder, which jaxvc does not have yet; the DiT itself
loads from local files (``--config.model.transformer=/Wan2.1-T2V-1.3B-Diffusers/transformer``).
Generate: ``jaxvc generate --model RUN --reference subject.png --prompt "..." --steps 50 --guidance-scale 6``.
"""
from ml_collections import ConfigDict

from jaxvc import config_sections


def get_config(variant=None):
    variant = variant or "tiny"
    config = ConfigDict()
    config.method = "disentangled_s2v"
    config.seed = 0
    config.steps = 4000  # [C] checkpoint-4000
    config.batch_size = 8
    config.workdir = ""

    config.model = ConfigDict()
    config.model.transformer_variant = "tiny"  # jaxvc/models/wan.py WAN_VARIANTS
    config.model.transformer = ""  # a diffusers transformer/ folder or an original Wan file (overrides the variant)
    config.model.attention_backend = "xla"
    config.model.text_variant = "tiny"  # a CLIP text encoder of jaxvc's size table, unless text_encoder is given
    config.model.text_encoder = ""  # a transformers T5/UMT5 encoder folder (Wan: the pipeline's text_encoder/)
    config.model.tokenizer = ""  # with text_encoder: its tokenizer folder (Wan: tokenizer/); else a CLIP one or ""
    config.model.max_text_length = 512  # T5 tokens per prompt (Wan's pipelines: 512)
    config.model.vae_variant = "tiny"
    config.model.num_frames = 8
    config.model.image_size = 32
    config.model.options = ConfigDict(dict(
        rank=128, alpha=64.0, reference_time_lora=True, cls_token="<cls>", drop_mode="full", drop_prob=0.5,
        drop_text_prob=0.0, flow_shift=5.0, num_train_timesteps=1000))

    # stochastic task switching: each batch is image pairs (identity, 1-frame targets) or videos (p = 0.2)
    config.data = config_sections.stream_data(config, {"image": "synthetic:pairs", "video": "synthetic:videos"})
    config.data.weights = ConfigDict({"image": 0.8, "video": 0.2})
    config.data.switch = True
    config.data.image_frames = 1
    config.data.reference = "candidates"  # [C] a random one of the frames 0, 9, 18, 27, 36, 45 of the clip
    config.data.reference_candidates = (0, 9, 18, 27, 36, 45)

    config.optim = config_sections.optim(lr=5e-5)  # [C] AdamW 5e-5, betas (0.9, 0.95), wd 1e-4
    config.optim.b2 = 0.95
    config.optim.weight_decay = 1e-4
    config.optim.schedule = "warmup_cosine"  # [C] cosine_with_restarts, 1 cycle
    config.optim.warmup_steps = 200
    config_sections.add_run_sections(config, checkpoint_every=500, validation_steps=50, guidance_scale=6.0)

    if variant == "tiny":
        config_sections.make_tiny(config)
        config.model.options.rank = 4
        config.model.options.alpha = 2.0
        config.data.reference = "random"  # the 4-frame clips hold only candidate 0
        config.optim.lr = 1e-3
        config.optim.warmup_steps = 0
    else:
        raise ValueError(f"configs/disentangled_s2v.py: unknown variant '{variant}' (tiny)")
    return config
