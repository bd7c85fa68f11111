"""`jaxvc pack`: turn a folder or a JSONL manifest of videos, images and image pairs (or the synthetic world) into
ArrayRecord shards of `jaxvc.data.records` records.

Inputs
  folder   every video (.mp4 .mov .mkv .webm .avi .gif ...) is a video; every image (.jpg .png .webp ...) is an image;
           `<base>_0.<ext>` + `<base>_1.<ext>` form an image pair. Sidecars: captions in `<stem>.txt` (one caption
           per line; for a pair, `<base>_0.txt`/`<base>_1.txt` or two lines of `<base>.txt`), masks in
           `<stem>.mask.<ext>` or `<stem>_mask.<ext>` (an image, or a video for a video), reference images that come
           with a video or image (VideoBooth's segmented subjects; `data.reference=provided` trains on them) in
           `<stem>.ref.<ext>`, `<stem>_ref.<ext>` or numbered `<stem>.ref<k>.<ext>` (transparent pixels become white).
           --split-panels reads every image as a two-panel pair (Subjects200K style: left/right halves, or
           top/bottom for tall images).
  manifest one JSON object per line: {"video": p} | {"image": p} | {"images": [p0, p1]} (optional "kind"), with
           "caption" (str or list) or "captions" (list; per view for pairs) or "prompt" (jaxvc's own manifests)
           or "description_0"/"description_1",
           "mask" (path, or list of two for pairs), "reference" (path) or "references" (list of paths),
           "split_panels" (bool). Relative paths are relative to the manifest's folder.
  --synthetic-videos / --synthetic-pairs  render the synthetic subject world instead.

Output (in --output): `<kind>-NNNNN-of-MMMMM.array_record` shards, `dataset_info.json` (shards and counts per kind,
read by `jaxvc.data.sources.PackedSource`) and `progress.json`. The plan (which file goes to which shard) is fixed
before any decoding, each shard is written to a temporary name and renamed when complete, and progress.json records
finished shards, so re-running the same command skips them (resume after an interruption). Unreadable files are
skipped, listed at the end and kept in progress.json / dataset_info.json under "skipped".
"""
from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import re
import sys
from typing import Any

import numpy as np

from jaxvc.data import media
from jaxvc.data.records import RECORD_FORMAT, serialize_example

PROGRESS_FILE = "progress.json"
INFO_FILE = "dataset_info.json"
SHARD_SUFFIX = ".array_record"


# ---------------------------------------------------------------------------------------------------- planning
def _sidecar(stem: str, suffixes: tuple[str, ...], exts: tuple[str, ...]) -> str | None:
    for suffix in suffixes:
        for ext in exts:
            for candidate in (stem + suffix + ext, stem + suffix + ext.upper()):
                if os.path.isfile(candidate):
                    return candidate
    return None


def _is_mask_file(path: str) -> bool:
    stem = os.path.splitext(path)[0]
    return stem.endswith(".mask") or stem.endswith("_mask")


_REFERENCE_SUFFIX = re.compile(r"(\.ref|_ref)\d*$")


def _is_reference_file(path: str) -> bool:
    """`<stem>.ref.png`, `<stem>_ref.png`, `<stem>.ref2.png`: a reference image that comes with `<stem>`'s media."""
    return media.is_image(path) and _REFERENCE_SUFFIX.search(os.path.splitext(path)[0]) is not None


def _reference_files(stem: str, files: set[str]) -> list[str]:
    """The reference images of the media file ``<stem>.<ext>`` among ``files``, sorted."""
    return sorted(f for f in files if _REFERENCE_SUFFIX.sub("", os.path.splitext(f)[0]) == stem)


def _references_entry(paths: list[str]) -> dict:
    """An item's "references" key, only where it has some (the plans of packings without them stay the same, so an
    interrupted packing resumes)."""
    return {"references": paths} if paths else {}


