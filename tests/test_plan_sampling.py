"""``jaxvc plan --sample``: one guided denoising step of a Wan DiT compiled by the real TPU compiler (libtpu's
abstract v5e slice) in ``jaxvc generate --mesh``'s layout. What is proved: the layouts compile and report positive
FLOPs and memory; fsdp holds a fraction of the parameters per device (against replicated parameters with data=4)
and gathers them (all-gathers); splitting the tokens over fsdp divides each device's FLOPs (data=4 keeps the batch
whole, so every device computes the whole step); the image-to-video shape (CLIP tokens, 36 channels) compiles; the
CLI prints the table and the sampling time; bad sizes fail clearly."""
import json

import pytest

from jaxvc.plan.hardware import find_libtpu

if find_libtpu() is None:
    pytest.skip("libtpu is not installed (bash launch/setup_env.sh --test puts it in .venv/opt/libtpu)",
                allow_module_level=True)

from jaxvc.cli import main  # noqa: E402


def test_sampling_layouts_on_a_v5e_slice(tmp_path, capsys):
    out = tmp_path / "sample.json"
    assert main(["plan", "--sample", "tiny", "--topology", "v5e:2x2", "--frames", "9", "--height", "64", "--width",
                 "64", "--steps", "30", "--dtype", "float32", "--mesh", "fsdp=4", "--mesh", "fsdp=2,sequence=2",
                 "--mesh", "data=4", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "30 steps ~" in printed and "FITS" in printed
    layouts = {r["mesh_label"]: r for r in json.loads(out.read_text())["layouts"]}
    for r in layouts.values():
        assert r["fits"] and r["flops_per_device"] > 0 and r["memory"]["total"] > 0 and r["sampling_s"] > 0
        assert r["tokens"] == 3 * 4 * 4 and r["latents"] == [3, 8, 8]
    assert layouts["data=4"]["memory"]["arguments"] >= 4 * layouts["data=4"]["params"]  # replicated float32
    assert layouts["fsdp=4"]["memory"]["arguments"] < 0.75 * layouts["data=4"]["memory"]["arguments"]
    assert layouts["fsdp=4"]["collectives"]["all-gather"]["count"] > 0  # the weights are gathered layer by layer
    assert layouts["data=4"]["collectives"]["all-gather"]["count"] == 0
    assert layouts["fsdp=4"]["flops_per_device"] < 0.5 * layouts["data=4"]["flops_per_device"]


def test_image_to_video_shape_compiles():
    from jaxvc.plan.hardware import slice_devices
    from jaxvc.plan.sampling import plan_sampling

    small = dict(num_attention_heads=4, attention_head_dim=16, ffn_dim=96, num_layers=1, text_dim=32, freq_dim=16,
                 image_dim=24, added_kv_proj_dim=64)  # wan21_i2v_14b's parts (CLIP tokens, 36 channels), small
    report = plan_sampling("wan21_i2v_14b", slice_devices("v5e:2x2"), {"fsdp": 4}, frames=5, height=64, width=64,
                           **small)
    assert report["fits"] and report["flops_per_device"] > 0 and report["params"] > 0


def test_bad_sizes_fail_clearly(capsys):
    assert main(["plan", "--sample", "wan21_t2v_1.3b", "--topology", "v5e:2x2", "--frames", "80"]) == 2
    assert "1 + 4k frames" in capsys.readouterr().err
    assert main(["plan", "--sample", "wan21_t2v_1.3b", "--topology", "v5e:2x2", "--height", "100"]) == 2
    assert "multiple of 16" in capsys.readouterr().err
    assert main(["plan", "--sample", "wan9", "--topology", "v5e:2x2"]) == 2
    assert "not a Wan size" in capsys.readouterr().err
    assert main(["plan", "--sample", "wan21_t2v_1.3b", "--topology", "v5e:2x2", "--mesh", "fsdp=8"]) == 2
