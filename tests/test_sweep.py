"""`jaxvc sweep`: grid expansion, the scaling fits on synthetic data with known exponents, and a tiny real sweep
(the toy denoiser at two widths x two mesh layouts on 2 simulated CPU devices) that writes the table, the loss
curves and the plots, and resumes by skipping finished points."""
import csv
import json
import math

import numpy as np
import pytest

from jaxvc.cli import main as jaxvc_main
from jaxvc.sweep import collect, fit
from jaxvc.sweep.grid import GridError, parse_grid, parse_grid_arg, parse_mesh
from jaxvc.sweep.plots import PLOT_FILES
from jaxvc.sweep.sizes import apply_size, scaled_widths


# ------------------------------------------------------------------------------------------------ grid and sizes
def test_grid_expands_in_order_with_mesh_layouts_and_stable_ids():
    points = parse_grid(["model=s,m", "batch_size=4,8", "optim.lr=1e-4,3e-4,1e-3", "mesh=data=1|data=2|data=2,fsdp=2"])
    assert len(points) == 2 * 2 * 3 * 3
    first, last = points[0], points[-1]
    assert first.as_dict == {"model": "s", "batch_size": "4", "optim.lr": "1e-4", "mesh": "data=1"}
    assert last.as_dict == {"model": "m", "batch_size": "8", "optim.lr": "1e-3", "mesh": "data=2,fsdp=2"}
    assert points[1].as_dict["mesh"] == "data=2"  # the last axis varies fastest
    assert last.mesh == {"data": 2, "fsdp": 2, "tensor": 1, "sequence": 1}
    assert last.overrides == [("batch_size", "8"), ("optim.lr", "1e-3")]  # model and mesh are not config overrides
    assert last.id == "model-m_bs-8_lr-1e-3_mesh-data2-fsdp2"
    assert len({p.id for p in points}) == len(points)
    assert parse_grid(["model=s,m"])[1].id == parse_grid(["model=s,m"])[1].id  # stable across calls
    assert parse_grid_arg("mesh=data=2,fsdp=2") == ("mesh", ["data=2,fsdp=2"])  # one layout, not two
    assert parse_grid([])[0].id == "base"


@pytest.mark.parametrize("bad, message", [
    (["optim.lr"], "expected KEY=V1"), (["batch_size=4,,8"], "empty value"), (["batch_size=4,4"], "repeated"),
    (["mesh=data=2|model=2"], "axis one of"), (["mesh=data=-1,fsdp=-1"], "at most one"),
    (["batch_size=4", "batch_size=8"], "given twice"),
])
def test_grid_errors_say_what_is_wrong(bad, message):
    with pytest.raises(GridError, match=message):
        parse_grid(bad)


def test_size_table_scales_widths_in_group_multiples():
    from jaxvc.config_utils import load_config

    assert scaled_widths((32, 64, 64), 0.25, 8) == (8, 16, 16)
    assert scaled_widths((32, 64), 0.1, 8) == (8, 8)  # never below one group
    demo = load_config("configs/videomaker.py:demo")
    assert tuple(demo.model.unet_overrides.block_out_channels) == (64, 64, 64)
    config = apply_size(demo, "m")
    assert tuple(config.model.unet_overrides.block_out_channels) == (128, 128, 128)
    assert config.model.unet_overrides.down_block_types == demo.model.unet_overrides.down_block_types  # topology kept
    config = apply_size(load_config("configs/videomaker.py:tiny"), "xs")  # widths from the named UNet variant
    assert tuple(config.model.unet_overrides.block_out_channels) == (16, 32)
    config = apply_size(load_config("configs/videomaker.py:demo"), "sd15")
    assert config.model.unet_variant == "sd15" and "block_out_channels" not in config.model.unet_overrides
    assert apply_size(load_config("configs/toy.py:tiny"), "m").model.features == 16
    with pytest.raises(ValueError, match="size table"):
        apply_size(load_config("configs/toy.py:tiny"), "huge")


