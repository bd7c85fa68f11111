"""``jaxvc motion-bins``: split real clips into method (e)'s small / medium / large foreground-motion bins for the
"temporal FVD" (``motion_bins.py`` says what is the paper's and what is guessed).

Per clip: its mask (``--masks DIR/<video stem>.png|.jpg|.jpeg|.npy``), RAFT flow from frame 0 to frame
``--flow-frame`` at the working ``--size``, the mean flow magnitude inside and outside the mask; a clip with too much
background flow is dropped (camera motion), the others are binned by foreground flow and each bin is cut to
``--per-bin`` clips by a seeded random choice. Written to ``--out``: ``small.jsonl``, ``medium.jsonl``,
``large.jsonl`` (records ``{"video", "reference", "fg_flow", "bg_flow", "bin"[, "prompt"]}``, the reference being the
clip's first frame as a PNG in ``first_frames/``) for ``jaxvc eval --i3d-model ... --real-videos BIN.jsonl`` and for
generating from the first frames, and ``motion_bins.json`` (counts, every clip's flows, what was skipped and why,
the settings). A clip without a mask, an unreadable video or mask is skipped and counted; the exit status is then 1.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from jaxvc.eval.motion_bins import (BINS, EDGES, FLOW_FRAME, MASK_EXTENSIONS, MAX_BACKGROUND, PER_BIN,
                                    WORKING_SIZE)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("videos", nargs="+", metavar="VIDEOS",
                        help="the real clips: video files, folders of videos (not recursive), or .json/.jsonl "
                             "records ({\"video\": ..., \"prompt\": ...}; a prompt is carried into the bins)")
    parser.add_argument("--masks", required=True, metavar="DIR",
                        help="folder of first-frame foreground masks, one per clip named by the video's file stem "
                             f"({'/'.join(MASK_EXTENSIONS)}; e.g. clip7.mp4 -> clip7.png): image grey > 127 or "
                             ".npy non-zero is foreground (the paper uses Grounded-SAM2 masks). A clip without one "
                             "is skipped and counted")
    parser.add_argument("--raft-model", required=True,
                        help="RAFT checkpoint: princeton-vl/RAFT's raft-things.pth (a torch pickle: needs "
                             "--allow-pickle) or a .safetensors copy; 20 refinement steps")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="allow a pickled torch checkpoint (it can run code when loaded)")
    parser.add_argument("--size", type=int, nargs=2, default=list(WORKING_SIZE), metavar=("H", "W"),
                        help="working size the first frames are resized (stretched) to before RAFT: the thresholds "
                             "are in pixels at this size. The default is the paper's generation size; at least 121 "
                             "each")
    parser.add_argument("--flow-frame", type=int, default=FLOW_FRAME, metavar="K",
                        help="the flow goes from frame 0 to frame K of the file (the paper says 'first-frame flow')")
    parser.add_argument("--edges", type=float, nargs=2, default=list(EDGES), metavar=("SMALL", "MEDIUM"),
                        help="mean foreground flow in pixels: small <= SMALL < medium <= MEDIUM < large")
    parser.add_argument("--max-background", type=float, default=MAX_BACKGROUND, metavar="PX",
                        help="a clip whose mean background flow exceeds this many pixels is dropped (camera motion)")
    parser.add_argument("--per-bin", type=int, default=PER_BIN, metavar="N",
                        help="keep at most N clips per bin, chosen by a seeded random shuffle (0: keep all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the per-bin choice")
    parser.add_argument("--batch-size", type=int, default=8, help="clips (frame pairs) per RAFT call")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output folder: small/medium/large.jsonl, motion_bins.json, first_frames/*.png")


def find_mask(folder: Path, stem: str) -> tuple[str | None, str | None]:
    """(path, None) for the one mask named ``stem``, or (None, why not)."""
    found = [folder / (stem + ext) for ext in MASK_EXTENSIONS if (folder / (stem + ext)).is_file()]
    if not found:
        return None, f"no mask {stem}{{{','.join(MASK_EXTENSIONS)}}} in {folder}"
    if len(found) > 1:
        return None, f"several masks for one clip, {', '.join(map(str, found))}: keep one"
    return str(found[0]), None


def gather_clips(inputs) -> list[dict]:
    """[{"video": absolute path, "prompt": text or None}] in input order; a stem may be used once (masks and first
    frames are named by it)."""
    from jaxvc.eval.cli import read_records, real_video_paths

    paths = [os.path.abspath(p) for p in real_video_paths(inputs)]
    prompts = {}
    for record_file in (p for p in inputs if Path(p).suffix in (".json", ".jsonl")):
        for record in read_records([record_file]):
            if record["prompt"] is not None:
                prompts[os.path.abspath(record["video"])] = record["prompt"]
    by_stem = {}
    for path in paths:
        stem = Path(path).stem
        if stem in by_stem:
            same = "is listed twice" if by_stem[stem] == path else f"and {by_stem[stem]} share the file stem {stem!r}"
            raise SystemExit(f"jaxvc motion-bins: {path} {same}; masks and first frames are named by the stem, so "
                             "each clip must have its own")
        by_stem[stem] = path
    return [{"video": path, "prompt": prompts.get(path)} for path in paths]


def run(args) -> int:
    import numpy as np
    from PIL import Image
    from tqdm.auto import tqdm

    from jaxvc.data.media import MediaError, read_video
    from jaxvc.eval.cli import RecordError
    from jaxvc.eval.dynamic_degree import FlowEstimator
    from jaxvc.eval.motion_bins import MaskError, MotionBinner, check_edges, choose, motion_bin, read_mask
    from jaxvc.media import save_png

    for flag, value, least in (("--batch-size", args.batch_size, 1), ("--per-bin", args.per_bin, 0),
                               ("--flow-frame", args.flow_frame, 1)):
        if value < least:
            raise SystemExit(f"jaxvc motion-bins: {flag} must be >= {least}, got {value}")
    masks = Path(args.masks)
    if not masks.is_dir():
        raise SystemExit(f"jaxvc motion-bins: --masks {masks}: no such folder")
    try:
        edges = check_edges(args.edges, args.max_background)
        clips = gather_clips(args.videos)
        binner = MotionBinner(None, tuple(args.size), args.flow_frame)  # checks the size before RAFT loads
        binner.flow = FlowEstimator.from_file(args.raft_model, args.batch_size, args.allow_pickle)
    except (RecordError, ValueError, FileNotFoundError) as error:  # the loaders' errors name the file and key
        raise SystemExit(f"jaxvc motion-bins: {error}") from None
    out = Path(args.out)
    (out / "first_frames").mkdir(parents=True, exist_ok=True)

    scored, skipped, pending = [], [], []

    def flush():
        """RAFT on the pending clips in one batch; each is binned and its first frame written if it has a bin."""
        if not pending:
            return
        firsts, seconds, work_masks = (np.stack([clip[key] for clip in pending]) for key in ("a", "b", "mask"))
        for clip, (fg, bg) in zip(pending, binner.score_pairs(firsts, seconds, work_masks)):
            try:
                name = motion_bin(fg, bg, edges, args.max_background)
            except ValueError as error:  # a NaN flow
                skipped.append({"video": clip["video"], "kind": "bad flow", "reason": str(error)})
                continue
            record = {"video": clip["video"], "reference": None, "fg_flow": fg, "bg_flow": bg, "bin": name}
            if name is not None:
                reference = out / "first_frames" / f"{Path(clip['video']).stem}.png"
                save_png(reference, Image.fromarray(clip["frame0"]))
                record["reference"] = str(reference.resolve())
            if clip["prompt"] is not None:
                record["prompt"] = clip["prompt"]
            scored.append(record)
        pending.clear()

    for clip in tqdm(clips, desc="first-frame flow (RAFT)", unit="clip"):
        mask_path, why = find_mask(masks, Path(clip["video"]).stem)
        if mask_path is None:
            skipped.append({"video": clip["video"], "kind": "no mask", "reason": why})
            continue
        try:
            frames, _ = read_video(clip["video"], max_frames=args.flow_frame + 1)
            first, second = binner.frame_pair(frames)
        except (MediaError, ValueError) as error:  # unreadable, or fewer frames than --flow-frame needs
            skipped.append({"video": clip["video"], "kind": "video", "reason": str(error)})
            continue
        try:
            mask = binner.working_mask(read_mask(mask_path, frames.shape[1:3]), mask_path)
        except MaskError as error:
            skipped.append({"video": clip["video"], "kind": "mask", "reason": str(error)})
            continue
        pending.append({**clip, "a": first, "b": second, "mask": mask, "frame0": frames[0]})
        if len(pending) == args.batch_size:
            flush()
    flush()

    counts = {}
    for index, name in enumerate(BINS):
        members = [i for i, record in enumerate(scored) if record["bin"] == name]
        kept = choose(members, args.per_bin, args.seed, salt=index)
        for i in sorted(set(members) - set(kept)):  # over the cap: no reference needed
            Path(scored[i]["reference"]).unlink(missing_ok=True)
            scored[i]["reference"] = None
        for i in members:
            scored[i]["kept"] = i in set(kept)
        lines = [json.dumps({k: v for k, v in scored[i].items() if k != "kept"}) for i in kept]
        (out / f"{name}.jsonl").write_text("".join(line + "\n" for line in lines))
        counts[name] = {"clips": len(members), "kept": len(kept)}
    dropped = [record for record in scored if record["bin"] is None]
    for record in dropped:
        record["kept"] = False
    kinds = {}
    for entry in skipped:
        kinds[entry["kind"]] = kinds.get(entry["kind"], 0) + 1
    summary = {"bins": counts, "dropped_camera_motion": len(dropped), "skipped": len(skipped),
               "skipped_by_kind": kinds, "skipped_clips": skipped, "clips": scored,
               "settings": {"inputs": list(args.videos), "masks": str(masks), "raft_model": args.raft_model,
                            "raft_iters": 20, "size": list(binner.size), "flow_frame": args.flow_frame,
                            "edges": list(edges), "max_background": args.max_background, "per_bin": args.per_bin,
                            "seed": args.seed}}
    (out / "motion_bins.json").write_text(json.dumps(summary, indent=2))
    print(format_table(counts, edges, args.max_background, len(dropped), kinds, args.per_bin))
    for entry in skipped:
        print(f"skipped {entry['video']}: {entry['reason']}", file=sys.stderr)
    print(f"wrote {', '.join(str(out / f'{name}.jsonl') for name in BINS)} and {out / 'motion_bins.json'}")
    return 1 if skipped else 0


def format_table(counts: dict, edges, max_background: float, dropped: int, kinds: dict, per_bin: int) -> str:
    ranges = {"small": f"<= {edges[0]:g}", "medium": f"{edges[0]:g} - {edges[1]:g}", "large": f"> {edges[1]:g}"}
    lines = [f"{'bin':<8} {'fg flow (px)':>13} {'clips':>7} {'kept':>6}", "-" * 37]
    for name in BINS:
        short = "  (fewer than --per-bin)" if per_bin and counts[name]["kept"] < per_bin else ""
        lines.append(f"{name:<8} {ranges[name]:>13} {counts[name]['clips']:>7} {counts[name]['kept']:>6}{short}")
    lines.append(f"dropped as camera motion (background flow > {max_background:g} px): {dropped}")
    detail = ", ".join(f"{kind}: {count}" for kind, count in sorted(kinds.items()))
    lines.append(f"skipped: {sum(kinds.values())}" + (f" ({detail})" if detail else ""))
    return "\n".join(lines)
