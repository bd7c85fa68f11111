"""``jaxvc plan``: will this config's train step fit a TPU slice (or a GPU cluster), and how fast could it run? Answered
on a CPU.

    jaxvc plan --config configs/videomaker.py:sd15 --topology v5p:4x4x4 \\
        --mesh data=64 --mesh data=1,fsdp=64 [--batch-per-chip 1 | --global-batch 64] \\
        [--remat none|full|...] [--dtype bfloat16] [--hbm-gib 16] [--memory-only] [--config.a.b=value ...] \\
        [--json plan.json]

Each ``--mesh`` is one layout; all are compiled with the real TPU compiler (libtpu's abstract topology) and
compared in one table: memory per device against the chip's HBM, FLOPs, collectives, roofline step time and MFU.

    jaxvc plan --sample wan21_i2v_14b --topology v5e:2x4 --mesh fsdp=8 --frames 81 --height 480 --width 832 \
        --dtype bfloat16 --steps 40

plans sampling instead: one guided denoising step of a Wan DiT in the layout of ``jaxvc generate --mesh``
(``jaxvc/plan/sampling.py``).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from jaxvc.config_utils import ConfigError, accept_config_overrides, apply_overrides, load_config
from jaxvc.bench.gpu_targets import TARGETS as GPU_TARGETS
from jaxvc.plan.hardware import CHIPS, GiB, TopologyError
from jaxvc.plan.hlo import KINDS

SHORT = {"all-reduce": "AR", "all-gather": "AG", "reduce-scatter": "RS", "all-to-all": "A2A",
         "collective-permute": "CP"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--config", metavar="FILE.py[:VARIANT]",
                      help="plan this config's train step: config file and variant, e.g. configs/videomaker.py:sd15")
    what.add_argument("--sample", metavar="WAN_VARIANT",
                      help="plan sampling instead: one guided step (batch 2) of this Wan DiT size in `jaxvc generate "
                           "--mesh`'s layout: wan21_t2v_1.3b, wan21_t2v_14b, wan21_i2v_14b, wan22_ti2v_5b, "
                           "wan22_t2v_a14b, wan22_i2v_a14b (one expert; the two take turns)")
    parser.add_argument("--frames", type=int, default=81, help="--sample: video frames (1 + 4k)")
    parser.add_argument("--height", type=int, default=480, help="--sample: video height in pixels")
    parser.add_argument("--width", type=int, default=832, help="--sample: video width in pixels")
    parser.add_argument("--steps", type=int, default=50,
                        help="--sample: sampling steps, for the whole loop's roofline time")
    parser.add_argument("--attention-backend", default="splash", choices=["splash", "xla"],
                        help="--sample: the DiT's attention (splash: TPU flash attention, as a TPU run samples; "
                             "xla: the einsum path, whose (heads, tokens, tokens) logits rarely fit at video sizes)")
    parser.add_argument("--topology", required=True,
                        help=f"TPU slice GENERATION:AxB[xC], e.g. v5p:4x4x4, v6e:4x4 ({', '.join(CHIPS)}); "
                             f"or NVIDIA GPU cluster GPU:HOSTSxN, e.g. h100:2x8 ({', '.join(sorted(GPU_TARGETS))}; "
                             f"needs `launch/setup_env.sh --gpu-compile`; memory and collectives only, no roofline)")
    parser.add_argument("--mesh", action="append", default=None, metavar="AXIS=N,...",
                        help="mesh layout (data, fsdp, tensor, sequence; one may be -1); repeat to compare "
                             "layouts; default: the config's mesh")
    batch = parser.add_mutually_exclusive_group()
    batch.add_argument("--batch-per-chip", type=int, default=None,
                       help="the planned step's global batch = this x chips (see --global-batch)")
    batch.add_argument("--global-batch", type=int, default=None,
                       help="the planned step's global batch, a batch of the method's videos (it sets batch_size "
                            "and every stream's data.batch_sizes); default: the config's video batch "
                            "(data.batch_sizes.video where streams have their own sizes, else batch_size)")
    parser.add_argument("--remat", default=None, help="config.remat_policy: none | full | ... (default: config's)")
    parser.add_argument("--dtype", default=None,
                        help="config.compute_dtype, e.g. bfloat16 (default: config's; --sample: bfloat16)")
    parser.add_argument("--hbm-gib", type=float, default=None,
                        help="pretend each device has this much HBM (GiB) in the fit check")
    parser.add_argument("--memory-only", action="store_true",
                        help="TPU only: stop the TPU compiler once it has planned its buffers (libtpu started with a "
                             "1 MiB HBM cap) and estimate memory per device as the arguments plus the temporaries it "
                             "asked for; minutes instead of half an hour for SD1.5, in less host memory; no FLOPs, "
                             "collectives or roofline, and an estimate, not the exact figure")
    parser.add_argument("--json", default=None, metavar="FILE", help="write every figure of every layout here")
    accept_config_overrides(parser)


def _gib(value) -> str:
    return "-" if value is None else f"{value / GiB:.2f}"


def _si(value) -> str:
    """1.23e12 -> "1.23T" (FLOPs of tiny test models and of pods in one column)."""
    if value is None:
        return "-"
    for scale, unit in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.3g}"


def format_table(reports: list[dict]) -> str:
    """One row per layout."""
    header = ["mesh", "batch", "args", "out", "temp", "code", "total", "HBM", "fit", "FLOP/dev", "FLOP all",
              *[f"{SHORT[k]} n/GiB" for k in KINDS], "step ms", "bound", "MFU", "compile s"]
    rows = []
    for r in reports:
        mem = r.get("memory") or {}
        comms = r.get("collectives") or {}
        roof = r.get("roofline") or {}
        rows.append([
            r["mesh_label"], f"{r['global_batch']} ({r['batch_per_chip']:g}/chip)",
            _gib(mem.get("arguments")), _gib(mem.get("outputs")), _gib(mem.get("temporaries")),
            _gib(mem.get("generated_code")), _gib(mem.get("total")), _gib(r["hbm_capacity"]),
            ("FITS" if r["fits"] else "DOES NOT FIT") + (" (est.)" if mem.get("estimate") else ""),
            _si(r.get("flops_per_device")), _si(r.get("flops_total")),
            *["-" if k not in comms else f"{comms[k]['count']}/{comms[k]['bytes'] / GiB:.2f}" for k in KINDS],
            "-" if not roof else f"{roof['step_s'] * 1e3:.1f}", roof.get("bound", "-"),
            "-" if not roof.get("mfu") else f"{roof['mfu']:.1%}", f"{r['compile_s']:.0f}"])
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in
                                   enumerate(zip(cells, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def set_batch_size(config, size: int) -> None:
    """Every batch of the run ``size`` (``batch_size`` and each switched stream's own): the one planned."""
    config.batch_size = size
    stream_sizes = config.data.get("batch_sizes") if "data" in config else None
    for name in stream_sizes or {}:
        stream_sizes[name] = size


def run(args) -> int:
    from jaxvc.plan.hardware import slice_devices
    from jaxvc.plan.planner import PlanError, parse_mesh, plan_layout, resolve_mesh

    if args.sample is not None:
        return run_sampling(args)

    try:
        config = load_config(args.config)
        apply_overrides(config, getattr(args, "config_overrides", ()))
        if "model" in config and config.model.get("requires_pretrained", False):
            config.model.requires_pretrained = False  # a plan compiles shapes: the weights' values do not matter
        tpu_slice = slice_devices(args.topology, memory_only=args.memory_only)
        layouts = [parse_mesh(m) for m in (args.mesh or [])] or [dict(config.get("mesh") or {"data": -1})]
        for sizes in layouts:  # before the (slow) model building
            resolve_mesh(sizes, tpu_slice)
        if args.batch_per_chip is not None:
            if args.batch_per_chip < 1:
                raise PlanError(f"--batch-per-chip must be >= 1, got {args.batch_per_chip}")
            set_batch_size(config, args.batch_per_chip * tpu_slice.num_chips)
        elif args.global_batch is not None:
            if args.global_batch < 1:
                raise PlanError(f"--global-batch must be >= 1, got {args.global_batch}")
            set_batch_size(config, args.global_batch)
        if args.remat is not None:
            from jaxvc.train.compute import remat_policy
            remat_policy(args.remat)  # unknown names fail here, before any compile
            config.remat_policy = args.remat
        if args.dtype is not None:
            from jaxvc.train.compute import compute_dtype
            compute_dtype(args.dtype)
            config.compute_dtype = args.dtype
    except (ConfigError, TopologyError, PlanError, ValueError) as err:
        print(f"jaxvc plan: {err}", file=sys.stderr)
        return 2

    from jaxvc.methods import build_method

    started = time.perf_counter()
    method = build_method(config)
    hbm = int(args.hbm_gib * GiB) if args.hbm_gib else None
    chip = tpu_slice.chip
    print(f"jaxvc plan: {args.config} on {tpu_slice.topology}: {tpu_slice.num_chips} {chip.generation} chips, "
          f"{len(tpu_slice.devices)} devices; per chip {chip.hbm_bytes / GiB:g} GiB HBM, "
          f"{chip.peak_bf16_flops / 1e12:g} TFLOP/s bf16, HBM {chip.hbm_bandwidth / 1e9:g} GB/s, "
          f"{'NVLink' if chip.generation in GPU_TARGETS else 'ICI'} {chip.ici_bandwidth / 1e9:g} GB/s; "
          f"remat {config.get('remat_policy')}, "
          f"dtype {config.get('compute_dtype')}, frozen weights {config.get('frozen_dtype') or 'float32'}", flush=True)
    reports = []

    def write_json():
        summary = {"config": args.config, "overrides": list(getattr(args, "config_overrides", ())),
                   "topology": tpu_slice.topology, "chip": chip.__dict__, "layouts": reports,
                   "wall_s": time.perf_counter() - started}
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2, default=str)

    for sizes in layouts:
        try:
            report = plan_layout(config, method, tpu_slice, sizes, hbm_bytes=hbm)
        except (PlanError, ValueError) as err:
            print(f"jaxvc plan: {err}", file=sys.stderr)
            return 2
        reports.append(report)
        note = "" if report["fits"] else " (DOES NOT FIT)"
        print(f"  compiled mesh {report['mesh_label']} in {report['compile_s']:.0f} s{note}", flush=True)
        if args.json:  # layouts of big models take minutes each: keep what is done
            write_json()
    print("memory in GiB per device; collectives: count / GiB of results per device; step = roofline estimate")
    print(format_table(reports))
    for r in reports:
        if r.get("compile_options"):
            print(f"  {r['mesh_label']}: compiled with {r['compile_options']} (jaxlib 0.10, no device to autotune on)")
        if r.get("error"):
            print(f"  {r['mesh_label']}: the TPU compiler: {r['error']}")
        if (r.get("memory") or {}).get("estimate"):
            print(f"  {r['mesh_label']}: --memory-only estimate: arguments (from their shardings) + the temporaries "
                  f"the TPU compiler planned before it stopped; a full compile's figure differed by -18% to +8% in "
                  f"the checks (README)")
        if r.get("uncounted_kernels"):
            print(f"  {r['mesh_label']}: FLOPs and roofline leave out {r['uncounted_kernels']} custom-kernel calls "
                  f"(splash attention), which XLA's cost analysis does not count")
    if args.json:
        write_json()
        print(f"jaxvc plan: wrote {args.json}")
    return 0


