"""The sweep's PNGs (matplotlib, Agg backend): what people look at after a scaling study.

* ``loss_vs_compute.png``       per model size, the best run's loss curve against compute (FLOPs) and every point's
                                final loss; the power law fitted to the best final losses
* ``throughput_vs_chips.png``   samples/s vs chips per group, with the ideal linear scaling from the smallest count
* ``optimal_lr_vs_batch.png``   the best LR of each batch size per model size, and the fitted ``lr* ∝ batch^k``
* ``loss_curves.png``           training loss vs step of every point
Every file is always written; a panel the grid cannot fill says so in its middle.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from jaxvc.sweep import fit as fits_lib

PLOT_FILES = ("loss_vs_compute.png", "throughput_vs_chips.png", "optimal_lr_vs_batch.png", "loss_curves.png")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display (CI, TPU VMs)
    import matplotlib.pyplot as plt

    return plt


def _empty(ax, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, wrap=True)


def _done(rows):
    return [r for r in rows if r.get("status") == "done"]


def smooth(values, window: int) -> np.ndarray:
    """Running mean over the last ``window`` values (shorter at the start): training losses are noisy."""
    values = np.asarray(values, np.float64)
    sums = np.cumsum(np.insert(values, 0, 0.0))
    starts = np.maximum(np.arange(1, values.size + 1) - window, 0)
    return (sums[1:] - sums[starts]) / (np.arange(1, values.size + 1) - starts)


def _loss_vs_compute(ax, rows, fits) -> None:
    done = [r for r in _done(rows) if r.get("flops_per_step") and np.isfinite(r["final_loss"])]
    if not done:
        _empty(ax, "no finished point with FLOPs and a finite loss")
        return
    best: dict[str, dict] = {}
    for r in done:
        model = r.get("model") or "config"
        if model not in best or r["final_loss"] < best[model]["final_loss"]:
            best[model] = r
    for model, r in best.items():  # the best run of each size: its loss curve in compute units
        steps, losses = (np.array(v) for v in zip(*r["loss_curve"]))
        window = max(1, int(round(0.2 * steps.size)))  # the final-loss window
        line, = ax.plot(steps * r["flops_per_step"], smooth(losses, window), "-",
                        label=f"model {model} ({r['params_trainable']:,} params), best: {r['id']}")
        others = [o for o in done if (o.get("model") or "config") == model]
        ax.plot([o["compute_flops"] for o in others], [o["final_loss"] for o in others], "o",
                color=line.get_color(), alpha=0.6)
    power = fits.get("loss_vs_compute", {}).get("power_law", {})
    if "b" in power:
        compute = np.array([p["compute_flops"] for p in fits["loss_vs_compute"]["points"]])
        grid = np.geomspace(compute.min(), compute.max(), 100)
        ax.plot(grid, fits_lib.power_law(grid, power), "k--",
                label=f"fit: {power['a']:.3g}·C^-{power['b']:.3g} + {power['c']:.3g}")
    ax.set_xscale("log")
    ax.set_xlabel("training compute (FLOPs); dots: final loss of every point")
    ax.set_ylabel("loss (running mean)")
    ax.legend(fontsize=6)


def _throughput(ax, fits) -> None:
    entries = [e for e in fits.get("throughput_vs_chips", []) if "chips" in e]
    if not entries:
        _empty(ax, "no finished point")
        return
    for entry in entries:
        chips, throughput = np.array(entry["chips"]), np.array(entry["throughput"])
        line, = ax.plot(chips, throughput, "o-", label=entry["group"])
        ax.plot(chips, throughput[0] / chips[0] * chips, ":", color=line.get_color(), alpha=0.6)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("chips (dotted: linear scaling)")
    ax.set_ylabel("samples / s")
    ax.legend(fontsize=7)


def _optimal_lr(ax, fits) -> None:
    drawn = False
    for entry in fits.get("optimal_lr_vs_batch", []):
        batches = np.array([int(b) for b in entry["best"]])
        lrs = np.array([v["lr"] for v in entry["best"].values()])
        line, = ax.plot(batches, lrs, "o", label=entry["group"])
        drawn = True
        if "k" in entry["fit"]:
            grid = np.geomspace(batches.min(), batches.max(), 50)
            ax.plot(grid, entry["fit"]["A"] * grid ** entry["fit"]["k"], "--", color=line.get_color(),
                    label=f"lr* ∝ batch^{entry['fit']['k']:.2f}")
    if not drawn:
        _empty(ax, "no finished point")
        return
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("global batch")
    ax.set_ylabel("best learning rate")
    ax.legend(fontsize=7)


def _loss_curves(ax, rows) -> None:
    done = [r for r in _done(rows) if r.get("loss_curve")]
    if not done:
        _empty(ax, "no finished point")
        return
    for r in done:
        steps, losses = zip(*r["loss_curve"])
        ax.plot(steps, losses, label=r["id"], alpha=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend(fontsize=6)


def draw_plots(out: Path, rows: list[dict], fits: dict) -> list[Path]:
    """Write the four PNGs into ``out``; returns their paths."""
    plt = _pyplot()
    out = Path(out)
    painters = {"loss_vs_compute.png": ("loss vs compute", lambda ax: _loss_vs_compute(ax, rows, fits)),
                "throughput_vs_chips.png": ("throughput vs chips", lambda ax: _throughput(ax, fits)),
                "optimal_lr_vs_batch.png": ("optimal LR vs batch", lambda ax: _optimal_lr(ax, fits)),
                "loss_curves.png": ("loss curves", lambda ax: _loss_curves(ax, rows))}
    written = []
    for name in PLOT_FILES:
        title, paint = painters[name]
        figure, ax = plt.subplots(figsize=(6, 4.5))
        paint(ax)
        ax.set_title(title)
        figure.tight_layout()
        figure.savefig(out / name, dpi=100)
        plt.close(figure)
        written.append(out / name)
    return written
