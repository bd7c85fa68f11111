"""CustomCrafter (jaxvc/methods/customcrafter.py): per-subject LoRA + textual inversion on static videos, sampled
with Dynamic Weighted Video Sampling.

Variants (``--config configs/customcrafter.py:<variant>``):
  tiny   the tiny UNet / VAE / CLIP (CPU tests); give the subject images with
         --config.data.streams.instance=folder:/path (images without a .txt caption get one of CustomCrafter's
         templates with "<new1> toy": "video of a <new1> toy", "<new1> toy", "a static video of a ...", "a ...")
  sd15   SD1.5 + AnimateDiff from local files, 512x512; the subject's images and ~200 class images for prior
         preservation:
           --config.model.pretrained=/sd15 --config.model.motion_adapter=/animatediff-v3
           --config.model.options.initializer_token=dog
           --config.data.streams.instance=folder:/my-dog   (uncaptioned: "a <new1> dog", "video of a <new1> dog", ...)
           --config.data.streams.prior=folder:/dog-class   (their own captions; uncaptioned: "a dog", ...)
Generate: ``jaxvc generate --model RUN --prompt "a <new1> dog surfing"`` (the run's DDIM 50 steps, CFG 12, eta 1)
(the LoRA scale follows DWV: 0.4 for the first 5 steps, then 0.8).
"""
from ml_collections import ConfigDict, config_dict

from jaxvc import config_sections


def get_config(variant=None):
    variant = variant or "tiny"
    config = ConfigDict()
    config.method = "customcrafter"
    config.seed = 0
    config.steps = 10_000  # [C+P]
    config.batch_size = 4
    config.workdir = ""

    # [C]: each image repeated 4 times
    config.model = config_sections.unet_model(vae_variant="tiny", num_frames=4, image_size=32)
    config.model.options = ConfigDict(dict(
        rank=4, alpha=config_dict.placeholder(float), placeholder_token="<new1>", initializer_token="toy",
        train_token=True, detach_start_token=True, loss_type="l2", freeze_frames=True, early_lora_scale=0.4,
        late_lora_scale=0.8, switch_step=5, prediction_type="epsilon", beta_schedule="scaled_linear",
        beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000))

    # instance images and (sd15) class images for prior preservation: [P] each batch concatenates the two, half
    # and half (alpha = 1: L = L_video + 1 * L_prior)
    config.data = config_sections.stream_data(config, {"instance": "synthetic:pairs"}, with_mask=True)
    config.data.fixed_split = True
    config.data.target_hflip = 0.5  # [C] the instance images
    config.data.hflip = 0.0  # (the reference's flip: CustomCrafter has no reference)
    config.data.affine_degrees = 0.0
    # [C] the instance images zoomed out (x1/3-1, on black, "a far away"/"very small" below 0.6, loss on the box) or
    # in (x1.2-1.4, "zoomed in"/"close up"); the class images of prior preservation are not
    config.data.rescale = ("instance",)
    config.data.rescale_mask_inset = 8  # one latent cell of the SD VAE
    config.data.synthetic.update(dict(num_subjects=12, held_out=2, records=64))
    # [C] the instance images' captions: a template with "<new1> <class>" (images with a caption keep theirs); the
    # phrases follow model.options (placeholder_token, initializer_token) unless set
    options = config.model.options
    config.data.caption_phrases = ConfigDict({"instance": options.get_ref("placeholder_token") + " "
                                              + options.get_ref("initializer_token")})

    config.optim = config_sections.optim(lr=3e-5)  # [P][C]
    config_sections.add_run_sections(config, checkpoint_every=500, validation_steps=50, guidance_scale=12.0,
                                     eta=1.0)

    if variant == "tiny":
        config.steps = 20
        config.batch_size = 2
        config.optim.lr = 1e-3
        config.checkpoint.every = 10
        config.data.rescale_mask_inset = 2  # one latent cell of the tiny VAE
    elif variant == "sd15":
        config.model.unet_variant = "sd15"
        config.model.requires_pretrained = True  # SD1.5 + AnimateDiff from model.pretrained
        config.model.text_variant = "sd15"
        config.model.vae_variant = "sd"
        config.model.image_size = 512
        config.validation.num_frames = 16  # [P] trained on 4-frame still clips, samples 16-frame videos
        config.remat_policy = "full"
        config.compute_dtype = "bfloat16"
        config.frozen_dtype = "bfloat16"  # frozen matrices stored rounded: half their memory
        config.log_every = 50
        config.checkpoint.every = 1000
        config.data.streams = ConfigDict({"instance": "", "prior": ""})  # folder:/path each, required
        config.data.caption_phrases.prior = options.get_ref("initializer_token")  # uncaptioned class images
        config.mesh = ConfigDict({"data": -1, "fsdp": 1, "tensor": 1, "sequence": 1})
    else:
        raise ValueError(f"configs/customcrafter.py: unknown variant '{variant}' (tiny, sd15)")
    return config
