"""``jaxvc eval``'s CLIP-T / CLIP-I / DINO-I / temporal consistency against the same formulas computed with
transformers (processors, tokenizer and models) on tiny random CLIP and DINO folders saved in the real formats.

The reference side is what the papers' evaluation code does (specs/METHODS.md, section 0): process each image with
the model's processor, take ``get_image_features`` / ``get_text_features`` (CLIP) or the last hidden state's CLS
token (DINO), L2-normalise, average the cosines.
"""
import json

import numpy as np
import pytest

from jaxvc.cli import main as jaxvc_main

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxvc.eval.cli import RecordError, read_records  # noqa: E402
from jaxvc.eval.feature_metrics import VideoScorer, center_frames  # noqa: E402
from jaxvc.eval.preprocess import IMAGENET_MEAN, IMAGENET_STD, ImagePreprocessor  # noqa: E402
from jaxvc.media import write_gif, write_mp4  # noqa: E402
from jaxvc.models.tokenizer import TokenizerFilesError, build_clip_tokenizer_files, find_open_clip_bpe  # noqa: E402
from tests.test_vision_parity import TINY_TOWER, randomize_  # noqa: E402

PROMPTS = ["a red panda rides a bicycle", "a dog swims in a lake at sunset"]
IMAGE_PROCESSORS = {"clip": transformers.CLIPImageProcessorPil, "vit": transformers.ViTImageProcessorPil}


def images(seed, count, height, width):
    return np.random.default_rng(seed).integers(0, 256, size=(count, height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize("family", ["clip", "vit"])
@pytest.mark.parametrize("shape", [(240, 320), (97, 61), (224, 224)])
def test_preprocessing_equals_the_transformers_pil_processor(family, shape):
    frames = images(0, 2, *shape)
    kwargs = {} if family == "clip" else dict(image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD))
    want = IMAGE_PROCESSORS[family](**kwargs)(images=list(frames), return_tensors="np")["pixel_values"]
    got = ImagePreprocessor.default(family, 224)(frames)
    assert got.shape == (2, 224, 224, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got, want.transpose(0, 2, 3, 1), rtol=0, atol=1e-6)  # float rounding only


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    try:
        find_open_clip_bpe()
    except TokenizerFilesError as error:
        pytest.skip(f"CLIP BPE source unavailable: {error}")
    return build_metric_folders(tmp_path_factory.mktemp("clip"), tmp_path_factory.mktemp("dino"))


def build_metric_folders(clip_folder, dino_folder):
    """A CLIPModel with the CLIP vocabulary and its tokenizer files, and a DINO ViT, 32 px, with processor configs."""
    clip = randomize_(transformers.CLIPModel(transformers.CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, eos_token_id=2),
        vision_config=TINY_TOWER, projection_dim=16)).eval(), seed=5)
    clip.save_pretrained(clip_folder)
    transformers.CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}) \
        .save_pretrained(clip_folder)
    build_clip_tokenizer_files(clip_folder)
    dino = randomize_(transformers.ViTModel(transformers.ViTConfig(**TINY_TOWER, layer_norm_eps=1e-12)).eval(), seed=6)
    dino.save_pretrained(dino_folder)
    transformers.ViTImageProcessorPil(size={"height": 32, "width": 32}, resample=3, image_mean=list(IMAGENET_MEAN),
                                      image_std=list(IMAGENET_STD)).save_pretrained(dino_folder)
    return clip_folder, dino_folder


