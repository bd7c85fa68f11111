"""Batches of videos in one sampling program (``CustomVideoPipeline.generate`` with a list of prompts,
``generate_videos``, ``jaxvc generate --prompts --batch-size``) and data-parallel sampling on a mesh (``pipe.shard
("data=8")``, ``--mesh data=8``): each video of a batch is the video made alone from the same seed, prompt and
reference, so a batch size or a device count never changes an evaluation set."""
import copy
import json

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("torch")
pytest.importorskip("diffusers")

import jax.numpy as jnp  # noqa: E402

from jaxvc.cli import main as jaxvc_main  # noqa: E402
from jaxvc.pipeline import CustomVideoPipeline, load_reference_image  # noqa: E402
from tests.conftest import relative_error  # noqa: E402
from tests.multidevice import run_with_devices  # noqa: E402
from tests.tiny_models import build_tiny_animatediff_folder  # noqa: E402

SETTINGS = dict(num_frames=3, height=16, width=16, num_inference_steps=3)
PROMPTS, NEGATIVES, SEEDS = ["a dog runs", "a cat sits down", "a bird"], ["", "blurry", "low quality"], [5, 9, 2]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_animatediff_folder(tmp_path_factory.mktemp("batched"))


@pytest.fixture(scope="module")
def pipe(folder):
    return CustomVideoPipeline.from_pretrained(folder)


def _image(seed):
    return Image.fromarray((np.random.default_rng(seed).random((24, 40, 3)) * 255).astype(np.uint8))


def test_a_batch_is_the_videos_made_one_by_one(pipe):
    """Three videos with their own reference, prompt, negative prompt and seed, sampled with per-step noise (DDIM
    eta 0.5: each video draws its own), equal the three made alone: the latents to float32 summation order (a batch
    reorders the matmuls' sums), the uint8 frames exactly."""
    images = [_image(seed) for seed in range(3)]
    options = dict(SETTINGS, eta=0.5)
    pixels = jnp.asarray(np.stack([load_reference_image(image, 16, 16) for image in images]))
    batch = np.asarray(pipe.generate(pixels, PROMPTS, negative_prompt=NEGATIVES, seed=SEEDS, decode=False, **options))
    for i in range(3):
        alone = pipe(images[i], PROMPTS[i], negative_prompt=NEGATIVES[i], seed=SEEDS[i], progress=False,
                     output_type="latent", **options)
        assert relative_error(batch[i], alone) < 1e-5
    frames = pipe.generate_videos(images, PROMPTS, negative_prompts=NEGATIVES, seeds=SEEDS, **options)
    assert frames.shape == (3, 3, 16, 16, 3) and frames.dtype == np.uint8
    np.testing.assert_array_equal(frames[2], pipe(images[2], PROMPTS[2], negative_prompt=NEGATIVES[2], seed=SEEDS[2],
                                                  progress=False, **options))
    # one int seed: video i gets seed + i (here 5, 6, 7: the first video is the one of seed 5 above, the second not)
    again = np.asarray(pipe.generate(pixels, PROMPTS, negative_prompt=NEGATIVES, seed=SEEDS[0], decode=False,
                                     **options))
    assert relative_error(again[0], batch[0]) < 1e-5 and relative_error(again[1], batch[1]) > 1e-2


def test_a_text_to_video_batch(pipe):
    """No reference frame (``--text-to-video``, Still-Moving's models): a batch without references."""
    plain = copy.copy(pipe)  # the same weights, sampled as a plain AnimateDiff model
    plain.reference_frame = False
    options = dict(SETTINGS, decode=False)
    batch = plain.generate(None, PROMPTS[:2], seed=SEEDS[:2], **options)
    assert relative_error(batch[1], plain.generate(None, PROMPTS[1], seed=SEEDS[1], **options)[0]) < 1e-5


def test_batch_errors(pipe):
    with pytest.raises(ValueError, match="2 prompts, 3 negative prompts"):
        pipe.generate(None, PROMPTS[:2], negative_prompt=NEGATIVES, **SETTINGS)
    with pytest.raises(ValueError, match=r"reference must be \(3, 16, 16, 3\)"):
        pipe.generate(jnp.zeros((1, 16, 16, 3)), PROMPTS, **SETTINGS)
    with pytest.raises(ValueError, match="a reference image for every video"):
        pipe.generate_videos([_image(0), None], PROMPTS[:2], **SETTINGS)


