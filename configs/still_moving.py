"""Still-Moving (jaxvc/methods/still_moving.py): a customized T2I model in AnimateDiff through adapters trained on
frozen videos. Two runs: stage "motion" once per base model, then stage "spatial" per customization.

Variants (``--config configs/still_moving.py:<variant>``):
  tiny          the tiny UNet / VAE / CLIP on the synthetic subject world's images (CPU tests of both stages)
  sd15          stage "motion" on SD1.5 + AnimateDiff from local files: frozen videos made from a folder of images
                of the base T2I's domain (with captions) at 512x512, 16 frames
                  --config.model.pretrained=/sd15 --config.model.motion_adapter=/animatediff-v3
                  --config.data.streams.image=folder:/images-with-captions
  sd15_spatial  stage "spatial": the customization (a DreamBooth LoRA file, or a fine-tuned pipeline folder as
                model.pretrained), the stage-motion run, and ~40 images sampled from the customized T2I
                  --config.model.options.customization_lora=/my-dog-lora.safetensors
                  --config.model.options.motion_adapter=/runs/still-moving-motion
                  --config.data.streams.image=folder:/my-dog-samples
                prior preservation (off by default, [G]): frozen videos of the *original* T2I's samples of the class
                mixed in at an equal rate: --config.data.streams.prior=folder:/dog-class-samples
Generate from the stage-"spatial" run: ``jaxvc generate --model RUN --prompt "a [V] dog running on the beach"``
(no reference image: the subject is in the weights; the motion adapter is removed, as in the paper).
"""
from ml_collections import ConfigDict, config_dict

from jaxvc import config_sections


def get_config(variant=None):
    variant = variant or "tiny"
    config = ConfigDict()
    config.method = "still_moving"
    config.seed = 0
    config.steps = 2000
    config.batch_size = 4
    config.workdir = ""

    config.model = config_sections.unet_model(vae_variant="tiny", num_frames=8, image_size=32)
    config.model.options = ConfigDict(dict(
        stage="motion", motion_rank=32, motion_alpha=config_dict.placeholder(float), spatial_rank=64,
        motion_adapter="", customization_lora="", customization_scale=1.0, freeze_frames=True, drop_text_prob=0.0,
        inference_motion_scale=0.0, prediction_type="epsilon", beta_schedule="scaled_linear", beta_start=0.00085,
        beta_end=0.012, num_train_timesteps=1000))

    # Frozen videos: each image example of the stream repeated over the frames (jaxvc/data/pipeline.py); the method
    # also freezes whatever it gets (options.freeze_frames).
    config.data = config_sections.stream_data(config, {"image": "synthetic:pairs"})
    config.data.hflip = 0.5
    config.data.affine_degrees = 0.0

    config.optim = config_sections.optim(lr=1e-4)  # [G] AdamW 1e-4 (METHODS.md (c))
    config_sections.add_run_sections(config, checkpoint_every=500, guidance_scale=7.5)

    if variant == "tiny":
        config_sections.make_tiny(config)
    elif variant in ("sd15", "sd15_spatial"):
        config.model.unet_variant = "sd15"
        config.model.requires_pretrained = True  # SD1.5 + AnimateDiff from model.pretrained
        config.model.text_variant = "sd15"
        config.model.vae_variant = "sd"
        config.model.num_frames = 16
        config.model.image_size = 512
        config.batch_size = 4
        config.remat_policy = "full"
        config.compute_dtype = "bfloat16"
        config.frozen_dtype = "bfloat16"  # frozen matrices stored rounded: half their memory
        config.log_every = 50
        config.data.streams = ConfigDict({"image": ""})  # folder:/path or packed:/path, required
        config.mesh = ConfigDict({"data": 1, "fsdp": -1, "tensor": 1, "sequence": 1})
        if variant == "sd15":
            config.steps = 5000  # [G]: the motion adapter is trained once per base model
            config.checkpoint.every = 1000
        else:
            config.model.options.stage = "spatial"
            config.data.streams.prior = "none"  # optional: the original T2I's class samples (prior preservation)
            config.steps = 500  # [S]: Still-Moving trains its spatial adapters for 500 steps
            config.checkpoint.every = 250
    else:
        raise ValueError(f"configs/still_moving.py: unknown variant '{variant}' (tiny, sd15, sd15_spatial)")
    return config
