"""Generation: CustomVideoPipeline and `jaxvc generate` on a tiny AnimateDiff folder: shapes, files, the zero-reference
unconditional branch, reference-image handling and errors (bad images refused before the model loads), and what the
records say ran (sampler, dtype, attention backend, fps: each model's own rate, tiny Wan folders' too)."""
import json

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("torch")
pytest.importorskip("diffusers")

from jaxvc.cli import main as jaxvc_main  # noqa: E402
from jaxvc.data.media import read_video  # noqa: E402
from jaxvc.pipeline import CustomVideoPipeline, load_reference_image  # noqa: E402
from jaxvc.train.profiling import trace_files  # noqa: E402
from tests.tiny_models import build_tiny_animatediff_folder  # noqa: E402

SETTINGS = dict(num_frames=3, height=16, width=16, num_inference_steps=3, progress=False)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_animatediff_folder(tmp_path_factory.mktemp("gen"))


@pytest.fixture(scope="module")
def pipe(folder):
    return CustomVideoPipeline.from_pretrained(folder)


def _image(seed, mode="RGB", size=(40, 24)):
    pixels = (np.random.default_rng(seed).random((size[1], size[0], 4)) * 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGBA").convert(mode)


def test_frames_shape_and_determinism(pipe):
    frames = pipe(_image(0), "a red star moves left", seed=3, **SETTINGS)
    assert frames.shape == (3, 16, 16, 3) and frames.dtype == np.uint8
    again = pipe(_image(0), "a red star moves left", seed=3, **SETTINGS)
    np.testing.assert_array_equal(frames, again)
    other_seed = pipe(_image(0), "a red star moves left", seed=4, **SETTINGS)
    assert np.any(other_seed != frames)


def test_unconditional_branch_uses_a_zero_reference(pipe):
    """guidance 0 returns the unconditional prediction alone, which must not see the reference; guidance 8 must."""
    base = dict(seed=1, output_type="latent", **SETTINGS)  # latents: random weights move uint8 frames too little
    uncond_a = pipe(_image(1), "a dog", guidance_scale=0.0, **base)
    uncond_b = pipe(_image(2), "a dog", guidance_scale=0.0, **base)
    np.testing.assert_array_equal(uncond_a, uncond_b)
    guided_a = pipe(_image(1), "a dog", guidance_scale=8.0, **base)
    guided_b = pipe(_image(2), "a dog", guidance_scale=8.0, **base)
    # the guidance-0 runs above are bit-identical for different references, so the computation is deterministic:
    # any difference here comes from the reference (with random weights its effect on the latents is small)
    assert np.any(guided_a != guided_b)


def test_reference_guidance_scale(pipe):
    """A separate reference scale equal to the text scale is the default two-branch guidance; a different one changes
    the video only from reference_guidance_start on; without a reference image it is refused."""
    base = dict(seed=2, output_type="latent", **SETTINGS)
    default = pipe(_image(1), "a dog", guidance_scale=5.0, **base)
    equal = pipe(_image(1), "a dog", guidance_scale=5.0, reference_guidance_scale=5.0, **base)
    np.testing.assert_allclose(equal, default, rtol=1e-4, atol=1e-5)
    stronger = pipe(_image(1), "a dog", guidance_scale=5.0, reference_guidance_scale=20.0, **base)
    assert np.abs(stronger - default).max() > 1e-4
    never = pipe(_image(1), "a dog", guidance_scale=5.0, reference_guidance_scale=20.0, reference_guidance_start=1.0,
                 **base)
    np.testing.assert_allclose(never, default, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="needs a reference image"):
        pipe(None, "a dog", reference_guidance_scale=5.0, **SETTINGS)
    with pytest.raises(ValueError, match="reference_guidance_start"):
        pipe(_image(1), "a dog", reference_guidance_scale=5.0, reference_guidance_start=1.5, **SETTINGS)


def test_reference_image_modes_and_errors(tmp_path):
    for mode in ("RGB", "RGBA", "L", "P", "CMYK"):
        array = load_reference_image(_image(0, mode), 16, 24)
        assert array.shape == (16, 24, 3) and array.min() >= -1 and array.max() <= 1
    transparent = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    np.testing.assert_allclose(load_reference_image(transparent, 8, 8), 1.0)  # transparent -> white
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="broken.png: not a readable image"):
        load_reference_image(broken, 16, 16)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_reference_image(tmp_path / "missing.png", 16, 16)


