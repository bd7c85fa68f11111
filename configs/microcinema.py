"""MicroCinema (jaxvc/methods/microcinema.py): image & text to video, the image being the video's center frame,
through AppearNet (an encoder copy injected into the UNet) and the appearance noise prior.

Variants (``--config configs/microcinema.py:<variant>``):
  tiny   the tiny UNet / VAE / CLIP on the synthetic subject world's videos (CPU tests)
  sd15   SD1.5 + AnimateDiff from local files, captioned videos at 512x512, 16 frames:
           --config.model.pretrained=/sd15 --config.model.motion_adapter=/animatediff-v3
           --config.data.streams.video=folder:/webvid-like-clips   (or packed:/shards from `jaxvc pack`)
Generate: ``jaxvc generate --model RUN --reference center.png --prompt "..."`` (the run's DDIM 50 steps, CFG 7.5)
(the reference image is the center frame: a subject-personalised T2I sample, or a photo of the subject).
"""
from ml_collections import ConfigDict

from jaxvc import config_sections


def get_config(variant=None):
    variant = variant or "tiny"
    config = ConfigDict()
    config.method = "microcinema"
    config.seed = 0
    config.steps = 100_000  # [G]
    config.batch_size = 8
    config.workdir = ""

    config.model = config_sections.unet_model(vae_variant="tiny", num_frames=8, image_size=32)
    config.model.options = ConfigDict(dict(
        noise_prior_train=0.03, noise_prior_inference=0.02, inject_decoder=True, center_frame="middle",
        train_motion_modules=True, train_all_unet=False, train_text_encoder=False, drop_both_prob=0.1,
        drop_text_prob=0.0, drop_image_prob=0.0, prediction_type="epsilon", beta_schedule="scaled_linear",
        beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000))

    config.data = config_sections.stream_data(config, {"video": "synthetic:videos"})
    config.data.clip_position = "random"
    config.data.frame_stride = 1

    config.optim = config_sections.optim(lr=1e-4)  # [G] AdamW 1e-4 (METHODS.md (d))
    config_sections.add_run_sections(config, checkpoint_every=5000, validation_steps=50, guidance_scale=7.5)

    if variant == "tiny":
        config_sections.make_tiny(config)
    elif variant == "sd15":
        config.model.unet_variant = "sd15"
        config.model.requires_pretrained = True  # SD1.5 + AnimateDiff from model.pretrained
        config.model.text_variant = "sd15"
        config.model.vae_variant = "sd"
        config.model.num_frames = 16
        config.model.image_size = 512
        config.batch_size = 8
        config.remat_policy = "full"
        config.compute_dtype = "bfloat16"
        config.frozen_dtype = "bfloat16"  # frozen matrices stored rounded: half their memory
        config.log_every = 50
        config.data.streams = ConfigDict({"video": ""})  # folder:/path or packed:/path, required
        config.data.frame_stride = 4
        config.mesh = ConfigDict({"data": 1, "fsdp": -1, "tensor": 1, "sequence": 1})
    else:
        raise ValueError(f"configs/microcinema.py: unknown variant '{variant}' (tiny, sd15)")
    return config