def reference_scores(clip_folder, dino_folder, frames, prompt, references):
    """The metrics as the papers' evaluation code computes them, with transformers only."""
    def unit(x):
        return x / x.norm(dim=-1, keepdim=True)

    clip = transformers.CLIPModel.from_pretrained(clip_folder).eval()
    dino = transformers.ViTModel.from_pretrained(dino_folder, add_pooling_layer=False).eval()
    clip_processor = transformers.CLIPImageProcessorPil.from_pretrained(clip_folder)
    dino_processor = transformers.ViTImageProcessorPil.from_pretrained(dino_folder)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(clip_folder)
    with torch.no_grad():
        def clip_image(batch):
            pixels = clip_processor(images=list(batch), return_tensors="pt")["pixel_values"]
            return unit(clip.get_image_features(pixel_values=pixels).pooler_output.double())

        def dino_image(batch):
            pixels = dino_processor(images=list(batch), return_tensors="pt")["pixel_values"]
            return unit(dino(pixel_values=pixels).last_hidden_state[:, 0].double())

        ids = tokenizer([prompt], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        text = unit(clip.get_text_features(input_ids=ids.input_ids).pooler_output.double())
        frame_embeds = clip_image(frames)
        return {"clip_t": (frame_embeds @ text.T).mean().item(),
                "clip_i": (frame_embeds @ clip_image(references).T).mean().item(),
                "dino_i": (dino_image(frames) @ dino_image(references).T).mean().item(),
                "temporal_consistency": (frame_embeds[1:] * frame_embeds[:-1]).sum(-1).mean().item()}


@pytest.fixture(scope="module")
def scorer(models):
    return VideoScorer.from_folders(*models, batch_size=4)


def test_scores_equal_the_transformers_computation(models, scorer):
    frames = images(1, 5, 48, 64)  # 5 frames: two batches of 4, the second padded
    references = [images(2, 1, 40, 40)[0], images(3, 1, 30, 50)[0]]  # of different sizes
    got = scorer.score(frames, PROMPTS[0], references)
    want = reference_scores(*models, frames, PROMPTS[0], references)
    assert set(got) == set(want)
    for name in want:
        assert abs(got[name] - want[name]) < 1e-5, (name, got[name], want[name])


def test_a_video_of_the_reference_itself_scores_one(scorer):
    reference = images(4, 1, 40, 40)[0]
    still = np.repeat(reference[None], 4, axis=0)
    scores = scorer.score(still, PROMPTS[0], [reference])
    for name in ("clip_i", "dino_i", "temporal_consistency"):
        assert scores[name] == pytest.approx(1.0, abs=1e-6), name
    other = scorer.score(images(5, 4, 40, 40), PROMPTS[0], [reference])
    assert other["clip_i"] < 0.999 and other["dino_i"] < 0.999 and other["temporal_consistency"] < 0.999


def test_the_prompt_moves_clip_t_and_nothing_else(scorer):
    frames, reference = images(6, 3, 32, 32), images(7, 1, 32, 32)[0]
    first, second = (scorer.score(frames, prompt, [reference]) for prompt in PROMPTS)
    assert first["clip_t"] != pytest.approx(second["clip_t"], abs=1e-4)
    assert {k: v for k, v in first.items() if k != "clip_t"} == {k: v for k, v in second.items() if k != "clip_t"}


def test_what_a_video_lacks_is_not_scored(scorer):
    one_frame = scorer.score(images(8, 1, 32, 32), None, [])
    assert one_frame == {}
    no_reference = scorer.score(images(8, 3, 32, 32), PROMPTS[1], [])
    assert set(no_reference) == {"clip_t", "temporal_consistency"}


def test_center_frames_takes_the_middle():
    frames = np.arange(20)
    assert center_frames(frames, 16).tolist() == list(range(2, 18))
    assert center_frames(frames, None).tolist() == center_frames(frames, 30).tolist() == list(range(20))


def test_eval_command_scores_records_and_skips_a_broken_video(models, tmp_path, capsys):
    clip_folder, dino_folder = models
    reference = tmp_path / "ref.png"
    from PIL import Image

    Image.fromarray(images(9, 1, 32, 32)[0]).save(reference)
    write_gif(tmp_path / "a.gif", images(10, 4, 32, 32), min_size=32)
    write_mp4(tmp_path / "b.mp4", images(11, 4, 32, 32), min_size=32)
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    (tmp_path / "a.json").write_text(json.dumps({"video": "a.gif", "prompt": PROMPTS[0], "reference": "ref.png"}))
    (tmp_path / "set.jsonl").write_text("\n".join(json.dumps(r) for r in (
        {"video": "b.mp4", "prompt": PROMPTS[1], "references": ["ref.png", "ref.png"]},
        {"video": "broken.mp4", "prompt": PROMPTS[1]})))
    out = tmp_path / "scores.json"
    code = jaxvc_main(["eval", str(tmp_path / "a.json"), str(tmp_path / "set.jsonl"), "--clip-model",
                       str(clip_folder), "--dino-model", str(dino_folder), "--out", str(out)])
    assert code == 1  # the broken video was skipped
    summary = json.loads(out.read_text())
    assert [v["source"] for v in summary["videos"]] == [str(tmp_path / "a.json"), f"{tmp_path / 'set.jsonl'}:1"]
    assert len(summary["skipped"]) == 1 and "set.jsonl:2" in summary["skipped"][0]
    assert "broken.mp4" in summary["skipped"][0]
    for name in ("clip_t", "clip_i", "dino_i", "temporal_consistency"):
        values = [video[name] for video in summary["videos"]]
        assert summary["means"][name] == pytest.approx(np.mean(values)) and summary["counts"][name] == 2
    # --x100: the cosines as method (e) reports them; the file keeps the raw values
    capsys.readouterr()
    jaxvc_main(["eval", str(tmp_path / "a.json"), "--clip-model", str(clip_folder), "--x100"])
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("clip_t (x100)"))
    single = json.loads(out.read_text())["videos"][0]["clip_t"]
    assert float(row.split()[2]) == pytest.approx(100 * single, abs=1e-4)
    # --prompt-drop: CustomCrafter's placeholder left out of the prompt CLIP-T reads (named in the file)
    placeholder_prompt = PROMPTS[0].replace(" ", " <new1> ", 1)  # "a <new1> red panda ..."
    (tmp_path / "new1.json").write_text(json.dumps({"video": "a.gif", "prompt": placeholder_prompt}))
    dropped = tmp_path / "dropped.json"
    jaxvc_main(["eval", str(tmp_path / "new1.json"), "--clip-model", str(clip_folder), "--prompt-drop", "<new1>",
                "--out", str(dropped)])
    video = json.loads(dropped.read_text())["videos"][0]
    assert video["clip_t_prompt"] == PROMPTS[0] and video["clip_t"] == pytest.approx(single, abs=1e-6)
    jaxvc_main(["eval", str(tmp_path / "new1.json"), "--clip-model", str(clip_folder), "--out", str(dropped)])
    assert json.loads(dropped.read_text())["videos"][0]["clip_t"] != pytest.approx(single, abs=1e-4)


