"""Scaling fits by least squares in log space (numpy/scipy only; every function takes plain sequences).

* ``fit_power_law(C, L)``: ``L = a * C^-b + c`` (the irreducible loss ``c`` >= 0 is fitted when there are at least
  4 points, else ``c = 0``), minimising the squared error of ``log L``;
* ``fit_log_linear(C, L)``: ``L = alpha + beta * log10 C``;
* ``scaling_efficiency(chips, throughput)``: throughput per chip relative to the smallest chip count, and the
  exponent ``k`` of ``throughput ∝ chips^k`` (1 = perfect scaling);
* ``best_lr(lrs, losses)``: the loss-minimising LR of one batch size (a parabola in log LR through the best grid
  LR and its neighbours when it is interior), and ``fit_lr_vs_batch``: ``lr* = A * batch^k``.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def linear_fit(x: Sequence[float], y: Sequence[float]) -> tuple[float, float, float]:
    """(slope, intercept, R²) of the least-squares line ``y = slope * x + intercept``."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.size < 2 or np.ptp(x) == 0:
        raise ValueError(f"a line needs at least 2 distinct x values, got {x.tolist()}")
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (slope * x + intercept)
    total = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - float(np.sum(residual ** 2)) / total if total > 0 else 1.0
    return float(slope), float(intercept), r2


def _check_positive(name: str, values: np.ndarray) -> None:
    if values.size and (not np.all(np.isfinite(values)) or np.any(values <= 0)):
        raise ValueError(f"{name} must be finite and > 0 for a log-space fit, got {values.tolist()}")


def fit_power_law(compute: Sequence[float], loss: Sequence[float], with_offset: bool | None = None) -> dict:
    """``L = a * C^-b + c`` by least squares on ``log L``; returns a, b, c, the log-space RMSE and R², n, form.

    ``c`` is found by variable projection (for a fixed ``c``, ``log(L - c)`` is linear in ``log C``), then
    ``(log a, b, c)`` are refined jointly. ``with_offset=None`` fits ``c`` when there are >= 4 points.
    """
    from scipy import optimize

    C, L = np.asarray(compute, np.float64), np.asarray(loss, np.float64)
    if C.shape != L.shape:
        raise ValueError(f"compute and loss differ in length: {C.size} vs {L.size}")
    _check_positive("compute", C)
    _check_positive("loss", L)
    if C.size < 2 or np.ptp(C) == 0:
        raise ValueError(f"a power law needs at least 2 distinct compute values, got {C.tolist()}")
    with_offset = C.size >= 4 if with_offset is None else with_offset
    log_c, log_l = np.log(C), np.log(L)

    def line_for(offset: float) -> tuple[float, float]:  # (b, log a) of log(L - offset) = log a - b log C
        slope, intercept = np.polyfit(log_c, np.log(L - offset), 1)
        return -slope, intercept

    def residual(params: np.ndarray) -> np.ndarray:
        log_a, b, offset = params
        return np.log(np.exp(log_a - b * log_c) + offset) - log_l

    offset = 0.0
    if with_offset:
        top = float(L.min()) * (1 - 1e-9)
        projected = lambda o: float(np.sum(residual(np.array([*line_for(o)[::-1], o])) ** 2))
        offset = float(optimize.minimize_scalar(projected, bounds=(0.0, top), method="bounded",
                                                options={"xatol": top * 1e-12}).x)
    b, log_a = line_for(offset)
    if with_offset:
        refined = optimize.least_squares(residual, x0=[log_a, b, offset], xtol=1e-15, ftol=1e-15, gtol=1e-15,
                                         bounds=([-np.inf, -np.inf, 0.0], [np.inf, np.inf, float(L.min())]))
        log_a, b, offset = (float(v) for v in refined.x)
    res = residual(np.array([log_a, b, offset]))
    total = float(np.sum((log_l - log_l.mean()) ** 2))
    return {"form": "L = a * C^-b + c" if with_offset else "L = a * C^-b", "a": float(np.exp(log_a)), "b": float(b),
            "c": float(offset), "rmse_log": float(np.sqrt(np.mean(res ** 2))),
            "r2_log": 1.0 - float(np.sum(res ** 2)) / total if total > 0 else 1.0, "n": int(C.size)}


def power_law(compute, fit: dict) -> np.ndarray:
    return fit["a"] * np.asarray(compute, np.float64) ** -fit["b"] + fit["c"]


def fit_log_linear(compute: Sequence[float], loss: Sequence[float]) -> dict:
    """``L = alpha + beta * log10 C``."""
    C = np.asarray(compute, np.float64)
    _check_positive("compute", C)
    beta, alpha, r2 = linear_fit(np.log10(C), loss)
    return {"form": "L = alpha + beta * log10(C)", "alpha": alpha, "beta": beta, "r2": r2, "n": int(C.size)}


def scaling_efficiency(chips: Sequence[int], throughput: Sequence[float]) -> dict:
    """Per chip count: throughput, per-chip throughput and efficiency vs the smallest count; the exponent k."""
    n, t = np.asarray(chips, np.float64), np.asarray(throughput, np.float64)
    _check_positive("chips", n)
    _check_positive("throughput", t)
    order = np.argsort(n, kind="stable")
    n, t = n[order], t[order]
    base = t[0] / n[0]
    out = {"chips": [int(c) for c in n], "throughput": t.tolist(), "per_chip": (t / n).tolist(),
           "efficiency": (t / n / base).tolist(), "exponent": None, "r2": None}
    if n.size >= 2 and np.ptp(n) > 0:
        out["exponent"], _, out["r2"] = linear_fit(np.log(n), np.log(t))
    return out


def best_lr(lrs: Sequence[float], losses: Sequence[float]) -> dict:
    """The best LR of one batch size: the grid argmin, refined by a parabola in log LR when it is interior."""
    lr, loss = np.asarray(lrs, np.float64), np.asarray(losses, np.float64)
    _check_positive("learning rate", lr)
    keep = np.isfinite(loss)
    if not keep.any():
        raise ValueError(f"no finite loss among learning rates {lr.tolist()}")
    lr, loss = lr[keep], loss[keep]
    order = np.argsort(lr)
    lr, loss = lr[order], loss[order]
    i = int(np.argmin(loss))
    result = {"lr": float(lr[i]), "loss": float(loss[i]), "grid_lr": float(lr[i]), "interpolated": False}
    if 0 < i < lr.size - 1:
        x = np.log(lr[i - 1:i + 2])
        curvature, slope, intercept = np.polyfit(x, loss[i - 1:i + 2], 2)
        if curvature > 0:
            vertex = -slope / (2 * curvature)
            result.update(lr=float(np.exp(vertex)), loss=float(intercept - slope ** 2 / (4 * curvature)),
                          interpolated=True)
    return result


def fit_lr_vs_batch(batches: Sequence[float], best_lrs: Sequence[float]) -> dict:
    """``lr* = A * batch^k`` by a line in log-log space."""
    b, lr = np.asarray(batches, np.float64), np.asarray(best_lrs, np.float64)
    _check_positive("batch", b)
    _check_positive("best learning rate", lr)
    k, log_a, r2 = linear_fit(np.log(b), np.log(lr))
    return {"form": "lr* = A * batch^k", "A": float(math.exp(log_a)), "k": k, "r2": r2, "n": int(b.size)}
