"""Configs shared by the `jaxvc plan` tests (TPU and GPU)."""
import textwrap

# The tiny VideoMaker with one UNet level, pixel space, 2 frames of 8x8: one TPU compile is ~30 s of CPU.
MINI_CONFIG = textwrap.dedent('''
    from ml_collections import ConfigDict
    from jaxvc.config_utils import load_config

    def get_config(variant=None):
        config = load_config("configs/videomaker.py:tiny")
        config.model.vae_variant = "none"
        config.model.image_size = 8
        config.model.num_frames = 2
        config.model.unet_overrides = ConfigDict(dict(
            block_out_channels=(32,), down_block_types=("CrossAttnDownBlock2D",),
            up_block_types=("CrossAttnUpBlock2D",)))
        config.batch_size = 4
        return config
''')