def test_bad_records_name_the_file_and_line(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"video": "a.mp4"}) + "\n" + json.dumps({"prompt": "no video"}) + "\n")
    with pytest.raises(RecordError, match=r"m\.jsonl:2: a record is an object with at least \"video\""):
        read_records([manifest])
    manifest.write_text(json.dumps({"video": "a.mp4", "references": "one.png"}))
    with pytest.raises(RecordError, match=r"m\.jsonl:1: \"references\" must be a list of paths"):
        read_records([manifest])
    with pytest.raises(RecordError, match="missing.json: no such record file"):
        read_records([tmp_path / "missing.json"])


SHARDED_TOWER = """
import jax, numpy as np
from jaxvc.eval.feature_metrics import ImageTower, unit
from jaxvc.eval.preprocess import ImagePreprocessor
from jaxvc.models.vision_transformer import VisionConfig, VisionTransformer
assert jax.device_count() == 8
for family in ("clip", "vit"):
    config = VisionConfig.variant("tiny", family=family, projection_dim=16 if family == "clip" else None)
    params = VisionTransformer(config).init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))
    tower = ImageTower(config, params, ImagePreprocessor.default(family, 32), batch_size=5)
    assert tower.batch_size == 8 and tower.mesh.shape["data"] == 8
    frames = np.random.default_rng(0).integers(0, 256, size=(11, 40, 48, 3), dtype=np.uint8)
    sharded = tower(frames)  # two batches of 8 over 8 devices, the second padded
    pixels = ImagePreprocessor.default(family, 32)(frames)
    one_device = unit(np.asarray(VisionTransformer(config).apply(params, pixels)["image_embeds"], np.float64))
    error = np.abs(sharded - one_device).max()
    assert sharded.shape == one_device.shape and error < 1e-6, (family, error)
    placed = jax.device_put(pixels[:8], tower._embed.lower(tower.params, pixels[:8]).compile().input_shardings[0][1])
    assert len(placed.sharding.device_set) == 8 and placed.addressable_shards[0].data.shape[0] == 1
    print(family, "max difference", error)
print("SHARDED_OK")
"""


def test_image_towers_split_batches_over_8_devices_with_one_device_numbers():
    from tests.multidevice import run_with_devices

    run_with_devices(SHARDED_TOWER, devices=8)
