"""The points' ``result.json`` files -> ``results.csv``, ``results.json`` (rows + loss curves + fits), the summary.

One row per grid point, in grid order; a point that failed has ``status=failed`` and its error, one not run yet
``status=pending``. The fits (``jaxvc/sweep/fit.py``) use the finished rows:
* loss vs compute: per model size and batch size, the best-LR run's (compute, final loss); a power law over all
  of them (with an offset from 4 points on) and a log-linear line;
* throughput vs chips: per model size and batch size (and any other grid key but the mesh and LR), samples/s
  against the chips of each mesh layout (the best of the LRs, which do not change the work);
* optimal LR vs batch: per model size (and any other grid key but the mesh, batch and LR), the best LR of each
  batch size and ``lr* ∝ batch^k``.
"""
from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path

from jaxvc.sweep import fit
from jaxvc.sweep.grid import MESH_KEY, Point, format_mesh

CSV_COLUMNS = ("id", "status", "model", "params_trainable", "params_total", "batch_size", "lr", "mesh", "chips",
               "device_kind", "steps", "step_time_s", "samples_per_s", "samples_per_s_per_chip", "mfu",
               "flops_per_step", "flops_per_step_per_device", "compute_flops", "final_loss", "first_step_s",
               "wall_s", "error")


def point_dir(out: Path, point: Point) -> Path:
    return Path(out) / "points" / point.id


def load_rows(out: Path, points: list[Point]) -> list[dict]:
    """One record per point: its result, its failure, or a pending placeholder."""
    rows = []
    for point in points:
        folder = point_dir(out, point)
        for name in ("result.json", "failed.json"):
            if (folder / name).is_file():
                row = json.loads((folder / name).read_text())
                break
        else:
            row = {"id": point.id, "status": "pending"}
        row["values"] = point.as_dict
        rows.append(row)
    return rows


def _group_key(row: dict, drop: tuple[str, ...]) -> tuple:
    return tuple((k, v) for k, v in row["values"].items() if k not in drop)


def _label(key: tuple) -> str:
    return ", ".join(f"{k}={v}" for k, v in key) or "all"


def _done(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("status") == "done" and math.isfinite(r.get("final_loss", math.nan))]


def best_per_group(rows: list[dict], drop: tuple[str, ...]) -> dict[tuple, dict]:
    """Per group (the grid values but ``drop``), the row of lowest final loss."""
    best: dict[tuple, dict] = {}
    for row in _done(rows):
        key = _group_key(row, drop)
        if key not in best or row["final_loss"] < best[key]["final_loss"]:
            best[key] = row
    return best


def _attempt(function, *args):
    try:
        return function(*args)
    except ValueError as err:  # too few or degenerate points: say why instead of a fit
        return {"error": str(err)}