# ------------------------------------------------------------------------------------------------------- fits
def test_power_law_fit_recovers_exponent_and_offset():
    compute = np.geomspace(1e12, 1e18, 7)
    result = fit.fit_power_law(compute, 2.0 * compute ** -0.3 + 0.5)  # irreducible loss 0.5
    assert abs(result["b"] - 0.3) < 1e-3 and abs(result["c"] - 0.5) < 1e-3 and abs(result["a"] / 2.0 - 1) < 1e-2
    assert result["rmse_log"] < 1e-6
    pure = fit.fit_power_law(compute[:3], 7.0 * compute[:3] ** -0.05)  # 3 points: no offset fitted
    assert pure["form"] == "L = a * C^-b" and abs(pure["b"] - 0.05) < 1e-9 and pure["c"] == 0.0
    line = fit.fit_log_linear(compute, 3.0 - 0.25 * np.log10(compute))
    assert abs(line["beta"] + 0.25) < 1e-9 and abs(line["alpha"] - 3.0) < 1e-9
    with pytest.raises(ValueError, match="distinct compute"):
        fit.fit_power_law([1e9, 1e9], [1.0, 0.9])


def test_scaling_efficiency_and_optimal_lr_fit_recover_known_values():
    scaling = fit.scaling_efficiency([4, 1, 2, 8], [100 * n ** 0.9 for n in (4, 1, 2, 8)])
    assert scaling["chips"] == [1, 2, 4, 8] and abs(scaling["exponent"] - 0.9) < 1e-9
    assert np.allclose(scaling["efficiency"], [n ** -0.1 for n in (1, 2, 4, 8)])
    # loss quadratic in log LR around lr*(B) = 1e-3 * (B / 8)^0.5: the interpolated optimum is exact, so is k
    lrs = np.geomspace(1e-4, 1e-1, 7)
    batches = [8, 16, 32, 64]
    best = [fit.best_lr(lrs, (np.log(lrs) - np.log(1e-3 * (b / 8) ** 0.5)) ** 2 + 0.3)["lr"] for b in batches]
    assert np.allclose(best, [1e-3 * (b / 8) ** 0.5 for b in batches], rtol=1e-9)
    lr_fit = fit.fit_lr_vs_batch(batches, best)
    assert abs(lr_fit["k"] - 0.5) < 1e-3 and abs(lr_fit["A"] / (1e-3 / 8 ** 0.5) - 1) < 1e-6
    edge = fit.best_lr([1e-3, 1e-2], [0.5, 0.7])  # best at the edge of the grid: no interpolation
    assert edge == {"lr": 1e-3, "loss": 0.5, "grid_lr": 1e-3, "interpolated": False}


def test_compute_fits_groups_rows_by_the_other_grid_values():
    """Rows as the points write them: the best LR is picked per batch, throughput per chips per group."""
    rows = []
    for batch in (4, 16):
        for lr in (1e-4, 1e-3, 1e-2):
            for mesh, chips, speed in (("data=1", 1, 1.0), ("data=2", 2, 1.8)):
                loss = 1.0 + (math.log10(lr) - math.log10(1e-4 * batch / 4)) ** 2  # lr* = 1e-4 * batch / 4
                rows.append({"id": f"{batch}-{lr}-{mesh}", "status": "done", "batch_size": batch, "lr": lr,
                             "chips": chips, "samples_per_s": 10.0 * batch * speed, "final_loss": loss,
                             "compute_flops": 1e9 * batch, "values": {"batch_size": str(batch), "optim.lr": str(lr),
                                                                      "mesh": mesh}})
    fits = collect.compute_fits(rows)
    (optimal,) = fits["optimal_lr_vs_batch"]
    assert optimal["best"]["4"]["lr"] == pytest.approx(1e-4) and optimal["best"]["16"]["grid_lr"] == 1e-3
    throughput = {entry["group"]: entry for entry in fits["throughput_vs_chips"]}
    assert set(throughput) == {"batch_size=4", "batch_size=16"}
    assert throughput["batch_size=16"]["efficiency"] == pytest.approx([1.0, 0.9])
    assert len(fits["loss_vs_compute"]["points"]) == 2  # one best-LR point per batch