def test_generate_command_batches_a_set(folder, tmp_path):
    """``--batch-size 2`` on three items (the last batch padded): the same GIF bytes as one at a time, the manifest
    in the set's order, and a rerun that keeps them; a batch size without a set, or below 1, is refused."""
    from jaxvc.eval.cli import read_records

    _image(7).save(tmp_path / "reference.png")
    (tmp_path / "set.txt").write_text("\n".join(PROMPTS) + "\n")
    command = ["generate", "--model", str(folder), "--prompts", str(tmp_path / "set.txt"), "--reference",
               str(tmp_path / "reference.png"), "--frames", "3", "--height", "16", "--width", "16", "--steps", "2",
               "--eta", "0.5"]
    assert jaxvc_main(command + ["--out", str(tmp_path / "one")]) == 0
    assert jaxvc_main(command + ["--out", str(tmp_path / "two"), "--batch-size", "2"]) == 0
    names = [path.stem for path in sorted((tmp_path / "one").glob("*.gif"))]
    assert len(names) == 3
    for name in names:
        assert (tmp_path / "one" / f"{name}.gif").read_bytes() == (tmp_path / "two" / f"{name}.gif").read_bytes()
    records = read_records([tmp_path / "two" / "manifest.jsonl"])
    assert [record["prompt"] for record in records] == PROMPTS
    (tmp_path / "two" / f"{names[1]}.json").unlink()  # one video lost: the rerun makes it alone, keeps the others
    stamp = (tmp_path / "two" / f"{names[0]}.mp4").stat().st_mtime_ns
    assert jaxvc_main(command + ["--out", str(tmp_path / "two"), "--batch-size", "2"]) == 0
    assert (tmp_path / "two" / f"{names[0]}.mp4").stat().st_mtime_ns == stamp
    assert json.loads((tmp_path / "two" / f"{names[1]}.json").read_text())["prompt"] == PROMPTS[1]
    assert [record["prompt"] for record in read_records([tmp_path / "two" / "manifest.jsonl"])] == PROMPTS
    single = ["generate", "--model", str(folder), "--prompt", "a dog", "--reference", str(tmp_path / "reference.png")]
    assert jaxvc_main(single + ["--batch-size", "2"]) == 2
    assert jaxvc_main(command + ["--out", str(tmp_path / "zero"), "--batch-size", "0"]) == 2


DATA_PARALLEL = """
import tempfile
from pathlib import Path
import jax, jax.numpy as jnp, numpy as np
from jaxvc.pipeline import CustomVideoPipeline
from tests.conftest import relative_error
from tests.tiny_models import build_tiny_animatediff_folder

folder = build_tiny_animatediff_folder(Path(tempfile.mkdtemp()))
pixels = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (8, 16, 16, 3)), jnp.float32)
prompts, seeds = ["a dog runs %d" % i for i in range(8)], list(range(8))
options = dict(num_frames=3, height=16, width=16, num_inference_steps=3, eta=0.5)
pipe = CustomVideoPipeline.from_pretrained(folder)
single = [np.asarray(pipe.generate(pixels, prompts, seed=seeds, decode=decode, **options)) for decode in (False, True)]
pipe.shard("data=8")
for group, tree in pipe.params.items():
    assert all(len(leaf.sharding.device_set) == 8 and leaf.sharding.is_fully_replicated
               for leaf in jax.tree.leaves(tree)), group
latents = pipe.generate(pixels, prompts, seed=seeds, decode=False, **options)
assert latents.sharding.shard_shape(latents.shape)[0] == 1, latents.sharding  # one video per device
sharded = [np.asarray(latents), np.asarray(pipe.generate(pixels, prompts, seed=seeds, **options))]
errors = [relative_error(a, b) for a, b in zip(sharded, single)]
print("data=8 vs one device: latents %.1e, video %.1e" % tuple(errors))
assert max(errors) < 1e-5, errors
for bad, match in (("fsdp=8", "data-parallel"), (None, "multiple of the data axis")):
    try:
        pipe.shard(bad) if bad else pipe.generate(pixels[:4], prompts[:4], seed=seeds[:4], **options)
    except ValueError as error:
        assert match in str(error), error
    else:
        raise AssertionError(bad)
print("SHARDED_OK")
"""


def test_data_parallel_sampling_equals_one_device():
    """``shard("data=8")``: the weights on all 8 devices, one video of 8 on each, the videos of one device."""
    run_with_devices(DATA_PARALLEL, devices=8)
