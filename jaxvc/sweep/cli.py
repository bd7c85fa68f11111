"""``jaxvc sweep``: a scaling study over model size, global batch, learning rate and mesh layout.

  jaxvc sweep --config configs/videomaker.py:demo --out sweeps/demo \\
      --grid model=xs,s,m --grid batch_size=4,8 --grid optim.lr=1e-4,3e-4,1e-3 \\
      --grid "mesh=data=1|data=2|data=2,fsdp=2" --steps 200 [--devices 8] [--resume] [--dry-run] \\
      [--config.model.image_size=16 ...]

Each point of the grid (``jaxvc/sweep/grid.py``) is one real training run (``jaxvc/train/loop.py``) in its own
process (``jaxvc/sweep/point.py``), in ``<out>/points/<id>/`` (``run/`` is its trainer folder, ``log.txt`` its
output, ``result.json`` what it measured). Then ``results.csv``, ``results.json`` (with loss curves and the fits)
and the PNG plots are written into ``<out>`` and the summary table is printed. ``--resume`` skips finished points;
an unfinished or failed point starts again from scratch (its timing and loss curve must come from one run).

On a multi-host pod the same command runs on every host, like ``jaxvc train``, with the same ``--distributed``,
``--coordinator_address``, ``--num_processes`` and ``--process_id`` flags: each host walks the same points in the
same order and hands the flags to each point's process, which joins the ``jax.distributed`` job of that point
(the coordinator is started afresh per point). Process 0 writes the results; put ``--out`` on storage all hosts
see (a GCS FUSE mount, NFS) or give each host its own, which works too (every host leaves its own done-marker).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from jaxvc.config_utils import REPO_ROOT, ConfigError, accept_config_overrides

_STOP: list[bool] = []  # set by SIGTERM while a point runs: finish that point's shutdown, then stop the sweep


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, metavar="FILE.py[:VARIANT]",
                        help="the base config of every point, e.g. configs/videomaker.py:demo; fixed overrides as "
                             "--config.<key>=<value>")
    parser.add_argument("--out", required=True, help="sweep folder (points/, results.csv/json, plots)")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                        help="a grid axis (repeatable; the first is the outer loop): model=<sizes> (see "
                             "jaxvc/sweep/sizes.py), mesh=<layout>|<layout> (e.g. 'data=1|data=2,fsdp=2'), or any "
                             "config key (batch_size=4,8, optim.lr=1e-4,3e-4)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per point (None: the config's)")
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the step time (compile, caches)")
    parser.add_argument("--devices", type=int, default=None,
                        help="simulate this many CPU devices in every point (XLA_FLAGS="
                             "--xla_force_host_platform_device_count); leave unset on real accelerators")
    parser.add_argument("--resume", action="store_true", help="skip the points already finished in --out")
    parser.add_argument("--dry-run", action="store_true", help="list the points (and which are done) and exit")
    parser.add_argument("--peak-flops", type=float, default=None,
                        help="peak FLOP/s per device for MFU (None: the device table in jaxvc/train/metrics.py; "
                             "a CPU has none)")
    parser.add_argument("--fast-compile", action="store_true",
                        help="compile with xla_backend_optimization_level=0 (CPU smoke sweeps: faster compiles, "
                             "slower steps)")
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="keep each point's final checkpoint (else it is deleted once the point is recorded)")
    parser.add_argument("--point-timeout", type=float, default=None, help="seconds before a point is stopped")
    parser.add_argument("--distributed", choices=("off", "auto", "env"), default="env",
                        help="as in jaxvc train; passed to every point's process")
    parser.add_argument("--coordinator_address", default=None, help="HOST:PORT of process 0 (as in jaxvc train)")
    parser.add_argument("--num_processes", type=int, default=None, help="number of processes (as in jaxvc train)")
    parser.add_argument("--process_id", type=int, default=None, help="this process's index (as in jaxvc train)")
    parser.epilog = ("Pods: run the same command on every host with the jax.distributed flags of jaxvc train "
                     "(--distributed=auto on Cloud TPU); --out on storage all hosts see. See the module docstring "
                     "of jaxvc/sweep/cli.py.")
    accept_config_overrides(parser, epilog=False)


def point_spec(args, point, folder: Path) -> dict:
    return {"config": args.config, "overrides": [list(kv) for kv in [*args.config_overrides, *point.overrides]],
            "model": point.model, "mesh": point.mesh, "steps": args.steps, "warmup": args.warmup,
            "point_id": point.id, "values": point.as_dict, "point_dir": str(folder), "workdir": str(folder / "run"),
            "peak_flops": args.peak_flops, "fast_compile": args.fast_compile,
            "distributed": {"mode": args.distributed, "coordinator_address": args.coordinator_address,
                            "num_processes": args.num_processes, "process_id": args.process_id}}


def point_env(devices: int | None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if devices:
        flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
        env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
        env["JAX_PLATFORMS"] = "cpu"
    return env


def is_finished(folder: Path) -> bool:
    from jaxvc.sweep.point import host_marker

    return (folder / "result.json").is_file() or host_marker(folder).is_file()


def check_points(args, points) -> None:
    """Build every point's config here first, so a bad key, value or size fails before any run."""
    from jaxvc.config_utils import apply_overrides, load_config
    from jaxvc.sweep.sizes import apply_size

    widths: dict[str, str] = {}
    for point in points:
        config = apply_overrides(load_config(args.config), [*args.config_overrides, *point.overrides])
        if point.model:
            apply_size(config, point.model)
            widths[point.model] = json.dumps(config.model.to_dict(), sort_keys=True, default=str)
        if args.steps is None:
            args.steps = int(config.steps)
    names = list(widths)
    for i, name in enumerate(names):
        for other in names[i + 1:]:
            if widths[name] == widths[other]:
                raise ValueError(f"model sizes '{name}' and '{other}' give the same model for {args.config} (the "
                                 f"widths are rounded to GroupNorm groups); drop one of them")


