"""AnimateDiff text-to-video end to end: a tiny diffusers ``AnimateDiffPipeline`` folder (UNet + motion adapter,
VAE, CLIP text encoder and tokenizer, written by ``save_pretrained``) sampled by jaxvc's ``CustomVideoPipeline``
without a reference frame (``jaxvc generate --text-to-video``) equals diffusers' own ``AnimateDiffPipeline`` from the
same starting noise with the same scheduler settings: the latents after guided sampling with DDIM, DPM-Solver++ and
UniPC, and the decoded video."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from tests.conftest import relative_error

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

SETTINGS = dict(num_frames=3, height=16, width=16, num_inference_steps=4, guidance_scale=7.5)
PROMPT, NEGATIVE = "a red star moves left", "blurry"
SCHEDULERS = {"ddim": "DDIMScheduler", "dpm++": "DPMSolverMultistepScheduler", "unipc": "UniPCMultistepScheduler"}


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    from jaxvc.pipeline import CustomVideoPipeline
    from tests.tiny_models import build_tiny_animatediff_folder

    folder = build_tiny_animatediff_folder(tmp_path_factory.mktemp("animatediff_t2v"))
    ours = CustomVideoPipeline.from_pretrained(folder)
    ours.reference_frame = False  # a plain text-to-video AnimateDiff model
    return ours, diffusers.AnimateDiffPipeline.from_pretrained(folder)


@pytest.mark.parametrize("sampler", sorted(SCHEDULERS))
def test_text_to_video_matches_diffusers_animatediff_pipeline(pipes, sampler):
    ours, reference = pipes
    latents = np.asarray(ours.generate(None, PROMPT, negative_prompt=NEGATIVE, seed=5, decode=False,
                                       sampler=sampler, **SETTINGS))
    assert latents.shape == (1, 3, 8, 8, 4)
    x_T = jax.random.normal(jax.random.split(jax.random.key(5))[0], latents.shape, jnp.float32)  # the pipeline's
    # diffusers' scheduler of that name, configured as jaxvc's pipeline samples (VideoMaker's inference settings)
    reference.scheduler = getattr(diffusers, SCHEDULERS[sampler]).from_config(ours.scheduler_config)
    kwargs = dict(prompt=PROMPT, negative_prompt=NEGATIVE, **SETTINGS,
                  latents=torch.from_numpy(np.moveaxis(np.asarray(x_T), -1, 1)))
    with torch.no_grad():
        expected = np.moveaxis(reference(output_type="latent", **kwargs).frames.numpy(), 1, -1)
    error = relative_error(latents, expected)
    print(f"AnimateDiff text-to-video, {sampler}: latents {error:.1e} relative to diffusers")
    assert error < 1e-5
    assert relative_error(expected, np.asarray(x_T)) > 0.1  # it did sample
    with pytest.raises(ValueError, match="does not run a DDPM-schedule"):  # a flow-matching solver
        ours.generate(None, PROMPT, sampler="euler", **SETTINGS)
    with pytest.raises(ValueError, match="eta"):
        ours.generate(None, PROMPT, sampler=sampler if sampler != "ddim" else "unipc", eta=1.0, **SETTINGS)
    if sampler == "ddim":
        video = np.asarray(ours.generate(None, PROMPT, negative_prompt=NEGATIVE, seed=5, **SETTINGS))
        with torch.no_grad():
            expected_video = reference(output_type="np", **kwargs).frames  # (1, F, H, W, 3) in [0, 1]
        assert np.abs((np.clip(video, -1, 1) + 1) / 2 - expected_video).max() < 1e-5
