"""`jaxvc demo` end to end at a tiny scale (3 training steps): it trains, checkpoints, generates with and without the
reference for a held-out subject, scores both, and writes every promised file."""
import json

from jaxvc.cli import main as jaxvc_main


def test_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    code = jaxvc_main(["demo", "--out", str(out), "--steps", "3", "--batch-size", "2", "--subjects", "1",
                       "--motions", "left", "--sampling-steps", "2", "--videos", "1",
                       "--override", "checkpoint.every=2", "--override", "progress_bar=False"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "with reference" in printed and "no reference" in printed
    for name in ("contact_sheet.png", "metrics.json", "video_0_reference.mp4", "video_0_baseline.gif", "config.json"):
        assert (out / name).stat().st_size > 0, name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["final_step"] == 3
    for branch in ("reference", "baseline"):
        assert 0.0 <= metrics[branch]["fidelity"] <= 1.0 and metrics[branch]["num_videos"] == 1
    checkpoints = sorted(p.name for p in (out / "run" / "checkpoints").iterdir() if p.name.isdigit())
    assert "3" in checkpoints, checkpoints