def test_bad_sizes_are_reported(pipe):
    with pytest.raises(ValueError, match="height=18 must be divisible by 4"):
        pipe(_image(0), "x", **{**SETTINGS, "height": 18})
    with pytest.raises(ValueError, match="allows 1..31 frames"):
        pipe(_image(0), "x", **{**SETTINGS, "num_frames": 40})


def test_generate_command_writes_video_gif_and_sheet(folder, tmp_path):
    reference = tmp_path / "subject.png"
    _image(5).save(reference)
    out = tmp_path / "out"
    code = jaxvc_main(["generate", "--model", str(folder), "--reference", str(reference), "--prompt", "a cat jumps",
                       "--frames", "3", "--height", "16", "--width", "16", "--steps", "2", "--out", str(out),
                       "--name", "cat", "--sampler", "dpm++-sde", "--profile", str(tmp_path / "profile")])
    assert code == 0
    assert len(trace_files(tmp_path / "profile")) == 1  # one more generation, traced
    for name in ("cat.mp4", "cat.gif", "cat_sheet.png"):
        assert (out / name).stat().st_size > 0
    with Image.open(out / "cat.gif") as gif:
        assert gif.n_frames == 3
    # the record beside the video is what `jaxvc eval` reads (tests/test_eval_metrics.py)
    from jaxvc.eval.cli import read_records

    record = json.loads((out / "cat.json").read_text())
    assert (record["prompt"], record["seed"], record["steps"], record["frames"]) == ("a cat jumps", 0, 2, 3)
    assert record["sampler"] == "dpm++-sde"
    # what ran when defaulted: the folder's dtype and attention backend, AnimateDiff's 8 fps (the MP4's rate too)
    assert (record["dtype"], record["attention_backend"], record["fps"]) == ("float32", "xla", 8)
    assert read_video(str(out / "cat.mp4"))[1] == 8
    [read] = read_records([out / "cat.json"])
    assert (read["video"], read["references"]) == (str(out / "cat.mp4"), [str(reference.resolve())])


def test_text_to_video_records_carry_the_evaluation_references(folder, tmp_path):
    """``--eval-references``: a text-to-video model takes no reference, but its records name the subject's images
    (a folder's, or a prompt-set record's own) for ``jaxvc eval``'s CLIP-I / DINO-I."""
    from jaxvc.eval.cli import read_records

    subject = tmp_path / "my-dog"
    subject.mkdir()
    for i in range(2):
        _image(i).save(subject / f"{i}.png")
    (subject / "notes.txt").write_text("not an image")
    other = tmp_path / "other.png"
    _image(7).save(other)
    (tmp_path / "set.jsonl").write_text(json.dumps({"prompt": "a dog runs", "name": "own",
                                                    "references": ["other.png"]}) + "\n"
                                        + json.dumps({"prompt": "a dog sits", "name": "shared"}) + "\n")
    out = tmp_path / "out"
    command = ["generate", "--model", str(folder), "--text-to-video", "--frames", "2", "--height", "16", "--width",
               "16", "--steps", "1", "--out", str(out)]
    assert jaxvc_main(command + ["--prompts", str(tmp_path / "set.jsonl"), "--eval-references", str(subject)]) == 0
    expected = {"own": [str(other.resolve())], "shared": [str((subject / f"{i}.png").resolve()) for i in range(2)]}
    for name, references in expected.items():
        record = json.loads((out / f"{name}.json").read_text())
        assert record["reference"] is None and record["references"] == references
        [read] = read_records([out / f"{name}.json"])
        assert read["references"] == references
    assert jaxvc_main(command + ["--prompt", "a dog", "--eval-references", str(tmp_path / "nowhere")]) == 2