def run_one(args, point, folder: Path, env: dict) -> tuple[bool, float]:
    """Run the point's process; its output goes to ``log.txt``. Returns (succeeded, seconds)."""
    if (folder / "run").exists():
        # an interrupted attempt: a point is always timed from a fresh run (hosts sharing --out all delete it)
        shutil.rmtree(folder / "run", ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    spec_path = folder / "spec.json"
    spec_path.write_text(json.dumps(point_spec(args, point, folder), indent=1) + "\n")
    started = time.perf_counter()
    with (folder / "log.txt").open("w") as log:
        child = subprocess.Popen([sys.executable, "-m", "jaxvc.sweep.point", str(spec_path)], env=env,
                                 stdout=log, stderr=subprocess.STDOUT)
        # SIGTERM (preemption, a stopped job) goes on to the point, which stops cleanly; the sweep stops after it
        # and `--resume` later runs the point again.
        previous = signal.signal(signal.SIGTERM, lambda *_: (child.terminate(), _STOP.append(True)))
        try:
            code = child.wait(timeout=args.point_timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
            log.write(f"\njaxvc sweep: point stopped after --point-timeout {args.point_timeout}s\n")
            from jaxvc.sweep.point import write_json
            write_json(folder / "failed.json", {"id": point.id, "status": "failed",
                                                "error": f"timed out after {args.point_timeout}s"})
            code = -1
        except BaseException:  # Ctrl-C: do not leave the point running
            child.kill()
            child.wait()
            raise
        finally:
            signal.signal(signal.SIGTERM, previous)
    seconds = time.perf_counter() - started
    if code == 0 and not args.keep_checkpoints:
        shutil.rmtree(folder / "run" / "checkpoints", ignore_errors=True)
    return code == 0, seconds


def is_process_zero(out: Path, points) -> bool:
    """Whether this host writes the tables: its point processes said so in their done-markers (else: yes)."""
    from jaxvc.sweep.collect import point_dir
    from jaxvc.sweep.point import host_marker

    for point in points:
        marker = host_marker(point_dir(out, point))
        if marker.is_file():
            return marker.read_text().strip() == "process 0"
    return True


def run(args) -> int:
    from jaxvc.sweep.collect import compute_fits, load_rows, point_dir, summary_table, write_results
    from jaxvc.sweep.grid import GridError, format_mesh, mesh_chips, parse_grid

    out = Path(args.out)
    try:
        points = parse_grid(args.grid)
        check_points(args, points)
    except (GridError, ConfigError, ValueError) as err:
        print(f"jaxvc sweep: {err}", file=sys.stderr)
        return 2
    finished = {p.id for p in points if is_finished(point_dir(out, p))}
    if args.dry_run:
        print(f"jaxvc sweep: {len(points)} points of {args.config}, {args.steps} steps each -> {out}")
        for i, point in enumerate(points):
            mesh = point.mesh
            chips = mesh_chips(mesh, args.devices) if mesh else None
            where = f"mesh {format_mesh(mesh)} ({chips or 'all'} chips)" if mesh else ""
            state = "done" if point.id in finished else "to run"
            print(f"  {i:3d}  {point.id:50s} {where:32s} {state}")
        models = list(dict.fromkeys(p.model for p in points if p.model))
        if models:
            from jaxvc.config_utils import apply_overrides, load_config
            from jaxvc.sweep.sizes import size_table

            rows = dict(size_table(apply_overrides(load_config(args.config), args.config_overrides)))
            print("model sizes (jaxvc/sweep/sizes.py):")
            for name in models:
                print(f"  {name:6s} {rows[name]}")
        return 0
    if finished and not args.resume:
        print(f"jaxvc sweep: {out} already holds {len(finished)} finished point(s) of this grid; pass --resume to "
              f"skip them or choose another --out", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    env = point_env(args.devices)
    failures = 0
    for i, point in enumerate(points):
        label = f"[{i + 1}/{len(points)}] {point.id}"
        if point.id in finished:
            print(f"{label}: done before, skipped", flush=True)
            continue
        ok, seconds = run_one(args, point, point_dir(out, point), env)
        if _STOP:
            print(f"{label}: stopped by SIGTERM; rerun with --resume to continue", flush=True)
            return 143
        failures += not ok
        status = "ok" if ok else f"FAILED (see {point_dir(out, point) / 'log.txt'})"
        print(f"{label}: {status} in {seconds:.1f}s", flush=True)

    if not is_process_zero(out, points):
        return 1 if failures else 0
    rows = load_rows(out, points)
    fits = compute_fits(rows)
    header = {"config": args.config, "overrides": [list(kv) for kv in args.config_overrides], "grid": args.grid,
              "steps": args.steps, "warmup": args.warmup, "devices": args.devices}
    csv_path, json_path = write_results(out, rows, fits, header)
    from jaxvc.sweep.plots import draw_plots

    plots = draw_plots(out, rows, fits)
    print()
    print(summary_table(rows, fits))
    print(f"\nwrote {csv_path}, {json_path}, {', '.join(p.name for p in plots)}")
    return 1 if failures else 0
