"""``jaxvc eval``: CLIP-T, CLIP-I, DINO-I and temporal consistency of generated videos (``feature_metrics.py``).

Videos are named by records: the ``<name>.json`` that ``jaxvc generate`` writes beside each video, or the lines of
a JSONL manifest. A record is ``{"video": PATH, "prompt": TEXT, "reference": PATH}`` (or ``"references": [PATH,
...]``); relative paths are taken from the record file's folder. A video or reference that cannot be read is
skipped and counted, and the exit status is then 1.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


class RecordError(ValueError):
    """A record that does not name what ``jaxvc eval`` needs."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("records", nargs="+", metavar="RECORD",
                        help="a .json record (as `jaxvc generate` writes beside each video) or a .jsonl manifest "
                             "with one record per line: {\"video\": ..., \"prompt\": ..., \"reference(s)\": ...}")
    parser.add_argument("--clip-model", default=None,
                        help="local transformers CLIPModel folder (the papers use openai/clip-vit-base-patch32): "
                             "CLIP-T, CLIP-I and temporal consistency")
    parser.add_argument("--dino-model", default=None,
                        help="local transformers ViTModel folder (the papers use facebook/dino-vits16): DINO-I")
    parser.add_argument("--tokenizer", default=None,
                        help="CLIP tokenizer folder (vocab.json + merges.txt or tokenizer.json); default: the one "
                             "in --clip-model, else jaxvc's built-in CLIP vocabulary")
    parser.add_argument("--frames", type=int, default=None,
                        help="score only this many frames from the middle of each video (method (e) uses 16); "
                             "default: every frame")
    parser.add_argument("--batch-size", type=int, default=32, help="images per call of an image tower")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="allow pickled pytorch_model.bin weights (they can run code when loaded) where a folder "
                             "has no safetensors")
    parser.add_argument("--out", default=None, help="write every video's scores and the means to this JSON file")


def read_records(paths) -> list[dict]:
    """Every record, with ``video`` and ``references`` made absolute and ``source`` naming file and line."""
    records = []
    for path in map(Path, paths):
        if not path.is_file():
            raise RecordError(f"{path}: no such record file")
        lines = path.read_text().splitlines() if path.suffix == ".jsonl" else [path.read_text()]
        for number, text in enumerate(lines, 1):
            if not text.strip():
                continue
            source = f"{path}:{number}" if path.suffix == ".jsonl" else str(path)
            try:
                record = json.loads(text)
            except json.JSONDecodeError as error:
                raise RecordError(f"{source}: not valid JSON ({error})") from error
            records.append(_normalise(record, path.parent, source))
    return records


def _normalise(record, folder: Path, source: str) -> dict:
    if not isinstance(record, dict) or "video" not in record:
        raise RecordError(f"{source}: a record is an object with at least \"video\"; got {str(record)[:120]}")
    references = record.get("references", [record["reference"]] if record.get("reference") else [])
    if isinstance(references, str) or not all(isinstance(r, str) for r in references):
        raise RecordError(f"{source}: \"references\" must be a list of paths, got {references!r}")
    prompt = record.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise RecordError(f"{source}: \"prompt\" must be a string, got {prompt!r}")
    return {"source": source, "video": str(folder / record["video"]), "prompt": prompt,
            "references": [str(folder / r) for r in references]}


def _read_video(path: str):
    from jaxvc.data.media import read_video

    return read_video(path)[0]


def run(args) -> int:
    import numpy as np
    from tqdm.auto import tqdm

    from jaxvc.data.media import MediaError, read_image
    from jaxvc.eval.feature_metrics import VideoScorer, center_frames, mean_scores

    if not args.clip_model and not args.dino_model:
        raise SystemExit("jaxvc eval: give --clip-model (CLIP-T, CLIP-I, temporal consistency) and/or --dino-model "
                         "(DINO-I)")
    if args.frames is not None and args.frames < 1:
        raise SystemExit(f"jaxvc eval: --frames must be >= 1, got {args.frames}")
    try:
        records = read_records(args.records)
    except RecordError as error:
        raise SystemExit(f"jaxvc eval: {error}") from None
    try:
        scorer = VideoScorer.from_folders(args.clip_model, args.dino_model, args.tokenizer,
                                           args.batch_size, args.allow_pickle)
    except (ValueError, FileNotFoundError) as error:  # the loaders' errors name the folder, key or shape
        raise SystemExit(f"jaxvc eval: {error}") from None
    results, skipped = [], []
    for record in tqdm(records, desc="scoring videos", unit="video"):
        try:
            frames = center_frames(_read_video(record["video"]), args.frames)
            references = [read_image(path) for path in record["references"]]
        except MediaError as error:
            skipped.append(f"{record['source']}: {error}")
            continue
        scores = scorer.score(np.asarray(frames), record["prompt"], references)
        results.append({"video": record["video"], "source": record["source"], "frames": int(len(frames)), **scores})
    means = mean_scores(results)
    print(format_table(means, len(results)))
    for line in skipped:
        print(f"skipped {line}", file=sys.stderr)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        summary = {"means": {name: value for name, (value, _) in means.items()},
                   "counts": {name: count for name, (_, count) in means.items()},
                   "videos": results, "skipped": skipped,
                   "models": {"clip": args.clip_model, "dino": args.dino_model}, "frames": args.frames}
        Path(args.out).write_text(json.dumps(summary, indent=2))
        print(f"wrote {args.out}")
    return 1 if skipped else 0


def format_table(means: dict, scored: int) -> str:
    lines = [f"{'metric':<22} {'mean':>8} {'videos':>7}", "-" * 39]
    for name, (value, count) in means.items():
        lines.append(f"{name:<22} {value:>8.4f} {count:>7}")
    lines.append(f"{scored} videos scored")
    return "\n".join(lines)