# ----------------------------------------------------------------------------------------------- a real sweep
SWEEP = ["sweep", "--config", "configs/toy.py:tiny", "--grid", "model=s,m", "--grid", "mesh=data=1|data=2",
         "--devices", "2", "--steps", "5", "--fast-compile", "--config.batch_size=4", "--config.optim.warmup_steps=0"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    assert jaxvc_main([*SWEEP, "--out", str(out)]) == 0
    return out


def test_tiny_sweep_writes_rows_curves_fits_and_plots(sweep, capsys):
    with (sweep / "results.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert [r["id"] for r in table] == ["model-s_mesh-data1", "model-s_mesh-data2", "model-m_mesh-data1",
                                        "model-m_mesh-data2"]
    assert all(r["status"] == "done" for r in table)
    results = json.loads((sweep / "results.json").read_text())
    rows = {r["id"]: r for r in results["rows"]}
    small, large = rows["model-s_mesh-data1"], rows["model-m_mesh-data1"]
    assert small["chips"] == 1 and rows["model-s_mesh-data2"]["chips"] == 2
    assert rows["model-s_mesh-data2"]["mesh"]["data"] == 2
    assert large["params_trainable"] > 2 * small["params_trainable"]  # twice the width: ~4x the conv weights
    assert large["flops_per_step"] > 2 * small["flops_per_step"] > 0
    # the sharded step does the same total work: FLOPs per device halve on 2 devices (within XLA's bookkeeping)
    split = rows["model-m_mesh-data2"]
    assert split["flops_per_step_per_device"] == pytest.approx(large["flops_per_step_per_device"] / 2, rel=0.1)
    for row in rows.values():
        assert [step for step, _ in row["loss_curve"]] == [1, 2, 3, 4, 5]
        assert all(math.isfinite(loss) for _, loss in row["loss_curve"])
        assert row["final_loss"] == pytest.approx(row["loss_curve"][-1][1])  # 20% of 5 steps: the last one
        assert row["step_time_s"] > 0 and row["timed_steps"] == 2  # 4 intervals, 2 warm-up
        assert row["samples_per_s"] == pytest.approx(4 / row["step_time_s"])
        assert row["compute_flops"] == pytest.approx(5 * row["flops_per_step"])
        assert row["mfu"] is None  # a CPU has no peak in the table and none was given
    assert {e["group"] for e in results["fits"]["throughput_vs_chips"]} == {"model=s", "model=m"}
    assert all(e["chips"] == [1, 2] for e in results["fits"]["throughput_vs_chips"])
    assert "b" in results["fits"]["loss_vs_compute"]["power_law"]  # two model sizes: a pure power law
    for name in PLOT_FILES:
        assert (sweep / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert not (sweep / "points" / "model-s_mesh-data1" / "run" / "checkpoints").exists()


def test_resume_skips_finished_points(sweep, capsys):
    capsys.readouterr()
    assert jaxvc_main([*SWEEP, "--out", str(sweep)]) == 2  # results there and no --resume: refuse
    assert "--resume" in capsys.readouterr().err
    redo = sweep / "points" / "model-m_mesh-data2"
    kept = sweep / "points" / "model-s_mesh-data1" / "result.json"
    kept_before = kept.read_text()
    (redo / "result.json").unlink()
    for marker in redo.glob("done.*"):
        marker.unlink()
    assert jaxvc_main([*SWEEP, "--out", str(sweep), "--resume"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("done before, skipped") == 3
    assert "model-m_mesh-data2: ok" in printed
    assert kept.read_text() == kept_before
    assert json.loads((redo / "result.json").read_text())["status"] == "done"
    assert len(json.loads((sweep / "results.json").read_text())["rows"]) == 4
    assert jaxvc_main([*SWEEP, "--out", str(sweep), "--dry-run"]) == 0
    assert capsys.readouterr().out.count(" done\n") == 4


def test_parse_mesh_rejects_bad_sizes():
    with pytest.raises(GridError, match="not an integer"):
        parse_mesh("data=two")
    assert parse_mesh("fsdp=-1") == {"data": 1, "fsdp": -1, "tensor": 1, "sequence": 1}
