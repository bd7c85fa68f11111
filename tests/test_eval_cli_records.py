"""``jaxvc eval``'s records and per-video bookkeeping (jaxvc/eval/cli.py): null fields, an empty manifest, a metric
that refuses one video (only that metric loses it), transparent references (put on white, as generation does)."""
import json

import numpy as np
import pytest

from jaxvc.cli import main as jaxvc_main
from jaxvc.eval.cli import RecordError, read_records


def test_null_references_are_absent_and_video_must_be_a_path(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"video": "a.mp4", "references": None, "prompt": "p"}) + "\n"
                        + json.dumps({"video": "b.mp4", "references": None, "reference": "r.png"}))
    first, second = read_records([manifest])
    assert first["references"] == [] and second["references"] == [str(tmp_path / "r.png")]
    for video in (None, "", 3, ["a.mp4"]):
        manifest.write_text(json.dumps({"video": "a.mp4"}) + "\n" + json.dumps({"video": video}))
        with pytest.raises(RecordError, match=r"m\.jsonl:2: \"video\" must be a non-empty path"):
            read_records([manifest])
    manifest.write_text(json.dumps({"video": "a.mp4", "references": 3}))
    with pytest.raises(RecordError, match=r"m\.jsonl:1: \"references\" must be a list of paths"):
        read_records([manifest])


def test_an_empty_manifest_is_an_error(tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "empty.json").write_text("")
    # the records are read before any model is loaded: the folder need not exist
    code = jaxvc_main(["eval", str(tmp_path / "empty.jsonl"), str(tmp_path / "empty.json"),
                       "--clip-model", str(tmp_path / "no-clip")])
    assert code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "no records" in error[0]
    assert str(tmp_path / "empty.jsonl") in error[0] and str(tmp_path / "empty.json") in error[0]


torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tests import test_eval_metrics  # noqa: E402
from tests.test_eval_metrics import PROMPTS, images  # noqa: E402

models = test_eval_metrics.models  # the module's tiny CLIP and DINO folders (a fixture)


def test_a_refusing_metric_drops_the_video_from_that_metric_only(models, tmp_path):
    """A 2-frame video: motion smoothness refuses it (< 3 frames); its CLIP-T and DINO-I are still reported."""
    from jaxvc.media import write_mp4
    from tests.test_amt_motion_smoothness import moving_texture, random_torch_amt, save_checkpoint

    clip_folder, dino_folder = models
    save_checkpoint(random_torch_amt(seed=7), tmp_path / "amt-s.safetensors")
    frames = moving_texture(4, 128, 128, seed=8, step=(1, 2))
    write_mp4(tmp_path / "a.mp4", frames, fps=8, min_size=128)
    write_mp4(tmp_path / "short.mp4", frames[:2], fps=8, min_size=128)
    from PIL import Image

    Image.fromarray(frames[0]).save(tmp_path / "ref.png")
    (tmp_path / "set.jsonl").write_text("\n".join(
        json.dumps({"video": name, "prompt": PROMPTS[0], "reference": "ref.png"}) for name in ("a.mp4", "short.mp4")))
    out = tmp_path / "scores.json"
    code = jaxvc_main(["eval", str(tmp_path / "set.jsonl"), "--clip-model", str(clip_folder), "--dino-model",
                       str(dino_folder), "--amt-model", str(tmp_path / "amt-s.safetensors"), "--out", str(out)])
    assert code == 1
    summary = json.loads(out.read_text())
    [line] = summary["skipped"]
    assert "set.jsonl:2: motion smoothness:" in line and "3 frames" in line
    whole, short = summary["videos"]
    assert "motion_smoothness" in whole and "motion_smoothness" not in short
    assert all(name in short for name in ("clip_t", "clip_i", "dino_i")) and short["frames"] == 2
    assert summary["counts"]["clip_t"] == summary["counts"]["dino_i"] == 2
    assert summary["counts"]["motion_smoothness"] == 1


def test_transparent_references_are_put_on_white(models, tmp_path):
    """An RGBA reference scores as its composite on white (what generation conditions on), not on black."""
    from PIL import Image

    from jaxvc.media import write_mp4

    clip_folder, _ = models
    rgba = images(3, 1, 32, 32)[0]
    alpha = np.zeros((32, 32), np.uint8)
    alpha[8:24, 8:24] = 255  # a subject in the middle, transparent around it
    Image.fromarray(np.dstack([rgba, alpha]), "RGBA").save(tmp_path / "cutout.png")
    for name, background in (("white", (255, 255, 255)), ("black", (0, 0, 0))):
        composite = Image.alpha_composite(Image.new("RGBA", (32, 32), (*background, 255)),
                                          Image.open(tmp_path / "cutout.png"))
        composite.convert("RGB").save(tmp_path / f"{name}.png")
    write_mp4(tmp_path / "v.mp4", images(4, 3, 32, 32), min_size=32)
    (tmp_path / "set.jsonl").write_text("\n".join(json.dumps({"video": "v.mp4", "reference": f"{name}.png"})
                                                  for name in ("cutout", "white", "black")))
    out = tmp_path / "scores.json"
    assert jaxvc_main(["eval", str(tmp_path / "set.jsonl"), "--clip-model", str(clip_folder), "--out",
                       str(out)]) == 0
    cutout, white, black = (video["clip_i"] for video in json.loads(out.read_text())["videos"])
    assert cutout == pytest.approx(white, abs=1e-6)
    assert abs(white - black) > 1e-4  # the background matters to the score, so the check above means something