def run_sampling(args) -> int:
    """``jaxvc plan --sample``: each layout's guided denoising step, in the train-step table's columns."""
    from jaxvc.models.wan import WAN_VARIANTS
    from jaxvc.plan.gpus import is_gpu_topology
    from jaxvc.plan.hardware import slice_devices
    from jaxvc.plan.planner import PlanError, parse_mesh, resolve_mesh
    from jaxvc.plan.sampling import latent_grid, plan_sampling

    try:
        if args.sample not in WAN_VARIANTS:
            raise PlanError(f"--sample {args.sample}: not a Wan size; expected one of {sorted(WAN_VARIANTS)}")
        latent_grid(args.sample, args.frames, args.height, args.width)
        if is_gpu_topology(args.topology):
            raise PlanError(f"--sample plans TPU slices; {args.topology} is a GPU cluster")
        tpu_slice = slice_devices(args.topology, memory_only=args.memory_only)
        layouts = [parse_mesh(m) for m in (args.mesh or [])] or [{"fsdp": -1}]
        for sizes in layouts:
            resolve_mesh(sizes, tpu_slice)
    except (TopologyError, PlanError, ValueError) as err:
        print(f"jaxvc plan: {err}", file=sys.stderr)
        return 2
    dtype = args.dtype or "bfloat16"
    print(f"jaxvc plan: sampling {args.sample} at {args.frames} x {args.height} x {args.width} ({dtype}, "
          f"{args.attention_backend} attention, guided batch 2, {args.steps} steps) on {tpu_slice.topology}: "
          f"{tpu_slice.num_chips} {tpu_slice.chip.generation} chips, {tpu_slice.chip.hbm_bytes / GiB:g} GiB HBM each",
          flush=True)
    hbm = int(args.hbm_gib * GiB) if args.hbm_gib else None
    reports = []
    for sizes in layouts:
        reports.append(plan_sampling(args.sample, tpu_slice, sizes, frames=args.frames, height=args.height,
                                     width=args.width, dtype=dtype, steps=args.steps, hbm_bytes=hbm,
                                     attention_backend=args.attention_backend))
        print(f"  compiled mesh {reports[-1]['mesh_label']} in {reports[-1]['compile_s']:.0f} s", flush=True)
    first = reports[0]
    print(f"one denoising step: {first['params'] / 1e9:.2f} B parameters, {first['tokens']} video tokens "
          f"(latents {' x '.join(map(str, first['latents']))}); memory in GiB per device")
    print(format_table(reports))
    for r in reports:
        if r.get("sampling_s"):
            print(f"  {r['mesh_label']}: {args.steps} steps ~ {r['sampling_s']:.1f} s by the roofline (the text "
                  "encoder and the VAE not included)")
        if (r.get("memory") or {}).get("estimate"):
            print(f"  {r['mesh_label']}: --memory-only estimate (arguments from their shardings + the temporaries the "
                  "TPU compiler planned)")
        if r.get("error"):
            print(f"  {r['mesh_label']}: the TPU compiler: {r['error']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"sample": args.sample, "topology": tpu_slice.topology, "layouts": reports}, f, indent=2,
                      default=str)
        print(f"jaxvc plan: wrote {args.json}")
    return 0