def test_generate_command_prompt_set_resumes_and_matches_single_videos(folder, pipe, tmp_path, monkeypatch, capsys):
    """--prompts: each item as the one-video path would make it (same seed, prompt and reference: equal GIF
    bytes), records and a manifest `jaxvc eval` reads, a rerun that keeps what exists, a rerun with another seed or
    guidance scale refused before the model loads, and --overwrite making the videos again."""
    from jaxvc.eval.cli import read_records

    (tmp_path / "refs").mkdir()
    _image(5).save(tmp_path / "refs" / "dog.png")
    _image(6).save(tmp_path / "default.png")
    (tmp_path / "set.jsonl").write_text(
        json.dumps({"prompt": "a dog runs", "reference": "refs/dog.png", "seed": 11, "video": "/clips/c7.mp4"}) + "\n"
        + json.dumps({"prompt": "a cat sits", "name": "cat"}) + "\n")
    out = tmp_path / "out"
    command = ["generate", "--model", str(folder), "--prompts", str(tmp_path / "set.jsonl"), "--reference",
               str(tmp_path / "default.png"), "--repeats", "2", "--seed", "4", "--frames", "3", "--height", "16",
               "--width", "16", "--steps", "2", "--out", str(out)]
    assert jaxvc_main(command) == 0
    names = ["c7_000", "c7_001", "cat_000", "cat_001"]  # a record's video stem names its item
    seeds = [11, 12, 4, 5]
    records = read_records([out / "manifest.jsonl"])
    assert [r["video"] for r in records] == [str(out / f"{name}.mp4") for name in names]
    for name, seed, record in zip(names, seeds, records):
        saved = json.loads((out / f"{name}.json").read_text())
        assert saved["seed"] == seed
        reference = tmp_path / ("refs/dog.png" if name.startswith("c7") else "default.png")
        assert record["references"] == [str(reference.resolve())]
        if name not in ("c7_001", "cat_000"):  # one repeat of each item is made again one video at a time
            continue
        frames = pipe(str(reference), saved["prompt"], seed=seed, num_frames=3, height=16, width=16,
                      num_inference_steps=2, progress=False)
        single = pipe.save(frames, tmp_path / "single", name, reference=str(reference))
        assert single["gif"].read_bytes() == (out / f"{name}.gif").read_bytes()
    # a rerun keeps the existing videos (resume); --overwrite makes them again
    stamps = {path.name: path.stat().st_mtime_ns for path in out.iterdir() if path.name != "manifest.jsonl"}
    assert jaxvc_main(command + ["--profile", str(tmp_path / "profile")]) == 0  # all kept: the last item, traced
    assert {name: (out / name).stat().st_mtime_ns for name in stamps} == stamps  # the profiled one is not saved
    assert len(trace_files(tmp_path / "profile")) == 1
    assert len(read_records([out / "manifest.jsonl"])) == 4
    # the kept records are another run's (--seed: the items without their own; --guidance-scale: all): refused, one
    # line naming a record and the key, old -> new, before the model loads
    monkeypatch.setattr(CustomVideoPipeline, "from_pretrained", _no_loading)
    capsys.readouterr()
    for extra, expected in ((["--seed", "5"], f"{out / 'cat_000.json'}: seed 4 -> 5 (and 1 more"),
                            (["--guidance-scale", "5"], f"{out / 'c7_000.json'}: guidance_scale 8.0 -> 5.0 (and 3")):
        assert jaxvc_main(command + extra) == 2
        error = capsys.readouterr().err.strip()
        assert "\n" not in error and expected in error and "--overwrite" in error, error
    assert {name: (out / name).stat().st_mtime_ns for name in stamps} == stamps  # nothing touched
    # --overwrite makes them again (with the already-compiled test pipeline standing in for the folder's)
    monkeypatch.setattr(CustomVideoPipeline, "from_pretrained", lambda *args, **kwargs: pipe)
    gifs = {name: (out / f"{name}.gif").read_bytes() for name in names}
    assert jaxvc_main(command + ["--overwrite"]) == 0
    assert all((out / name).stat().st_mtime_ns != stamps[name] for name in stamps if name.endswith(".json"))
    assert {name: (out / f"{name}.gif").read_bytes() for name in names} == gifs
    monkeypatch.undo()
    # a reference-conditioned model needs a reference for every item
    (tmp_path / "bare.txt").write_text("a bird flies\n")
    assert jaxvc_main(["generate", "--model", str(folder), "--prompts", str(tmp_path / "bare.txt"),
                       "--out", str(tmp_path / "bare")]) == 2
    assert jaxvc_main(["generate", "--model", str(folder)]) == 2  # neither --prompt nor --prompts