def compute_fits(rows: list[dict]) -> dict:
    """The three fits of the sweep (each entry says why it is missing when the grid cannot support it)."""
    fits: dict = {}
    frontier = [r for r in best_per_group(rows, ("optim.lr", MESH_KEY)).values() if r.get("compute_flops")]
    compute = [r["compute_flops"] for r in frontier]
    losses = [r["final_loss"] for r in frontier]
    fits["loss_vs_compute"] = {"points": [{"id": r["id"], "compute_flops": r["compute_flops"],
                                           "final_loss": r["final_loss"]} for r in frontier],
                               "power_law": _attempt(fit.fit_power_law, compute, losses),
                               "log_linear": _attempt(fit.fit_log_linear, compute, losses)}

    by_group: dict[tuple, dict[int, float]] = defaultdict(dict)
    for row in (r for r in rows if r.get("status") == "done"):  # a diverged run's throughput still counts
        chips = int(row["chips"])
        group = by_group[_group_key(row, ("optim.lr", MESH_KEY))]
        group[chips] = max(group.get(chips, 0.0), float(row["samples_per_s"]))
    fits["throughput_vs_chips"] = [{"group": _label(key), **_attempt(fit.scaling_efficiency, list(t), list(t.values()))}
                                   for key, t in by_group.items()]

    # the mesh layout does not change the math: the same (batch, LR) on several layouts counts once (its best loss)
    lr_groups: dict[tuple, dict[int, dict[float, float]]] = defaultdict(lambda: defaultdict(dict))
    for row in _done(rows):
        losses_by_lr = lr_groups[_group_key(row, ("optim.lr", "batch_size", MESH_KEY))][int(row["batch_size"])]
        lr = float(row["lr"])
        losses_by_lr[lr] = min(losses_by_lr.get(lr, math.inf), float(row["final_loss"]))
    optimal = []
    for key, per_batch in lr_groups.items():
        best = {b: fit.best_lr(list(by_lr), list(by_lr.values())) for b, by_lr in sorted(per_batch.items())}
        entry = {"group": _label(key), "best": {str(b): v for b, v in best.items()}}
        entry["fit"] = _attempt(fit.fit_lr_vs_batch, list(best), [v["lr"] for v in best.values()])
        optimal.append(entry)
    fits["optimal_lr_vs_batch"] = optimal
    return fits


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, dict):
        return format_mesh(value)
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def write_results(out: Path, rows: list[dict], fits: dict, header: dict) -> tuple[Path, Path]:
    """``results.csv`` (scalars; grid values as ``grid.<key>`` columns) and ``results.json`` (everything)."""
    out = Path(out)
    grid_keys = list(dict.fromkeys(k for r in rows for k in r["values"]))
    csv_path = out / "results.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*CSV_COLUMNS, *(f"grid.{k}" for k in grid_keys)])
        for row in rows:
            writer.writerow([_cell(row.get(c)) for c in CSV_COLUMNS] + [row["values"].get(k, "") for k in grid_keys])
    json_path = out / "results.json"
    json_path.write_text(json.dumps({**header, "rows": rows, "fits": fits}, indent=1, default=float) + "\n")
    return csv_path, json_path


def summary_table(rows: list[dict], fits: dict) -> str:
    """The table printed at the end of a sweep (markdown), then one line per fit."""
    head = ("point", "params", "batch", "lr", "chips", "step ms", "samples/s", "MFU", "GFLOP/step", "final loss")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r.get("status") != "done":
            lines.append(f"| {r['id']} | {r.get('status')}: {r.get('error', '')[:80]} |" + " |" * (len(head) - 2))
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        gflops = f"{r['flops_per_step'] / 1e9:.3g}" if r.get("flops_per_step") else "-"
        lines.append(f"| {r['id']} | {r['params_trainable']:,} | {r['batch_size']} | {r['lr']:.3g} | {r['chips']} | "
                     f"{1e3 * r['step_time_s']:.1f} | {r['samples_per_s']:.1f} | {mfu} | {gflops} | "
                     f"{r['final_loss']:.4f} |")
    lines.append("")
    power = fits.get("loss_vs_compute", {}).get("power_law", {})
    if "b" in power:
        lines.append(f"loss vs compute: {power['form']} with a={power['a']:.4g}, b={power['b']:.4g}, "
                     f"c={power['c']:.4g} ({power['n']} points, log RMSE {power['rmse_log']:.3g})")
    else:
        lines.append(f"loss vs compute: no fit ({power.get('error', 'no points')})")
    for entry in fits.get("throughput_vs_chips", []):
        if entry.get("exponent") is not None:
            effs = ", ".join(f"{c} chips {100 * e:.0f}%" for c, e in zip(entry["chips"], entry["efficiency"]))
            lines.append(f"throughput vs chips [{entry['group']}]: samples/s ∝ chips^{entry['exponent']:.3f}; "
                         f"efficiency {effs}")
    for entry in fits.get("optimal_lr_vs_batch", []):
        best = ", ".join(f"batch {b}: {v['lr']:.3g}" for b, v in entry["best"].items())
        if "k" in entry["fit"]:
            lines.append(f"optimal LR [{entry['group']}]: {best}; lr* ∝ batch^{entry['fit']['k']:.3f}")
        else:
            lines.append(f"optimal LR [{entry['group']}]: {best}")
    return "\n".join(lines)
