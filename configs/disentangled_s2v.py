"""Disentangled identity/motion S2V (jaxvc/methods/disentangled_s2v.py) on the Wan video DiT: LoRA trained by
stochastic task switching between image pairs (identity) and videos (motion, reference tokens dropped half the time).

Variants (``--config configs/disentangled_s2v.py:<variant>``):
  tiny         the tiny Wan DiT, a tiny Wan video VAE and a tiny CLIP text encoder on the synthetic world (CPU tests)
  wan21_1.3b   Wan 2.1 T2V 1.3B, its UMT5-XXL and its video VAE, all from a local diffusers pipeline folder:
               ``--config.model.pretrained=/path/Wan2.1-T2V-1.3B-Diffusers`` (each part can also be given on its
               own: ``model.transformer``, ``model.text_encoder`` + ``model.tokenizer``, ``model.vae``); data from
               packed or folder streams (``--config.data.streams.image=packed:/pairs --config.data.streams.video=
               packed:/videos``, see ``jaxvc pack``). 49 frames (1 + 4 x 12, the paper's clip length) at 8 fps
               (``data.target_fps``: each video's stride from its own fps) and 480 x 480.
Generate: ``jaxvc generate --model RUN --reference subject.png --prompt "..."`` (the run's 50 Euler steps, CFG 6).
"""
from ml_collections import ConfigDict, config_dict

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
    config.model.pretrained = ""  # a diffusers Wan pipeline folder: transformer/, text_encoder/, tokenizer/, vae/
    config.model.vae_variant = "wan21"  # jaxvc/models/video_vae.py: wan_tiny, wan21, wan22 (or SD sizes, none)
    config.model.vae = ""  # a diffusers Wan vae/ folder or the original Wan2.1_VAE.pth (overrides the variant)
    config.model.allow_pickle = False  # read .pth weight files (a restricted unpickler)
    config.model.vae_chunk_frames = 4  # frames per step of the VAE's streaming scan (bounded memory); 0: all at once
    config.model.vae_tile = 0  # > 0: the Wan VAE codes frames in spatial tiles of this many px (diffusers: 256)
    config.model.vae_tile_stride = 192  # ... every this many px
    config.model.num_frames = 49
    config.model.image_size = 32  # the frames' height, and their width unless image_width is set
    config.model.image_width = config_dict.placeholder(int)  # None: square; the paper trains 480 x 720
    config.model.options = ConfigDict(dict(
        rank=128, alpha=64.0, reference_time_lora=True, cls_token="<cls>", drop_mode="full", drop_prob=0.5,
        drop_text_prob=0.0, flow_shift=5.0, num_train_timesteps=1000,
        lora_dropout=0.0))  # [C] LoraConfig has no dropout; the v3 text says 0.2

    # stochastic task switching: each batch is image pairs (identity, 1-frame targets) or videos (p = 0.2)
    config.data = config_sections.stream_data(config, {"image": "synthetic:pairs", "video": "synthetic:videos"})
    config.data.weights = ConfigDict({"image": 0.8, "video": 0.2})
    config.data.switch = True
    # [C] 8 image pairs but 6 videos per GPU: global sizes here, a video batch 3/4 of batch_size's
    # (--config.batch_size=256 is the authors' 32 GPUs x 8 pairs / x 6 videos); each can be set on its own
    batch_size = config.get_ref("batch_size")
    config.data.batch_sizes = ConfigDict({"image": batch_size, "video": batch_size * 3 // 4})
    config.data.image_frames = 1
    # [P] 49 frames @ 8 fps: each video's frame stride is round(its fps / 8) (24 fps: 3, 30 fps: 4), so every clip
    # spans about 6 s whatever its source's rate (the synthetic world's videos are 8 fps: stride 1). frame_stride:
    # records without an fps, or every record with target_fps=0 (how a run saved before target_fps existed resumes:
    # --config.data.target_fps=0 --config.data.frame_stride=2 for the old wan21_1.3b)
    config.data.target_fps = 8.0
    config.data.frame_stride = 1
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
        config.model.num_frames = 5  # the Wan VAE codes 1 + 4k frames
        config.model.vae_variant = "wan_tiny"
        config.model.vae_chunk_frames = 0
        config.model.options.rank = 4
        config.model.options.alpha = 2.0
        config.data.reference = "random"  # the 4-frame clips hold only candidate 0
        config.optim.lr = 1e-3
        config.optim.warmup_steps = 0
    elif variant == "wan21_1.3b":
        config.model.transformer_variant = "wan21_t2v_1.3b"  # sizes only: the weights come from model.pretrained
        config.model.text_variant = ""  # UMT5-XXL from the pipeline folder (required)
        config.model.image_size = 480
        config.batch_size = 8
        config.remat_policy = "full"
        config.compute_dtype = "bfloat16"
        config.frozen_dtype = "bfloat16"  # frozen matrices stored rounded: half their memory
        config.log_every = 50
        config.data.streams = ConfigDict({"image": "", "video": ""})  # packed:/path or folder:/path, required
        config.mesh = ConfigDict({"data": 1, "fsdp": -1, "tensor": 1, "sequence": 1})
    else:
        raise ValueError(f"configs/disentangled_s2v.py: unknown variant '{variant}' (tiny, wan21_1.3b)")
    return config