def scan_folder(root: str, split_panels: bool = False) -> list[dict]:
    """Items (plain dicts, JSON-able) found under `root`, sorted by path."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"input folder {root!r} does not exist")
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        files += [os.path.join(dirpath, f) for f in sorted(filenames)]
    media_like = [f for f in files if media.is_video(f) or media.is_image(f)]
    # a `_mask` / `_ref` name is a sidecar only beside its media file (`dog.png` + `dog_mask.png`); alone
    # (`gas_mask.png`, `chef_ref.png`) it is a picture of its own, not a file to drop unreported
    owners = {os.path.splitext(f)[0] for f in media_like if not _is_mask_file(f) and not _is_reference_file(f)}
    sidecars = {f for f in media_like if (_is_mask_file(f) and os.path.splitext(f)[0][:-len("_mask")] in owners)
                or (_is_reference_file(f) and _REFERENCE_SUFFIX.sub("", os.path.splitext(f)[0]) in owners)}
    media_files = [f for f in media_like if f not in sidecars]
    media_set = set(media_files)
    reference_set = {f for f in sidecars if _is_reference_file(f)}
    items, used = [], set()
    mask_exts = media.IMAGE_EXTENSIONS + media.VIDEO_EXTENSIONS
    for path in media_files:
        if path in used:
            continue
        stem, ext = os.path.splitext(path)
        if media.is_image(path) and not split_panels and stem.endswith("_0"):
            partner = next((stem[:-2] + "_1" + e for e in (ext, ext.lower(), ext.upper())
                            if stem[:-2] + "_1" + e in media_set), None)
            if partner is not None:
                base = stem[:-2]
                used.update((path, partner))
                items.append({"kind": "image_pair", "paths": [path, partner],
                              "caption_files": [_sidecar(base + "_0", ("",), (".txt",)),
                                                _sidecar(base + "_1", ("",), (".txt",)),
                                                _sidecar(base, ("",), (".txt",))],
                              "masks": [_sidecar(base + "_0", (".mask", "_mask"), media.IMAGE_EXTENSIONS),
                                        _sidecar(base + "_1", (".mask", "_mask"), media.IMAGE_EXTENSIONS)],
                              **_references_entry(_reference_files(base, reference_set))})
                continue
        used.add(path)
        kind = "video" if media.is_video(path) else ("image_pair" if split_panels else "image")
        item = {"kind": kind, "paths": [path], "caption_files": [_sidecar(stem, ("",), (".txt",))],
                "masks": [_sidecar(stem, (".mask", "_mask"), mask_exts)],
                **_references_entry(_reference_files(stem, reference_set))}
        if split_panels:
            item["split_panels"] = True
        items.append(item)
    return items


def read_manifest(path: str, split_panels: bool = False) -> list[dict]:
    """Items from a JSONL manifest (see the module docstring)."""
    base = os.path.dirname(os.path.abspath(path))

    def resolve(p):
        return p if os.path.isabs(p) else os.path.join(base, p)

    items = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({e})") from e
            if "video" in entry:
                kind, paths = "video", [entry["video"]]
            elif "images" in entry:
                kind, paths = "image_pair", list(entry["images"])
                if len(paths) != 2:
                    raise ValueError(f"{path}:{line_no}: 'images' must list two views, got {len(paths)}")
            elif "image" in entry:
                split = entry.get("split_panels", split_panels)
                kind, paths = ("image_pair" if split else "image"), [entry["image"]]
            else:
                raise ValueError(f"{path}:{line_no}: needs a 'video', 'image' or 'images' field, got {sorted(entry)}")
            kind = entry.get("kind", kind)
            # "prompt": the key jaxvc's own manifests use (generate's manifest.jsonl, motion-bins, prompt sets)
            captions = entry.get("captions", entry.get("caption", entry.get("prompt")))
            if captions is None and "description_0" in entry:
                captions = [entry["description_0"], entry.get("description_1", entry["description_0"])]
            if isinstance(captions, str):
                captions = [captions]
            masks = entry.get("mask")
            masks = [masks] if isinstance(masks, str) else (masks or [])
            references = entry.get("references", entry.get("reference")) or []
            references = [references] if isinstance(references, str) else list(references)
            item = {"kind": kind, "paths": [resolve(p) for p in paths], "captions": captions,
                    "masks": [resolve(m) if m else None for m in masks],
                    **_references_entry([resolve(r) for r in references])}
            if kind == "image_pair" and len(paths) == 1:
                item["split_panels"] = True
            items.append(item)
    return items


def synthetic_items(num_videos: int, num_pairs: int, world_args: dict, split: str, seed: int) -> list[dict]:
    """Items rendered from the synthetic world: videos cycle over (subject, motion), pairs over subjects."""
    from jaxvc.data.synthetic import SyntheticWorld

    world = SyntheticWorld(**world_args)
    ids = {"train": world.train_subject_ids, "held_out": world.held_out_subject_ids,
           "all": tuple(range(world.num_subjects))}[split]
    items = []
    for i in range(num_videos):
        motion = world.motions[(i // len(ids)) % len(world.motions)]
        items.append({"kind": "video", "synthetic": {"world": world_args, "subject": ids[i % len(ids)],
                                                      "motion": motion, "seed": seed * 1_000_003 + i}})
    for i in range(num_pairs):
        items.append({"kind": "image_pair", "synthetic": {"world": world_args, "subject": ids[i % len(ids)],
                                                           "seed": seed * 1_000_003 + i}})
    return items


def plan_shards(items: list[dict], records_per_shard: int) -> list[dict]:
    """Group items by kind (in order) and cut each group into shards: [{name, kind, items}]."""
    shards = []
    for kind in ("video", "image_pair", "image"):
        group = [it for it in items if it["kind"] == kind]
        count = (len(group) + records_per_shard - 1) // records_per_shard
        for s in range(count):
            shards.append({"name": f"{kind}-{s:05d}-of-{count:05d}{SHARD_SUFFIX}", "kind": kind,
                           "items": group[s * records_per_shard:(s + 1) * records_per_shard]})
    unknown = {it["kind"] for it in items} - {"video", "image_pair", "image"}
    if unknown:
        raise ValueError(f"unknown item kinds {sorted(unknown)}")
    return shards


# ------------------------------------------------------------------------------------------------------ loading
def _read_captions(item: dict) -> list[str]:
    if item.get("captions") is not None:
        return [str(c) for c in item["captions"]]
    files = [f for f in item.get("caption_files", []) if f]
    if item["kind"] == "image_pair" and len(item.get("caption_files", [])) == 3:
        view0, view1, shared = item["caption_files"]
        if view0 or view1:
            return [_first_line(view0), _first_line(view1)]
        files = [shared] if shared else []
    captions = []
    for f in files:
        with open(f, encoding="utf-8") as fh:
            captions += [line.strip() for line in fh if line.strip()]
    return captions


def _first_line(path: str | None) -> str:
    if not path:
        return ""
    with open(path, encoding="utf-8") as fh:
        return next((line.strip() for line in fh if line.strip()), "")


def _split_panels(image: np.ndarray) -> list[np.ndarray]:
    h, w = image.shape[:2]
    if w >= h:
        return [image[:, :w // 2], image[:, w // 2:2 * (w // 2)]]
    return [image[:h // 2], image[h // 2:2 * (h // 2)]]


def load_item(item: dict, options: dict) -> dict:
    """Read one planned item into an example (raises MediaError / OSError / ValueError when unreadable)."""
    if "synthetic" in item:
        from jaxvc.data.synthetic import SyntheticWorld

        spec = item["synthetic"]
        world = SyntheticWorld(**spec["world"])
        if item["kind"] == "video":
            frames, masks, text, _ = world.video(spec["subject"], spec["motion"], seed=spec["seed"])
            return {"kind": "video", "frames": frames, "mask": masks, "captions": [text], "fps": 8.0,
                    "source": f"synthetic:video:{spec['subject']}:{spec['motion']}:{spec['seed']}"}
        images, masks, captions, _ = world.image_pair(spec["subject"], seed=spec["seed"])
        return {"kind": "image_pair", "frames": images, "mask": masks, "captions": captions, "fps": 0.0,
                "source": f"synthetic:pair:{spec['subject']}:{spec['seed']}"}
    short = options.get("short_side")
    paths, masks = item["paths"], [m for m in item.get("masks", []) if m]
    example: dict[str, Any] = {"kind": item["kind"], "captions": _read_captions(item), "source": paths[0]}
    if item.get("references"):  # on white, as the papers' references (and `jaxvc generate`'s)
        example["references"] = [media.read_image(r, short, background=media.REFERENCE_BACKGROUND) for r in item["references"]]
    if item["kind"] == "video":
        frames, fps = media.read_video(paths[0], options.get("max_frames"), options.get("frame_stride", 1), short)
        example.update(frames=frames, fps=fps)
        if masks:
            mask = media.read_mask(masks[0], len(frames), options.get("frame_stride", 1), frames.shape[1:3])
            if len(mask) < len(frames):  # a mask video shorter than the clip: repeat its last frame
                mask = np.concatenate([mask, np.repeat(mask[-1:], len(frames) - len(mask), 0)])
            example["mask"] = mask[:len(frames)]
        return example
    views = [media.read_image(p, short) for p in paths]
    full_size = views[0].shape[:2]
    if item.get("split_panels"):
        views = _split_panels(views[0])
    example.update(frames=views, fps=0.0)
    if masks:
        if item.get("split_panels"):  # one mask for the two-panel image: split it like the image
            mask_views = _split_panels(media.read_mask(masks[0], size=full_size)[0])
        else:
            if len(masks) != len(views):
                raise media.MediaError(f"{paths[0]}: {len(masks)} mask files for {len(views)} views")
            mask_views = [media.read_mask(m, size=v.shape[:2])[0] for m, v in zip(masks, views)]
        example["mask"] = mask_views
    return example


def write_shard(path: str, records: list[bytes]) -> None:
    """Write records to an ArrayRecord file (group_size 1: every record individually addressable)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    writer = ArrayRecordWriter(path, "group_size:1")
    try:
        for r in records:
            writer.write(r)
    finally:
        writer.close()