def _no_loading(*args, **kwargs):
    raise AssertionError("the model was loaded: the inputs should have been refused before")


def test_bad_reference_images_are_refused_before_the_model_loads(folder, tmp_path, monkeypatch, capsys):
    """A missing, unreadable or truncated --reference (or --last-frame, or a prompt-set record's "reference"): exit
    status 2 and one line naming the image (and the record), before the model loads (minutes for a big one)."""
    from PIL import ImageFile

    monkeypatch.setattr(CustomVideoPipeline, "from_pretrained", _no_loading)
    # as tensorflow-datasets and vbench leave it when imported: a truncated image must still be refused
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    good, broken, truncated = tmp_path / "good.png", tmp_path / "broken.png", tmp_path / "truncated.png"
    _image(0).save(good)
    broken.write_bytes(b"not an image at all")
    truncated.write_bytes(good.read_bytes()[:60])  # a PNG header PIL opens, pixels it cannot decode
    base = ["generate", "--model", str(folder), "--prompt", "a dog", "--out", str(tmp_path / "out")]

    def refused(extra, *expected):
        assert jaxvc_main(base + extra) == 2
        error = capsys.readouterr().err.strip()
        assert "\n" not in error and error.startswith("jaxvc generate: ")
        for part in expected:
            assert part in error, error
        return error

    refused(["--reference", str(tmp_path / "missing.png")],
            f"reference image {tmp_path / 'missing.png'}: file does not exist")
    refused(["--reference", str(broken)], f"reference image {broken}: not a readable image")
    refused(["--reference", str(truncated)], f"reference image {truncated}: not a readable image")
    refused(["--reference", str(tmp_path)], "file does not exist")  # a folder is not an image
    refused(["--reference", str(good), "--last-frame", str(broken)], f"--last-frame image {broken}: not a readable")
    refused(["--reference", str(good), "--fps", "0"], "--fps 0")
    # a prompt set: every record's image, up front; the bad one names its record
    (tmp_path / "set.jsonl").write_text(json.dumps({"prompt": "a dog runs", "reference": "good.png"}) + "\n"
                                        + json.dumps({"prompt": "a dog sits", "reference": "gone.png"}) + "\n")
    refused(["--prompts", str(tmp_path / "set.jsonl"), "--repeats", "3"],
            f"reference image {tmp_path / 'gone.png'}: file does not exist", f"{tmp_path / 'set.jsonl'}:2")
    # a record without its own reference takes --reference, checked the same way
    (tmp_path / "own.jsonl").write_text(json.dumps({"prompt": "a dog runs", "reference": "good.png"}) + "\n"
                                        + json.dumps({"prompt": "a dog sits"}) + "\n")
    refused(["--prompts", str(tmp_path / "own.jsonl"), "--reference", str(broken)],
            f"reference image {broken}: not a readable image")
    # images that are all readable go on to load the model (here: refused by the test's loader)
    with pytest.raises(AssertionError, match="the model was loaded"):
        jaxvc_main(base + ["--prompts", str(tmp_path / "own.jsonl"), "--reference", str(good)])


