"""Tiny random reference models saved in the real formats (shared by several test files)."""
from pathlib import Path


def _randomize(module, seed, std=0.05):
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)


def build_tiny_animatediff_folder(root: Path) -> Path:
    """A diffusers AnimateDiffPipeline (2-level UNet + v3-style adapter, tiny VAE and CLIP) saved with
    ``save_pretrained`` to ``root/animatediff``; weights randomized (std 0.05)."""
    import diffusers
    import transformers

    from jaxvc.models.tokenizer import build_clip_tokenizer_files

    tokenizer_dir = build_clip_tokenizer_files(Path(root) / "tok_src")
    unet2d = diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), block_out_channels=(32, 64), layers_per_block=1,
        norm_num_groups=8, cross_attention_dim=32, attention_head_dim=4)
    adapter = diffusers.MotionAdapter(block_out_channels=(32, 64), motion_layers_per_block=1,
                                      motion_num_attention_heads=4, motion_norm_num_groups=8,
                                      motion_max_seq_length=32, use_motion_mid_block=False)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64),
                                  layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=32)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, eos_token_id=49407, bos_token_id=49406, pad_token_id=49407))
    for seed, module in enumerate((unet2d, adapter, vae, text)):
        _randomize(module, seed)
    pipe = diffusers.AnimateDiffPipeline(
        vae=vae, text_encoder=text, tokenizer=transformers.CLIPTokenizer.from_pretrained(str(tokenizer_dir)),
        unet=unet2d, motion_adapter=adapter,
        scheduler=diffusers.DDIMScheduler(beta_schedule="linear", steps_offset=1, clip_sample=False,
                                          timestep_spacing="linspace"))
    folder = Path(root) / "animatediff"
    pipe.save_pretrained(str(folder))
    return folder


# XLA's CPU optimisations cost most of the tiny programs' compile time and change no comparison the tests make
FAST_COMPILE = ("compiler_options", "{'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}")


def method_config(path: str, **overrides):
    """A method's config file (e.g. ``"configs/microcinema.py:tiny"``) for tests: no progress bar, synchronous
    checkpoints, fast compiles, then ``overrides`` (dotted keys, values as their text)."""
    from jaxvc.config_utils import apply_overrides, load_config

    config = load_config(path)
    apply_overrides(config, [("progress_bar", "False"), ("checkpoint.use_async", "False"), FAST_COMPILE,
                             *((k, str(v)) for k, v in overrides.items())])
    return config


T5_WORDS = ("a", "the", "red", "blue", "green", "star", "circle", "square", "subject", "bouncing", "moving", "left",
            "right", "up", "down", "rotating", "on", "of", "in", "video", "dog", "cat")


def build_tiny_t5_folder(root: Path, *, vocab_size: int = 64) -> Path:
    """A Wan-style text side saved in the real formats: ``root/text_encoder`` (a tiny random transformers
    ``UMT5EncoderModel``, ``save_pretrained``) and ``root/tokenizer`` (a ``T5TokenizerFast`` over a unigram vocabulary
    of whole words and letters, ``</s>`` appended, ``<pad>`` = 0). The encoder's table has ``vocab_size`` rows, at
    least one per token (more: spare rows, as UMT5's). Returns ``root``."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + word, -2.0) for word in T5_WORDS] + [("\u2581", -3.0)]
    pieces += [(letter, -5.0) for letter in "abcdefghijklmnopqrstuvwxyz0123456789"]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = transformers.T5TokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", unk_token="<unk>",
                                        pad_token="<pad>", extra_ids=0)
    fast.save_pretrained(root / "tokenizer")
    config = transformers.UMT5Config(vocab_size=max(vocab_size, len(pieces)), d_model=32, d_kv=8, d_ff=48,
                                     num_layers=2, num_heads=4, feed_forward_proj="gated-gelu")
    model = transformers.UMT5EncoderModel(config).eval()
    _randomize(model, 7, std=0.2)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "layer_norm" in name:
                parameter.copy_(1.0 + parameter)
    model.save_pretrained(root / "text_encoder")
    return root