def _pack_shard(args: tuple[dict, str, dict]) -> dict:
    shard, output, options = args
    records, skipped = [], []
    for item in shard["items"]:
        try:
            example = load_item(item, options)
            records.append(serialize_example(example, options["frame_format"], options["quality"]))
        except Exception as e:  # any unreadable file is reported and skipped, never fatal
            where = item.get("paths", [f"synthetic {item.get('synthetic')}"])[0]
            message = str(e)
            if message.startswith(where + ": "):
                message = message[len(where) + 2:]
            skipped.append({"path": where, "error": f"{type(e).__name__}: {message}"})
    tmp = os.path.join(output, shard["name"] + ".tmp")
    write_shard(tmp, records)
    os.replace(tmp, os.path.join(output, shard["name"]))
    return {"name": shard["name"], "kind": shard["kind"], "records": len(records), "items": len(shard["items"]),
            "skipped": skipped}


# ------------------------------------------------------------------------------------------------------- running
def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def pack(items: list[dict], output: str, records_per_shard: int = 512, frame_format: str = "jpeg",
         quality: int = 90, max_frames: int | None = None, frame_stride: int = 1, short_side: int | None = None,
         workers: int = 1, restart: bool = False, progress: bool = True) -> dict:
    """Pack planned items into `output`; returns the dataset info dict (also written to dataset_info.json)."""
    from tqdm import tqdm

    if records_per_shard < 1:
        raise ValueError(f"records_per_shard must be >= 1, got {records_per_shard}")
    os.makedirs(output, exist_ok=True)
    options = {"frame_format": frame_format, "quality": quality, "max_frames": max_frames,
               "frame_stride": frame_stride, "short_side": short_side}
    shards = plan_shards(items, records_per_shard)
    fingerprint = hashlib.sha256(json.dumps([items, options, records_per_shard], sort_keys=True,
                                            default=str).encode()).hexdigest()
    progress_path = os.path.join(output, PROGRESS_FILE)
    state = {"fingerprint": fingerprint, "shards": {}}
    if os.path.exists(progress_path) and not restart:
        with open(progress_path) as f:
            previous = json.load(f)
        if previous.get("fingerprint") != fingerprint:
            raise ValueError(f"{progress_path} belongs to a different input or options; pass --restart to start over "
                             f"(this deletes its shards) or choose another --output")
        state = previous
    elif restart:
        for name in os.listdir(output):
            if name.endswith(SHARD_SUFFIX) or name.endswith(SHARD_SUFFIX + ".tmp"):
                os.remove(os.path.join(output, name))
    done = {n for n in state["shards"] if os.path.exists(os.path.join(output, n))}
    todo = [s for s in shards if s["name"] not in done]
    bar = tqdm(total=len(items), initial=sum(len(s["items"]) for s in shards if s["name"] in done),
               unit="file", desc="packing", disable=not progress)
    jobs = [(s, output, options) for s in todo]
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 and len(jobs) > 1 else None
    try:
        results = pool.imap_unordered(_pack_shard, jobs) if pool else map(_pack_shard, jobs)
        for result in results:
            state["shards"][result["name"]] = result
            _write_json(progress_path, state)  # after the rename: a listed shard is complete
            bar.update(result["items"])
    finally:
        bar.close()
        if pool:
            pool.close()
            pool.join()
    info: dict[str, Any] = {"format": RECORD_FORMAT, "kinds": {}, "skipped": [], "options": options}
    for s in shards:
        r = state["shards"][s["name"]]
        entry = info["kinds"].setdefault(s["kind"], {"shards": [], "records": 0})
        entry["shards"].append(s["name"])
        entry["records"] += r["records"]
        info["skipped"] += r["skipped"]
    _write_json(os.path.join(output, INFO_FILE), info)
    return info


