"""VideoMaker (jaxvc/methods/videomaker.py): reference-injected self-attention (PISA) + GIRL.

Variants (``--config configs/videomaker.py:<variant>``):
  demo    a tiny pixel-space model trained from scratch on the synthetic subject world (what `jaxvc demo` runs):
          32x32, 4 frames, x0-prediction, every UNet weight trains (there is no pretrained base to fine-tune)
  tiny    the same tiny UNet in the latent space of a tiny VAE (CPU tests of the latent path)
  sd15    the paper's setting: SD1.5 + AnimateDiff v1-5-3 (v3 layout) loaded from local files
          (--config.model.pretrained=/path/to/sd15-folder --config.model.motion_adapter=/path/to/adapter),
          16 frames at 512x512, spatial self-attention + motion modules train, AdamW lr 1e-5, wd 1e-2
Ablations of the paper's Table are switches: --config.model.options.girl=False,
--config.model.options.reference_cross_attention=False, --config.model.options.train_motion_modules=False.
"""
from ml_collections import ConfigDict, config_dict

from jaxvc import config_sections


def get_config(variant=None):
    variant = variant or "demo"
    config = ConfigDict()
    config.method = "videomaker"
    config.seed = 0
    config.steps = 600
    config.batch_size = 8
    config.workdir = ""

    config.model = config_sections.unet_model(vae_variant="none", num_frames=8, image_size=32)
    config.model.options = ConfigDict(dict(
        girl=True, girl_alpha=0.01, girl_beta=0.1, reference_cross_attention=True,
        train_spatial_self_attention=True, train_motion_modules=True, train_all_unet=False, train_text_encoder=False,
        drop_both_prob=0.1, drop_text_prob=0.0, drop_reference_prob=0.0, prediction_type="epsilon",
        # [C] the authors train and sample with DDIMScheduler(beta_schedule="linear") over the SD folder's
        # 0.00085 -> 0.012 (AnimateDiff's convention), not SD1.5's scaled_linear
        beta_schedule="linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000,
        snr_gamma=config_dict.placeholder(float), loss_weighting=config_dict.placeholder(str),
        loss_weight_max=config_dict.placeholder(float), timestep_bias_strategy="none", timestep_bias_multiplier=1.0,
        timestep_bias_portion=0.25))

    config.data = ConfigDict()
    config.data.source = "synthetic"  # synthetic | packed
    config.data.paths = ()  # packed: ArrayRecord shard globs; synthetic: unused
    config.data.caption_name = "a subject"  # synthetic: captions leave the identity to the reference image ("": they
    # describe the subject in words, "a red striped star moves left ...")
    config.data.motions = ()  # synthetic: train on these motions only (jaxvc/data/synthetic.py MOTIONS); () = all
    config.data.num_subjects = 64
    config.data.held_out = 8
    config.data.seed = 0
    config.data.workers = 0
    # a random frame of the clip, highlighted by its mask; "provided": the record's own reference images
    # (VideoBooth's segmented subjects, `<stem>.ref.png` beside each video for `jaxvc pack`)
    config.data.reference = "random"
    config.data.frame_stride = 1
    config.data.placement = "random"  # synthetic: "centered" centres every clip's motion path on the image
    config.data.angle_range = (0.0, 360.0)  # synthetic: orientations sprites are drawn in; (0, 0) = upright
    config.data.pattern_scale = 1.0  # synthetic: patterns drawn this many times coarser (2: about a 4x4 token wide)
    config.data.center_reference = False  # move the highlighted subject to the centre of the reference image

    config.optim = config_sections.optim(lr=1e-5)
    config_sections.add_run_sections(config, checkpoint_every=200, validation_steps=30)  # DDIM 30, CFG 8

    if variant == "demo":
        # 32x32 pixels as 8x8 positions of 4x4 blocks (48 channels); PISA and cross-attention run at 8x8 and 4x4, the
        # 2x2 level is a plain ResNet level. 4 frames: about 64 ms per clip on 2 CPU cores at batch 4 or 8 (batch 2:
        # 77 ms). Twice the steps at half the batch, same time: held-out with reference, batch 4 x 2400 against
        # batch 8 x 1200 gave colour accuracy 0.84 / 0.74, appearance 0.34 / 0.33, alignment 0.91 / 0.88, fidelity
        # 0.047 / 0.008 (no reference 0.008 / 0.000); at lr 2e-3 batch 4 was no better (0.85 / 0.33 / 0.81 / 0.031).
        # Tried the same session: 2x2 patches with a 32-channel 16x16 ResNet level on top (1.6x the step time, 800
        # steps): the caption was no longer learnt (alignment 0.19); EMA 0.995 of batch-8 weights: fidelity 0.023,
        # the same with no reference.
        config.steps = 2400
        config.batch_size = 4
        config.checkpoint.every = 400
        config.model.num_frames = 4
        config.model.pixel_patch = 4
        config.model.unet_overrides = ConfigDict(dict(
            block_out_channels=(64, 64, 64), layers_per_block=1, attention_heads=4, norm_num_groups=8,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")))
        # The reference is a frame of the clip with the subject highlighted; centred, it no longer tells where the
        # subject is in that frame (uncentred, the model painted the subject at the reference's place in every
        # frame). References at inference are centred views too.
        config.data.center_reference = True
        config.model.options.train_all_unet = True
        config.model.options.beta_schedule = "squaredcos_cap_v2"  # pixel space: cosine schedule
        # The model predicts the clean sample (x0). Measured after 600 steps on held-out clips (x0 MSE at t=500 /
        # t=700): epsilon-prediction never left noise; v-prediction 0.073 / 0.087, no better than the clip's mean
        # colour (0.075), and its samples kept pixel noise; x0-prediction 0.023 / 0.032 with clean samples. It also
        # makes GIRL's reference loss learnable: at t' = 0.01 t the v target is almost pure noise (loss stayed ~1).
        config.model.options.prediction_type = "sample"
        config.model.options.drop_reference_prob = 0.1  # learn text-only generation too (the baseline)
        # Motion from the prompt (issue 5). The caption only matters at the noisiest steps, where the frames show
        # nothing yet; there the spatial cross-attention cannot read it (its queries are computed from pure noise:
        # trained only at t >= 990, swapping "left" for "right" changed its x0 error by 0.0002). Three changes let
        # the caption decide the layout: the pooled caption joins the timestep embedding and scales/shifts every
        # resnet's norm (text time embedding + scale_shift: trained at t >= 990, the right caption's x0 error is
        # 0.057 against 0.070 for the opposite one), each frame is told its index and each pixel its position, and
        # 30% of the training samples sit in the noisiest 5% of timesteps (8x weight there). Clips are centred on
        # the image and the demo trains on the four translations it is scored on. The weight trades motion for
        # appearance (held-out, with reference; alignment / colour accuracy / appearance similarity): 20x gave
        # 1.00 / 0.60 / 0.24, 8x 0.88 / 0.74 / 0.33; uniform timesteps never learnt the caption (alignment 0.09).
        config.data.motions = ("left", "right", "up", "down")
        config.data.placement = "centered"
        config.model.unet_overrides.motion_frame_time_embedding = True
        config.model.unet_overrides.spatial_position_embedding = True
        config.model.unet_overrides.addition_embed_type = "text"
        config.model.unet_overrides.addition_embed_type_num_heads = 4
        config.model.unet_overrides.resnet_time_scale_shift = "scale_shift"
        config.model.options.timestep_bias_strategy = "later"
        config.model.options.timestep_bias_portion = 0.05
        config.model.options.timestep_bias_multiplier = 8.0
        # Session 8 (held-out, with / without reference, two sets of sampling seeds): the reference frame without the
        # position embedding (PISA then matches its tokens by content; with it, the model leaned on same-place
        # copying, wrong for a moving subject) raised colour accuracy 0.84 -> 0.94 / 0.91 and appearance 0.34 ->
        # 0.41 / 0.42. The x0 loss weighted by min(1 / (1 - ab_t), 5) (as a v-loss weighs it, capped) sharpened the
        # denoiser: from real clips noised to t = 100 / 300 its x0 estimates were classified right (exact subject)
        # 0.56 / 0.41 of the time against 0.27 / 0.20 unweighted, and alignment went 0.88 / 0.75 -> 0.97 / 0.91.
        # Neither made the model copy the reference's *shape* (shape accuracy stays at chance, 1/7); nor did 2-D
        # rotary positions in the spatial self-attention (spatial_rope_theta=16: appearance 0.46 / 0.44, shape 0.16
        # / 0.13, 4.6% slower), which would let a frame read the reference shifted to where its subject is.
        config.model.unet_overrides.position_free_reference = True
        config.model.unet_overrides.reference_time_embedding = False
        config.model.options.loss_weighting = "inverse_one_minus_alpha_bar"
        config.model.options.loss_weight_max = 5.0
        config.optim.lr = 1e-3
        config.optim.schedule = "warmup_cosine"
        config.optim.warmup_steps = 50
        config.optim.end_lr_ratio = 0.1
    elif variant == "tiny":
        config.model.vae_variant = "tiny"
        config.model.options.train_all_unet = True
        config.optim.lr = 1e-3
    elif variant == "sd15":
        config.model.unet_variant = "sd15"
        config.model.requires_pretrained = True  # SD1.5 + AnimateDiff from model.pretrained
        config.model.text_variant = "sd15"
        config.model.vae_variant = "sd"
        config.model.num_frames = 16
        config.model.image_size = 512
        config.batch_size = 4
        config.steps = 150_000
        config.checkpoint.every = 1000
        config.log_every = 50
        config.remat_policy = "full"
        config.compute_dtype = "bfloat16"
        config.frozen_dtype = "bfloat16"  # frozen matrices stored rounded: half their memory
        config.data.source = "packed"
        config.data.frame_stride = 8
        config.mesh = ConfigDict({"data": 1, "fsdp": -1, "tensor": 1, "sequence": 1})
        # fsdp all-gathers every layer's weights and reduce-scatters its gradients: let XLA run those collectives
        # asynchronously, fused and overlapped with the neighbouring layers' compute (checked against the pinned
        # libtpu, launch/requirements-libtpu.txt, in tests/test_launch.py; unknown flags abort libtpu at start-up)
        config.launch.libtpu_init_args = (
            "--xla_tpu_enable_async_collective_fusion=true",
            "--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true",
            "--xla_tpu_enable_async_collective_fusion_multiple_steps=true",
            "--xla_tpu_overlap_compute_collective_tc=true",
            "--xla_enable_async_all_gather=true",
            "--xla_tpu_enable_data_parallel_all_reduce_opt=true",
            "--xla_tpu_data_parallel_opt_different_sized_ops=true",
        )
        config.launch.gpu_xla_flags = ("--xla_gpu_enable_latency_hiding_scheduler=true",)
    else:
        raise ValueError(f"configs/videomaker.py: unknown variant '{variant}' (demo, tiny, sd15)")
    return config
