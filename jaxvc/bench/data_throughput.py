"""Input pipeline throughput: samples/s of the Grain pipeline on this machine, beside what a train step demands.

    python -m jaxvc.bench.data_throughput --batch-size 16 --image-size 64 --num-frames 8 --workers 0 2 \
        --step-time 0.25                                  # synthetic world: image pairs + videos, switching p=0.2
    python -m jaxvc.bench.data_throughput --packed /data/packed --image-size 256 --num-frames 16 --step-time 1.1

The demand is batch_size / step_time samples/s (pass the measured train-step time of the run you plan). The
pipeline keeps up when its samples/s is at least that; the report says by how much it leads or lags.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def build_streams(args) -> dict:
    if args.packed:
        from jaxvc.data.sources import PackedSource

        with open(os.path.join(args.packed, "dataset_info.json")) as f:
            kinds = json.load(f)["kinds"]
        streams = {}
        if "video" in kinds:
            streams["video"] = PackedSource(args.packed, kinds="video")
        images = [k for k in ("image_pair", "image") if k in kinds]
        if images:
            streams["image"] = PackedSource(args.packed, kinds=images)
        return streams
    if args.folder:
        from jaxvc.data.sources import FolderSource

        return {"video": FolderSource(args.folder)}
    from jaxvc.data.synthetic import SyntheticPairSource, SyntheticVideoSource, SyntheticWorld

    world = SyntheticWorld(image_size=args.image_size, num_frames=max(args.num_frames, 2), num_subjects=64,
                           held_out=8)
    return {"image": SyntheticPairSource(world, num_records=10_000),
            "video": SyntheticVideoSource(world, num_records=10_000)}


def measure(streams: dict, args, workers: int) -> dict:
    from jaxvc.data.pipeline import DataConfig, make_pipeline

    weights = None
    if len(streams) == 2:
        weights = {"image": 1 - args.video_weight, "video": args.video_weight}
    config = DataConfig(batch_size=args.batch_size, image_size=args.image_size, num_frames=args.num_frames,
                        frame_stride=args.frame_stride, weights=weights, switch=args.switch, seed=args.seed)
    start = time.perf_counter()
    it = make_pipeline(streams, config, process_index=0, process_count=1, worker_count=workers,
                       read_threads=args.read_threads, prefetch=args.prefetch,
                       worker_buffer_size=args.worker_buffer)
    try:
        next(it)
        first = time.perf_counter() - start
        for _ in range(args.warmup):
            next(it)
        t0 = time.perf_counter()
        for _ in range(args.batches):
            next(it)
        elapsed = time.perf_counter() - t0
    finally:
        it.close()
    samples = args.batches * args.batch_size
    return {"workers": workers, "first_batch_s": first, "samples_per_s": samples / elapsed,
            "batches_per_s": args.batches / elapsed, "skipped": it.skipped}


def main(argv=None) -> int:
    from jaxvc.cli import HelpFormatter

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=HelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--packed", help="folder written by `jaxvc pack` (default: the synthetic world)")
    source.add_argument("--folder", help="folder or manifest of media files read directly")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--num-frames", type=int, default=8)
    parser.add_argument("--frame-stride", type=int, default=1)
    parser.add_argument("--video-weight", type=float, default=0.2, help="probability of a video (batch or example)")
    parser.add_argument("--switch", action=argparse.BooleanOptionalAction, default=True,
                        help="batch-level switching (else per-example mixture)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="worker process counts to try")
    parser.add_argument("--read-threads", type=int, default=1)
    parser.add_argument("--prefetch", type=int, default=2)
    parser.add_argument("--worker-buffer", type=int, default=2)
    parser.add_argument("--batches", type=int, default=20, help="timed batches")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--step-time", type=float, default=None, help="seconds per train step to feed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON line per measurement")
    args = parser.parse_args(argv)

    streams = build_streams(args)
    demand = args.batch_size / args.step_time if args.step_time else None
    print(f"data throughput on {os.cpu_count()} CPU cores: batch {args.batch_size}, {args.num_frames} frames of "
          f"{args.image_size}x{args.image_size}, streams {', '.join(f'{k} ({len(v)})' for k, v in streams.items())}")
    if demand:
        print(f"train-step demand: {args.batch_size} samples / {args.step_time:.3f} s = {demand:.1f} samples/s")
    for workers in args.workers:
        r = measure(streams, args, workers)
        if demand:
            r["demand_samples_per_s"] = demand
            r["keeps_up"] = r["samples_per_s"] >= demand
        if args.json:
            print(json.dumps(r))
            continue
        line = (f"workers={workers:2d}: {r['samples_per_s']:8.1f} samples/s ({r['batches_per_s']:.2f} batches/s), "
                f"first batch after {r['first_batch_s']:.2f} s")
        if demand:
            ratio = r["samples_per_s"] / demand
            line += f"; {'keeps up' if ratio >= 1 else 'too slow'} ({ratio:.2f}x the demand)"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