def positive_int(text: str) -> int:
    """argparse type: an int >= 1 (a size, count or stride of 0 would pack 1 x 1 frames or 1-frame videos)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: expected a positive integer")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", nargs="?", help="folder of media files, or a .jsonl manifest")
    parser.add_argument("-o", "--output", required=True, help="output folder for the shards")
    parser.add_argument("--records-per-shard", type=positive_int, default=512,
                        help="records per ArrayRecord shard (a shard is the unit a resumed packing skips or redoes)")
    parser.add_argument("--frame-format", choices=("jpeg", "png", "raw"), default="jpeg",
                        help="how frames, views and reference images are stored: jpeg (compact, lossy), png "
                             "(lossless), raw (uncompressed uint8)")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality")
    parser.add_argument("--max-frames", type=positive_int, default=None, help="keep at most this many frames per video")
    parser.add_argument("--frame-stride", type=positive_int, default=1, help="keep every k-th video frame")
    parser.add_argument("--short-side", type=positive_int, default=None, help="downscale so the shorter side is at most this")
    parser.add_argument("--split-panels", action="store_true", help="read images as two-panel pairs (Subjects200K)")
    parser.add_argument("--workers", type=positive_int, default=1, help="processes packing shards in parallel")
    parser.add_argument("--restart", action="store_true", help="ignore progress.json and rewrite every shard")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--synthetic-videos", type=int, default=0, help="pack this many synthetic-world videos")
    parser.add_argument("--synthetic-pairs", type=int, default=0, help="pack this many synthetic image pairs")
    parser.add_argument("--synthetic-size", type=int, default=32, help="synthetic world: frame size in pixels")
    parser.add_argument("--synthetic-frames", type=int, default=8, help="synthetic world: frames per video")
    parser.add_argument("--synthetic-subjects", type=int, default=64, help="synthetic world: number of subjects")
    parser.add_argument("--synthetic-held-out", type=int, default=8,
                        help="synthetic world: subjects kept out of the train split (for held-out evaluation)")
    parser.add_argument("--synthetic-split", choices=("train", "held_out", "all"), default="train",
                        help="synthetic world: which subjects' records to pack")
    parser.add_argument("--seed", type=int, default=0, help="synthetic world: seed of its subjects and renders")


def run(args: argparse.Namespace) -> int:
    synthetic = args.synthetic_videos > 0 or args.synthetic_pairs > 0
    if synthetic == bool(args.input):
        print("jaxvc pack: give an input folder/manifest, or --synthetic-videos/--synthetic-pairs (not both)",
              file=sys.stderr)
        return 2
    if synthetic:
        world = {"image_size": args.synthetic_size, "num_frames": args.synthetic_frames,
                 "num_subjects": args.synthetic_subjects, "held_out": args.synthetic_held_out, "seed": args.seed}
        items = synthetic_items(args.synthetic_videos, args.synthetic_pairs, world, args.synthetic_split, args.seed)
    elif os.path.isdir(args.input):
        items = scan_folder(args.input, args.split_panels)
    elif os.path.isfile(args.input):
        items = read_manifest(args.input, args.split_panels)
    else:
        print(f"jaxvc pack: input {args.input!r} is neither a folder nor a manifest file", file=sys.stderr)
        return 2
    if not items:
        print(f"jaxvc pack: no videos or images found in {args.input!r}", file=sys.stderr)
        return 1
    info = pack(items, args.output, args.records_per_shard, args.frame_format, args.quality, args.max_frames,
                args.frame_stride, args.short_side, args.workers, args.restart, progress=not args.no_progress)
    total = sum(k["records"] for k in info["kinds"].values())
    kinds = ", ".join(f"{k['records']} {name}" for name, k in info["kinds"].items())
    shards = sum(len(k["shards"]) for k in info["kinds"].values())
    print(f"packed {total} records ({kinds}) into {shards} shards in {args.output}")
    if info["skipped"]:
        print(f"skipped {len(info['skipped'])} unreadable file(s):")
        for s in info["skipped"]:
            print(f"  {s['path']}: {s['error']}")
    return 0 if total > 0 else 1