def test_prompt_set_reruns_of_other_inputs_are_refused_before_the_model_loads(folder, tmp_path, monkeypatch, capsys):
    """A .txt set's items are named by line: an edited line, another --seed or another --guidance-scale over the
    records in --out is refused (exit status 2, one line naming the record and the key, old -> new) before the model
    loads, rather than keeping the old videos in the manifest; the same inputs, --overwrite, or a record without the
    key (an older jaxvc's) go on to load the model. A record's evaluation "references" are read up front too."""
    monkeypatch.setattr(CustomVideoPipeline, "from_pretrained", _no_loading)
    out = tmp_path / "out"
    out.mkdir()
    for name, prompt in (("00000", "a dog runs"), ("00001", "a cat jumps")):  # as an earlier run wrote them
        (out / f"{name}.json").write_text(json.dumps({"video": f"{name}.mp4", "prompt": prompt, "reference": None,
                                                      "model": str(folder), "guidance_scale": 8.0, "steps": 2,
                                                      "seed": 0}))
    prompts = tmp_path / "p.txt"
    prompts.write_text("a dog runs\na cat jumps\n")
    base = ["generate", "--model", str(folder), "--text-to-video", "--prompts", str(prompts), "--steps", "2",
            "--out", str(out)]

    def refused(extra, *expected):
        assert jaxvc_main(base + extra) == 2
        error = capsys.readouterr().err.strip()
        assert "\n" not in error and error.startswith("jaxvc generate: ") and "pass --overwrite" in error, error
        for part in expected:
            assert part in error, error

    def loads(extra):
        with pytest.raises(AssertionError, match="the model was loaded"):
            jaxvc_main(base + extra)

    loads([])  # the same prompts and settings: kept (the model loads for nothing else)
    refused(["--seed", "7"], f"{out / '00000.json'}: seed 0 -> 7 (and 1 more")
    refused(["--guidance-scale", "5"], "guidance_scale 8.0 -> 5.0")
    prompts.write_text("a bird flies\na cat jumps\n")
    refused([], f"{out / '00000.json'}: prompt 'a dog runs' -> 'a bird flies': already in --out")
    refused(["--seed", "7"], "prompt 'a dog runs' -> 'a bird flies', seed 0 -> 7 (and 1 more")
    loads(["--overwrite", "--seed", "7"])
    record = json.loads((out / "00000.json").read_text())
    del record["prompt"]  # an older jaxvc's record without the key: what it has is compared
    (out / "00000.json").write_text(json.dumps(record))
    loads([])
    # a prompt set record's evaluation references: each image read before the model loads, naming the record
    _image(0).save(tmp_path / "good.png")
    (tmp_path / "set.jsonl").write_text(json.dumps({"prompt": "a dog", "name": "a", "references": ["good.png"]})
                                        + "\n" + json.dumps({"prompt": "a dog", "name": "b",
                                                             "references": ["good.png", "gone.png"]}) + "\n")
    base[base.index("--prompts") + 1] = str(tmp_path / "set.jsonl")
    assert jaxvc_main(base + ["--out", str(tmp_path / "other")]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and error == (f"jaxvc generate: evaluation reference image {tmp_path / 'gone.png'}: "
                                           f"file does not exist (the \"references\" of {tmp_path / 'set.jsonl'}:2)")


def test_records_name_the_settings_that_ran_and_fps_wins(folder, tmp_path):
    """Defaults recorded as what ran (the model's DDIM, dtype, attention backend); --fps 12 over the model's 8 is
    the record's and the MP4 container's rate."""
    reference = tmp_path / "subject.png"
    _image(5).save(reference)
    out = tmp_path / "out"
    assert jaxvc_main(["generate", "--model", str(folder), "--reference", str(reference), "--prompt", "a cat",
                       "--frames", "2", "--height", "16", "--width", "16", "--steps", "1", "--out", str(out),
                       "--fps", "12"]) == 0
    record = json.loads((out / "video.json").read_text())
    assert {key: record[key] for key in ("sampler", "dtype", "attention_backend", "fps")} == {
        "sampler": "ddim", "dtype": "float32", "attention_backend": "xla", "fps": 12}
    assert read_video(str(out / "video.mp4"))[1] == 12


def test_pipelines_report_their_dtype_attention_backend_and_rate(folder):
    """What a record names comes from the loaded model: the UNet's config as --dtype/--attention-backend set it;
    the S2V method's DiT; their default rates (AnimateDiff's 8, the S2V training clips' 8)."""
    from jaxvc.dit_pipeline import SubjectDiTPipeline
    from jaxvc.methods import build_method
    from tests.tiny_models import method_config

    pipe = CustomVideoPipeline.from_pretrained(folder, dtype="bfloat16", attention_backend="jax")
    assert (pipe.compute_dtype, pipe.attention_backend, pipe.default_fps) == ("bfloat16", "jax", 8)
    assert (pipe.sampler_name(None), pipe.sampler_name("unipc")) == ("ddim", "unipc")
    method = build_method(method_config("configs/disentangled_s2v.py:tiny", compute_dtype="bfloat16",
                                        **{"model.attention_backend": "jax"}))
    s2v = SubjectDiTPipeline(method, None, None)
    assert (s2v.compute_dtype, s2v.attention_backend, s2v.default_fps, s2v.sampler_name()) == (
        "bfloat16", "jax", 8, "euler")


@pytest.mark.parametrize("kind, fps", [("i2v", 16), ("t2v-a14b", 16), ("ti2v", 24)])
def test_wan_folders_default_rates(tmp_path, kind, fps):
    """Wan 2.1 (I2V here) and Wan 2.2 A14B folders make 16 fps videos, Wan 2.2 TI2V-5B (expand_timesteps) 24 fps,
    as Wan's configs' sample_fps and diffusers' examples write them; a Wan folder's own sampler is its scheduler
    (its class in the record)."""
    pytest.importorskip("transformers")
    from tests.test_wan_i2v_pipeline import _folder

    root, _ = _folder(tmp_path, kind)
    pipe = CustomVideoPipeline.from_pretrained(root)
    assert pipe.default_fps == fps
    assert (pipe.sampler_name(None), pipe.compute_dtype, pipe.attention_backend) == (
        "UniPCMultistepScheduler", "float32", "xla")
    if kind == "i2v":
        return
    # the command writes the video at the folder's rate unless told, and records it (and, for two experts, the
    # low-noise expert's guidance scale: the first's unless told)
    out, reference = tmp_path / "out", tmp_path / "first.png"
    _image(3, size=(32, 32)).save(reference)
    given = ["--reference", str(reference)] if kind == "ti2v" else []
    assert jaxvc_main(["generate", "--model", str(root), *given, "--prompt", "a star", "--frames", "5", "--height",
                       "32", "--width", "32", "--steps", "1", "--guidance-scale", "4", "--out", str(out)]) == 0
    record = json.loads((out / "video.json").read_text())
    assert (record["fps"], record["sampler"]) == (fps, "UniPCMultistepScheduler")
    assert record["guidance_scale_2"] == (4.0 if kind == "t2v-a14b" else None)
    assert read_video(str(out / "video.mp4"))[1] == fps


def test_python_calls_take_the_models_size_and_sampling(folder):
    """``pipe(reference, prompt)`` and ``pipe.generate`` without settings use the model's (``default_video``,
    ``default_sampling``: a run's size and validation settings), as ``jaxvc generate`` and ``generate_videos`` do,
    not fixed 16 x 512 x 512 / DDIM 30 / CFG 8."""
    own = CustomVideoPipeline.from_pretrained(folder)
    own.default_video = (3, 16, 16)  # as a run's pipeline carries its training size ...
    own.default_sampling = {"num_inference_steps": 2, "guidance_scale": 3.0, "eta": 0.5, "sampler": None,
                            "negative_prompt": "blurry"}  # ... and its validation settings
    default = own(_image(0), "a red star", seed=1, progress=False)
    assert default.shape == (3, 16, 16, 3)
    explicit = own(_image(0), "a red star", seed=1, progress=False, num_frames=3, height=16, width=16,
                   num_inference_steps=2, guidance_scale=3.0, eta=0.5, negative_prompt="blurry")
    np.testing.assert_array_equal(default, explicit)
    latents = own(_image(0), "a red star", seed=1, progress=False, output_type="latent")
    assert not np.array_equal(latents, own(_image(0), "a red star", seed=1, progress=False, output_type="latent",
                                           negative_prompt=""))  # the model's negative prompt was used
    # another sampler: DDIM's eta is not carried over
    dpm = own(_image(0), "a red star", seed=1, progress=False, sampler="dpm++")
    np.testing.assert_array_equal(dpm, own(_image(0), "a red star", seed=1, progress=False, sampler="dpm++", eta=0.0))
