"""The benchmark's results: one ``Measurement`` per (workload, implementation), the side-by-side table, JSON/CSV.

Rows are workloads at one resolution; columns are jaxvc, torch eager and torch.compile times, the torch/jaxvc
ratios (above 1: jaxvc is faster), jaxvc's throughput, the FLOP counts (XLA's and the analytic one), MFU per
implementation and peak memory.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

IMPLEMENTATIONS = ("jaxvc", "torch eager", "torch.compile")
WORKLOADS = ("train step", "sampling", "VAE decode")


@dataclasses.dataclass
class Measurement:
    workload: str
    implementation: str
    image_size: int
    batch: int
    step_s: float | None = None          # median seconds per call (a train step, a whole sampling run, a decode)
    min_s: float | None = None
    samples_per_s: float | None = None   # videos per second
    peak_memory_bytes: int | None = None
    memory_kind: str = ""
    xla_flops: float | None = None       # jaxvc only: from the compiled executable's cost analysis
    analytic_flops: float | None = None
    mfu: float | None = None             # model FLOPs / step time / measured peak
    mfu_flops_source: str = ""
    compile_s: float | None = None
    xla_planned_bytes: int | None = None
    error: str | None = None             # why there is no number (e.g. torch.compile unavailable)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


def finish(m: Measurement, peak_flops: float | None) -> Measurement:
    """Fill throughput and MFU. MFU counts model FLOPs, the same analytic count for every implementation: XLA's
    count is the compiled work instead (remat recompute included, cuDNN attention custom calls left out), so it is
    only the fallback where no analytic count exists."""
    if m.step_s:
        m.samples_per_s = m.batch / m.step_s
        flops, source = (m.analytic_flops, "analytic") if m.analytic_flops else (m.xla_flops, "xla cost_analysis")
        if flops and peak_flops:
            m.mfu, m.mfu_flops_source = flops / m.step_s / peak_flops, source
    return m


def _fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    return f"{seconds * 1e3:.1f} ms" if seconds < 10 else f"{seconds:.2f} s"


def _fmt_bytes(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2 ** 30:.2f} GiB"


def _fmt(value: float | None, pattern: str) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else pattern.format(value)


def table_rows(measurements: list[Measurement]) -> list[dict[str, str]]:
    """One row per (image size, workload) with the three implementations side by side."""
    by_key = {(m.image_size, m.workload, m.implementation): m for m in measurements}
    rows = []
    for size in sorted({m.image_size for m in measurements}):
        for workload in WORKLOADS:
            jax_m = by_key.get((size, workload, "jaxvc"))
            if jax_m is None:
                continue
            eager = by_key.get((size, workload, "torch eager"))
            compiled = by_key.get((size, workload, "torch.compile"))

            def t(m):
                return "skipped" if m is None else (_fmt_time(m.step_s) if m.step_s else f"n/a ({m.error})")

            def ratio(m):
                return _fmt(m.step_s / jax_m.step_s if m and m.step_s and jax_m.step_s else None, "{:.2f}x")

            def mfu(m):
                return _fmt(100 * m.mfu if m and m.mfu is not None else None, "{:.2f}%")

            rows.append({
                "workload": f"{workload} @{size}px",
                "jaxvc": t(jax_m), "torch eager": t(eager), "torch.compile": t(compiled),
                "eager/jaxvc": ratio(eager), "compile/jaxvc": ratio(compiled),
                "jaxvc videos/s": _fmt(jax_m.samples_per_s, "{:.3g}"),
                "GFLOP xla": _fmt(jax_m.xla_flops and jax_m.xla_flops / 1e9, "{:.4g}"),
                "GFLOP analytic": _fmt(jax_m.analytic_flops and jax_m.analytic_flops / 1e9, "{:.4g}"),
                "MFU jaxvc": mfu(jax_m), "MFU eager": mfu(eager), "MFU compile": mfu(compiled),
                "mem jaxvc": _fmt_bytes(jax_m.peak_memory_bytes),
                "mem torch": _fmt_bytes(eager.peak_memory_bytes if eager else None),
            })
    return rows


def format_table(rows: list[dict[str, str]]) -> str:
    """A GitHub-markdown table (readable in a terminal too)."""
    if not rows:
        return "(no measurements)"
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in columns}
    line = lambda values: "| " + " | ".join(v.ljust(widths[c]) for c, v in zip(columns, values)) + " |"
    out = [line(columns), "|" + "|".join("-" * (widths[c] + 2) for c in columns) + "|"]
    out += [line([r[c] for c in columns]) for r in rows]
    return "\n".join(out)


def write_outputs(out: str | Path, header: dict, measurements: list[Measurement], rows: list[dict]) -> list[Path]:
    """``out``.json (header, every measurement, the table rows) and ``out``.csv (one line per measurement)."""
    base = Path(out)
    if base.suffix in (".json", ".csv"):
        base = base.with_suffix("")
    base.parent.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = base.with_suffix(".json"), base.with_suffix(".csv")
    records = [dataclasses.asdict(m) for m in measurements]
    json_path.write_text(json.dumps({"header": header, "measurements": records, "table": rows}, indent=2,
                                    default=str))
    fields = [f.name for f in dataclasses.fields(Measurement) if f.name != "extra"]
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for record in records:
            writer.writerow({k: record[k] for k in fields})
    return [json_path, csv_path]
