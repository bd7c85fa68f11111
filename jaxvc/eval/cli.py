"""``jaxvc eval``: CLIP-T, CLIP-I, DINO-I and temporal consistency (``feature_metrics.py``), dynamic degree
(``dynamic_degree.py``, RAFT optical flow), motion smoothness (``motion_smoothness.py``, AMT frame interpolation),
face similarity (``face_similarity.py``, insightface's ONNX detector and ArcFace run in JAX), FVD/KVD against real
videos (``fvd.py``, I3D) and the UCF-101 Inception Score (``inception_score.py``, C3D) of generated videos.

Videos are named by records: the ``<name>.json`` that ``jaxvc generate`` writes beside each video, or the lines of
a JSONL manifest. A record is ``{"video": PATH, "prompt": TEXT, "reference": PATH}`` (or ``"references": [PATH,
...]``); relative paths are taken from the record file's folder. A video or reference that cannot be read is
skipped and counted, and the exit status is then 1; so is a metric that cannot score a video (the video keeps its
other scores). References with transparency are put on white, as ``jaxvc generate`` does.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from jaxvc.eval.dynamic_degree import TAO_WU_SCALE, VBENCH_SCALE


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
    parser.add_argument("--raft-model", default=None,
                        help="RAFT checkpoint for the dynamic degree: princeton-vl/RAFT's raft-things.pth (a torch "
                             "pickle: needs --allow-pickle) or a .safetensors copy")
    parser.add_argument("--dd-scale", type=float, default=VBENCH_SCALE,
                        help="a frame pair moves when its top-5%% flow magnitude exceeds SCALE * min(H, W) / 256 "
                             f"pixels: {VBENCH_SCALE} as in VBench and method (e), {TAO_WU_SCALE} as in VideoMaker's "
                             "and CustomCrafter's eval code (the papers' figures are not comparable)")
    parser.add_argument("--dd-batch-size", type=int, default=8, help="frame pairs per RAFT call")
    parser.add_argument("--amt-model", default=None,
                        help="AMT-S checkpoint for VBench's motion smoothness: amt-s.pth (a torch pickle: needs "
                             "--allow-pickle) or a .safetensors copy")
    parser.add_argument("--ms-batch-size", type=int, default=8, help="frame pairs per AMT call")
    parser.add_argument("--face-det-model", default=None,
                        help="insightface SCRFD detector with landmarks for the face similarity (VideoMaker's "
                             "FaceSim): buffalo_l's det_10g.onnx or antelopev2's scrfd_10g_bnkps.onnx; needs "
                             "--face-rec-model")
    parser.add_argument("--face-rec-model", default=None,
                        help="insightface ArcFace recognizer: buffalo_l's w600k_r50.onnx or antelopev2's "
                             "glintr100.onnx. Each record's references and frames are detected, aligned and "
                             "embedded; frames without a face are skipped and counted")
    parser.add_argument("--face-det-size", type=int, default=640,
                        help="the detector's square input side (insightface's det_size); frames are letterboxed in")
    parser.add_argument("--face-batch-size", type=int, default=16, help="aligned faces per ArcFace call")
    parser.add_argument("--face-warp", choices=("opencv4", "opencv5"), default="opencv4",
                        help="whose affine-warp arithmetic aligns the faces: OpenCV 4's fixed point, bit for bit "
                             "(what the published evaluations ran), or OpenCV 5's float (equal but for about 5 values "
                             "per million); the two are a few grey levels apart at half of the pixels")
    parser.add_argument("--i3d-model", default=None,
                        help="I3D checkpoint for FVD and KVD: TATS's i3d_pretrained_400.pt (a torch pickle: needs "
                             "--allow-pickle) or a .safetensors copy; needs --real-videos")
    parser.add_argument("--real-videos", nargs="+", default=None, metavar="PATH",
                        help="the real set FVD/KVD compare the records' videos with: video files, folders of "
                             "videos, or .json/.jsonl records (their \"video\" fields)")
    parser.add_argument("--fvd-frames", type=int, default=16,
                        help="FVD/KVD take the first this many frames of every video, real and generated (TATS's "
                             "and cd-fvd's sequence_length); shorter videos are left out of FVD and counted")
    parser.add_argument("--fvd-batch-size", type=int, default=16, help="videos per I3D call")
    parser.add_argument("--c3d-model", default=None,
                        help="UCF-101 C3D for the video Inception Score (MicroCinema's UCF-101 IS): TGANv2's "
                             "conv3d_deepnetA_ucf.npz (chainer) or the same keys in .safetensors; needs --c3d-mean. "
                             "The first 16 frames of every video are scored; shorter videos are left out and counted")
    parser.add_argument("--c3d-mean", default=None,
                        help="the mean clip C3D's inputs are centred with: TGANv2's mean2.npz (3 x 16 x 128 x 171)")
    parser.add_argument("--is-splits", type=int, default=1,
                        help="1: TGANv2's score over all videos at once; N > 1: StyleGAN-V's mean and standard "
                             "deviation over N parts of the shuffled set (it uses 10)")
    parser.add_argument("--is-batch-size", type=int, default=16, help="videos per C3D call")
    parser.add_argument("--tokenizer", default=None,
                        help="CLIP tokenizer folder (vocab.json + merges.txt or tokenizer.json); default: the one "
                             "in --clip-model, else jaxvc's built-in CLIP vocabulary")
    parser.add_argument("--frames", type=int, default=None,
                        help="score only this many frames from the middle of each video (method (e) uses 16); "
                             "default: every frame. The dynamic degree then keeps about 8 fps of those frames")
    parser.add_argument("--batch-size", type=int, default=32, help="images per call of an image tower")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="allow pickled torch weights (they can run code when loaded): pytorch_model.bin where "
                             "a folder has no safetensors, raft-things.pth, amt-s.pth, i3d_pretrained_400.pt (the "
                             "face models are ONNX files and the C3D an .npz: no pickle)")
    parser.add_argument("--out", default=None, help="write every video's scores and the means to this JSON file")
    parser.add_argument("--prompt-drop", action="append", default=[], metavar="TOKEN",
                        help="remove TOKEN from every prompt before CLIP-T (repeatable), e.g. CustomCrafter's "
                             "learnt '<new1>', which CLIP's own vocabulary reads as the characters '<', 'new', '1', "
                             "'>'; the --out file names the prompt scored")
    parser.add_argument("--x100", action="store_true",
                        help="print the cosine scores (CLIP-T, CLIP-I, DINO-I, T.Cons, face similarity) x 100, as "
                             "method (e)'s and OpenS2V's tables report them (the --out file keeps the raw values)")


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
    if not isinstance(record["video"], str) or not record["video"]:
        raise RecordError(f"{source}: \"video\" must be a non-empty path, got {record['video']!r}")
    references = record.get("references")  # null: absent, as in prompt sets
    if references is None:
        references = [record["reference"]] if record.get("reference") else []
    if not isinstance(references, list) or not all(isinstance(r, str) for r in references):
        raise RecordError(f"{source}: \"references\" must be a list of paths, got {references!r}")
    prompt = record.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise RecordError(f"{source}: \"prompt\" must be a string, got {prompt!r}")
    return {"source": source, "video": str(folder / record["video"]), "prompt": prompt,
            "references": [str(folder / r) for r in references]}


def clip_t_prompt(prompt: str | None, drop: list[str]) -> str | None:
    """The prompt CLIP-T reads: ``prompt`` without the ``drop`` tokens, spaces collapsed ("a <new1> dog surfing"
    -> "a dog surfing")."""
    if prompt is None or not drop:
        return prompt
    for token in drop:
        prompt = prompt.replace(token, " ")
    return " ".join(prompt.split())


def real_video_paths(paths) -> list[str]:
    """Video files named directly, found in folders (sorted, not recursive) or named by records."""
    from jaxvc.data.media import is_video

    found = []
    for path in map(Path, paths):
        if path.is_dir():
            found += sorted(str(p) for p in path.iterdir() if p.is_file() and is_video(p.name))
        elif path.suffix in (".json", ".jsonl"):
            found += [record["video"] for record in read_records([path])]
        elif path.is_file() and is_video(path.name):
            found.append(str(path))
        else:
            raise RecordError(f"{path}: not a video file, a folder of videos or a .json/.jsonl record file")
    if len(found) < 2:
        raise RecordError(f"--real-videos {' '.join(map(str, paths))}: {len(found)} video(s); FVD and KVD need at "
                          "least 2")
    return found


def _read_video(path: str, max_frames: int | None = None):
    """(frames (F, H, W, 3) uint8, frames per second): the first ``max_frames`` frames, or all."""
    from jaxvc.data.media import read_video

    return read_video(path, max_frames=max_frames)


def run(args) -> int:
    import numpy as np
    from tqdm.auto import tqdm

    from jaxvc.data.media import REFERENCE_BACKGROUND, MediaError, read_image
    from jaxvc.eval.dynamic_degree import DynamicDegree, FlowEstimator
    from jaxvc.eval.feature_metrics import METRICS, VideoScorer, center_frames, mean_scores
    from jaxvc.eval.fvd import MIN_FRAMES, FeatureStream, I3DFeatures, score_features
    from jaxvc.eval.face_similarity import FaceDetector, FaceEmbedder, FaceSimilarity
    from jaxvc.eval.inception_score import C3DProbabilities, inception_score
    from jaxvc.eval.motion_smoothness import Interpolator, MotionSmoothness
    from jaxvc.models.c3d import CLIP_FRAMES

    if not (args.clip_model or args.dino_model or args.raft_model or args.amt_model or args.face_det_model
            or args.i3d_model or args.c3d_model):
        raise SystemExit("jaxvc eval: give --clip-model (CLIP-T, CLIP-I, temporal consistency), --dino-model "
                         "(DINO-I), --raft-model (dynamic degree), --amt-model (motion smoothness), --face-det-model "
                         "with --face-rec-model (face similarity), --i3d-model with --real-videos (FVD, KVD) and/or "
                         "--c3d-model with --c3d-mean (UCF-101 Inception Score)")
    if bool(args.face_det_model) != bool(args.face_rec_model):
        raise SystemExit("jaxvc eval: face similarity needs both --face-det-model and --face-rec-model")
    if bool(args.i3d_model) != bool(args.real_videos):
        raise SystemExit("jaxvc eval: FVD/KVD need both --i3d-model and --real-videos")
    if bool(args.c3d_model) != bool(args.c3d_mean):
        raise SystemExit("jaxvc eval: the Inception Score needs both --c3d-model and --c3d-mean")
    for flag, value in (("--frames", args.frames), ("--dd-batch-size", args.dd_batch_size),
                        ("--ms-batch-size", args.ms_batch_size), ("--fvd-batch-size", args.fvd_batch_size),
                        ("--face-det-size", args.face_det_size), ("--face-batch-size", args.face_batch_size),
                        ("--is-splits", args.is_splits), ("--is-batch-size", args.is_batch_size)):
        if value is not None and value < 1:
            raise SystemExit(f"jaxvc eval: {flag} must be >= 1, got {value}")
    if args.fvd_frames < MIN_FRAMES:
        raise SystemExit(f"jaxvc eval: --fvd-frames must be >= {MIN_FRAMES} (I3D's shortest input), got "
                         f"{args.fvd_frames}")
    try:
        records = read_records(args.records)
        real_paths = real_video_paths(args.real_videos) if args.real_videos else []
    except RecordError as error:
        raise SystemExit(f"jaxvc eval: {error}") from None
    if not records:
        print(f"jaxvc eval: no records in {' '.join(map(str, args.records))}", file=sys.stderr)
        return 2
    try:
        i3d = (I3DFeatures.from_file(args.i3d_model, args.fvd_batch_size, allow_pickle=args.allow_pickle)
               if args.i3d_model else None)
        scorer = (VideoScorer.from_folders(args.clip_model, args.dino_model, args.tokenizer, args.batch_size,
                                           args.allow_pickle) if args.clip_model or args.dino_model else None)
        dynamic = (DynamicDegree(FlowEstimator.from_file(args.raft_model, args.dd_batch_size, args.allow_pickle),
                                 scale=args.dd_scale) if args.raft_model else None)
        smoothness = (MotionSmoothness(Interpolator.from_file(args.amt_model, args.ms_batch_size, args.allow_pickle))
                      if args.amt_model else None)
        faces = (FaceSimilarity(FaceDetector.from_file(args.face_det_model,
                                                       input_size=(args.face_det_size, args.face_det_size)),
                                FaceEmbedder.from_file(args.face_rec_model, args.face_batch_size, args.face_warp))
                 if args.face_det_model else None)
        c3d = (C3DProbabilities.from_files(args.c3d_model, args.c3d_mean, args.is_batch_size, args.allow_pickle)
               if args.c3d_model else None)
    except (ValueError, FileNotFoundError) as error:  # the loaders' errors name the folder, key or shape
        raise SystemExit(f"jaxvc eval: {error}") from None
    results, skipped = [], []
    fake_features = FeatureStream(i3d, "generated videos") if i3d else None
    class_probabilities = FeatureStream(c3d, "generated videos (C3D)") if c3d else None
    for record in tqdm(records, desc="scoring videos", unit="video"):
        try:
            whole, fps = _read_video(record["video"])
            references = [read_image(path, background=REFERENCE_BACKGROUND) for path in record["references"]]
        except MediaError as error:  # unreadable: named, counted, skipped
            skipped.append(f"{record['source']}: {error}")
            continue
        frames = np.asarray(center_frames(whole, args.frames))
        prompt = clip_t_prompt(record["prompt"], args.prompt_drop)
        scores = {}

        def score(metric: str, compute, *keys) -> None:
            """One metric's scores of the video; its refusal (no face, frames too small for RAFT, fewer than 3
            frames for AMT) is named and counted for that metric only."""
            try:
                values = compute()
            except ValueError as error:
                skipped.append(f"{record['source']}: {metric}: {error}")
                return
            scores.update({key: values[key] for key in keys} if keys else values)

        if scorer:
            score("CLIP/DINO", lambda: scorer.score(frames, prompt, references))
        if prompt != record["prompt"]:
            scores["clip_t_prompt"] = prompt
        if dynamic:
            score("dynamic degree", lambda: dynamic.score(frames, fps), "dynamic_degree", "flow_scores")
        if smoothness:
            score("motion smoothness", lambda: smoothness.score(frames), "motion_smoothness",
                  "interpolation_errors")
        if faces:
            score("face similarity", lambda: faces.score(frames, references))
        if fake_features is not None:
            _add_clip(fake_features, whole, args.fvd_frames, record["source"], skipped)
        if class_probabilities is not None:
            _add_clip(class_probabilities, whole, CLIP_FRAMES, record["source"], skipped, "the Inception Score")
        results.append({"video": record["video"], "source": record["source"], "frames": int(len(frames)), **scores})
    means = mean_scores(results, METRICS + ("dynamic_degree", "motion_smoothness", "face_similarity"))
    if i3d is not None:
        real_features = FeatureStream(i3d, "real videos")
        for path in tqdm(real_paths, desc="real videos (I3D)", unit="video"):
            try:
                _add_clip(real_features, _read_video(path, args.fvd_frames)[0], args.fvd_frames, f"real {path}",
                          skipped)
            except MediaError as error:
                skipped.append(f"real {path}: {error}")
        real, fake = real_features.finish(), fake_features.finish()
        if len(real) < 2 or len(fake) < 2:
            skipped.append(f"FVD/KVD: {len(real)} real and {len(fake)} generated videos were usable; each set "
                           "needs at least 2")
        else:
            for name, value in score_features(real, fake).items():
                means[name] = (value, len(fake))
    if c3d is not None:
        probabilities = class_probabilities.finish()
        if len(probabilities) < args.is_splits:
            skipped.append(f"Inception Score: {len(probabilities)} usable videos for --is-splits {args.is_splits}")
        else:
            score, spread = inception_score(probabilities, args.is_splits)
            means["inception_score"] = (score, len(probabilities))
            if args.is_splits > 1:
                means["inception_score_std"] = (spread, len(probabilities))
    print(format_table(means, len(results), x100=args.x100))
    for line in skipped:
        print(f"skipped {line}", file=sys.stderr)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        summary = {"means": {name: value for name, (value, _) in means.items()},
                   "counts": {name: count for name, (_, count) in means.items()},
                   "videos": results, "skipped": skipped,
                   "models": {"clip": args.clip_model, "dino": args.dino_model, "raft": args.raft_model,
                              "amt": args.amt_model, "face_detector": args.face_det_model,
                              "face_recognizer": args.face_rec_model, "i3d": args.i3d_model,
                              "c3d": args.c3d_model, "c3d_mean": args.c3d_mean},
                   "frames": args.frames, "dd_scale": args.dd_scale if args.raft_model else None,
                   "fvd": {"frames": args.fvd_frames, "real_videos": len(real_paths)} if i3d else None,
                   "inception_score": {"frames": CLIP_FRAMES, "splits": args.is_splits} if c3d else None}
        Path(args.out).write_text(json.dumps(summary, indent=2))
        print(f"wrote {args.out}")
    return 1 if skipped else 0


def _add_clip(stream, frames, count: int, source: str, skipped: list, metric: str = "FVD/KVD") -> None:
    """The first ``count`` frames of a video into a feature stream (I3D or C3D); a shorter video is counted as
    skipped."""
    if len(frames) < count:
        skipped.append(f"{source}: {len(frames)} frames, fewer than {count}; left out of {metric}")
        return
    stream.add(frames[:count])


# cosines, reported x 100 by method (e)
COSINE_SCORES = ("clip_t", "clip_i", "dino_i", "temporal_consistency", "face_similarity")


def format_table(means: dict, scored: int, x100: bool = False) -> str:
    lines = [f"{'metric':<22} {'mean':>8} {'videos':>7}", "-" * 39]
    for name, (value, count) in means.items():
        if x100 and name in COSINE_SCORES:
            name, value = f"{name} (x100)", 100.0 * value
        lines.append(f"{name:<22} {value:>8.4f} {count:>7}")
    lines.append(f"{scored} videos scored")
    return "\n".join(lines)
