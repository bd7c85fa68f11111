"""CLIP-T, CLIP-I, DINO-I and temporal consistency of generated videos (specs/METHODS.md, section 0).

With L2-normalised embeddings and cos = dot product, per video of frames f_1..f_n, prompt p, references r_1..r_m:

- CLIP-T = mean_i cos(CLIP_img(f_i), CLIP_txt(p)): raw cosine, about 0.2-0.3 for real models (x100 in method (e));
- CLIP-I = mean_{i,j} cos(CLIP_img(f_i), CLIP_img(r_j));
- DINO-I = the same with DINO's final-normed CLS token;
- T.Cons = mean_i cos(CLIP_img(f_i), CLIP_img(f_{i+1})).

Each metric's mean over videos is the reported figure. The backbones are the papers': CLIP ViT-B/32
(``openai/clip-vit-base-patch32``) and DINO ViT-S/16 (``facebook/dino-vits16``), read from local transformers folders.
Dynamic degree (RAFT optical flow) is in ``dynamic_degree.py``; ``jaxvc eval`` reports it beside these.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxvc.eval.preprocess import ImagePreprocessor
from jaxvc.models.vision_transformer import VisionConfig, VisionTransformer

METRICS = ("clip_t", "clip_i", "dino_i", "temporal_consistency")


@dataclass
class ImageTower:
    """One image backbone: its processor, its parameters and a jitted ``pixels -> image_embeds``.

    Data parallel over this host's devices (a Colab TPU's 8 cores, a GPU host's GPUs): the parameters are
    replicated, each batch is split over the mesh's ``data`` axis, and ``batch_size`` is rounded up to a multiple
    of the device count."""
    config: VisionConfig
    params: dict
    preprocess: ImagePreprocessor
    batch_size: int = 32

    def __post_init__(self):
        model = VisionTransformer(self.config)
        self.mesh, self.params, self.batch_size, self._embed = data_parallel(
            lambda params, pixels: model.apply(params, pixels)["image_embeds"], self.params, self.batch_size)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, batch_size: int = 32, allow_pickle: bool = False,
                    **config_overrides) -> "ImageTower":
        from jaxvc.convert.vision import load_vision_tower

        config, params = load_vision_tower(folder, allow_pickle=allow_pickle, **config_overrides)
        return cls(config, params, ImagePreprocessor.for_model(folder, config.family, config.image_size), batch_size)

    def __call__(self, images) -> np.ndarray:
        """(N, H, W, 3) uint8 or a list of (H, W, 3) uint8 images -> (N, D) float64 unit vectors, in batches of
        ``batch_size`` (one compile)."""
        from jaxvc.parallel.mesh import activate

        pixels = self.preprocess(images)
        with activate(self.mesh):  # the towers' logical constraints: tokens split by batch over "data"
            embeds = in_fixed_batches(lambda chunk: self._embed(self.params, chunk), (pixels,), self.batch_size)
        return unit(np.asarray(embeds, np.float64))


@dataclass
class TextTower:
    """CLIP's text tower with ``text_projection``: prompts -> unit vectors in the image embeddings' space."""
    config: object
    params: dict
    projection: np.ndarray  # (D, P)
    tokenizer: object

    def __post_init__(self):
        from jaxvc.models.clip_text import CLIPTextEncoder

        model = CLIPTextEncoder(self.config)
        self._encode = jax.jit(lambda params, ids: model.apply(params, ids)["pooler_output"])

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, tokenizer_folder=None, allow_pickle: bool = False) -> "TextTower":
        from jaxvc.convert.vision import load_clip_text_with_projection
        from jaxvc.models.tokenizer import load_tokenizer

        config, params, projection = load_clip_text_with_projection(folder, allow_pickle=allow_pickle)
        if tokenizer_folder is None and any(os.path.isfile(os.path.join(folder, name))
                                            for name in ("vocab.json", "tokenizer.json")):
            tokenizer_folder = folder  # hub CLIP folders keep the tokenizer beside the weights
        tokenizer = load_tokenizer(tokenizer_folder)
        return cls(config, params, projection, tokenizer)

    def __call__(self, prompts: Sequence[str]) -> np.ndarray:
        ids = self.tokenizer(list(prompts))[:, :self.config.max_position_embeddings]
        pooled = np.asarray(self._encode(self.params, jnp.asarray(ids)), np.float64)
        return unit(pooled @ self.projection.astype(np.float64))


def data_parallel(fn, state, batch_size: int):
    """The metric networks' placement over this host's devices (a Colab TPU's 8 cores, a GPU host's GPUs; one host's:
    the trainer scores on one): ``state`` (the parameters and any constants, a pytree) replicated, each batch split
    over the mesh's ``data`` axis, ``batch_size`` rounded up to a multiple of the device count. Returns (mesh, state
    on the devices, batch size, jitted ``fn(state, batch)`` with a replicated output)."""
    from jax.sharding import NamedSharding, PartitionSpec

    from jaxvc.parallel.mesh import make_mesh

    mesh = make_mesh({"data": -1}, devices=jax.local_devices())
    devices = mesh.shape["data"]
    replicated = NamedSharding(mesh, PartitionSpec())
    program = jax.jit(fn, in_shardings=(replicated, NamedSharding(mesh, PartitionSpec("data"))),
                      out_shardings=replicated)
    return mesh, jax.device_put(state, replicated), -(-batch_size // devices) * devices, program


def in_fixed_batches(fn, arrays, batch_size: int) -> np.ndarray:
    """``fn(*chunks)`` over consecutive ``batch_size`` rows of each of ``arrays`` (equal lengths), the last chunk
    zero-padded so that every call has one shape (one compile); the padded rows' outputs are dropped and the rest
    concatenated (numpy). The metric networks' batching: image towers, RAFT pairs, I3D clips."""
    out = []
    for start in range(0, len(arrays[0]), batch_size):
        chunks = [np.asarray(array[start:start + batch_size]) for array in arrays]
        missing = batch_size - len(chunks[0])
        if missing:
            chunks = [np.concatenate([c, np.zeros((missing, *c.shape[1:]), c.dtype)]) for c in chunks]
        out.append(np.asarray(fn(*chunks))[:batch_size - missing])
    return np.concatenate(out)


def unit(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def center_frames(frames: np.ndarray, count: int | None) -> np.ndarray:
    """The ``count`` frames in the middle of the clip (method (e)'s evaluator); all of them when None."""
    if count is None or count >= len(frames):
        return frames
    start = (len(frames) - count) // 2
    return frames[start:start + count]


class VideoScorer:
    """Scores videos with the towers it has: CLIP-T needs ``text``, CLIP-I and T.Cons ``clip``, DINO-I ``dino``."""

    def __init__(self, clip: ImageTower | None = None, text: TextTower | None = None, dino: ImageTower | None = None):
        if clip is None and dino is None:
            raise ValueError("VideoScorer needs a CLIP image tower or a DINO one")
        if clip is not None and clip.config.family != "clip":
            raise ValueError(f"the CLIP tower is a '{clip.config.family}' model; expected a CLIP vision tower")
        if dino is not None and dino.config.family != "vit":
            raise ValueError(f"the DINO tower is a '{dino.config.family}' model; expected a ViT (DINO) folder")
        self.clip, self.text, self.dino = clip, text, dino

    @classmethod
    def from_folders(cls, clip_folder=None, dino_folder=None, tokenizer_folder=None, batch_size: int = 32,
                     allow_pickle: bool = False):
        clip = ImageTower.from_folder(clip_folder, batch_size, allow_pickle) if clip_folder else None
        text = TextTower.from_folder(clip_folder, tokenizer_folder, allow_pickle) if clip_folder else None
        dino = ImageTower.from_folder(dino_folder, batch_size, allow_pickle) if dino_folder else None
        return cls(clip, text, dino)

    def score(self, frames: np.ndarray, prompt: str | None = None,
              references: Sequence[np.ndarray] = ()) -> dict[str, float]:
        """One video (F, H, W, 3) uint8 -> the metrics its inputs allow (a reference for CLIP-I/DINO-I, a prompt
        for CLIP-T, two frames for T.Cons)."""
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
            raise ValueError(f"a video must be (frames, H, W, 3), got shape {frames.shape}")
        scores: dict[str, float] = {}
        if self.clip is not None:
            frame_embeds = self.clip(frames)  # (F, P)
            if len(frames) > 1:
                scores["temporal_consistency"] = float(np.mean(np.sum(frame_embeds[1:] * frame_embeds[:-1], -1)))
            if prompt is not None and self.text is not None:
                scores["clip_t"] = float(np.mean(frame_embeds @ self.text([prompt])[0]))
            if len(references):
                scores["clip_i"] = float(np.mean(frame_embeds @ self.clip(references).T))
        if self.dino is not None and len(references):
            scores["dino_i"] = float(np.mean(self.dino(frames) @ self.dino(references).T))
        return {name: scores[name] for name in METRICS if name in scores}


def mean_scores(per_video: Sequence[dict[str, float]],
                names: Sequence[str] = METRICS) -> dict[str, tuple[float, int]]:
    """metric -> (mean over the videos that have it, how many do), for the metrics ``names``."""
    out = {}
    for name in names:
        values = [scores[name] for scores in per_video if name in scores]
        if values:
            out[name] = (float(np.mean(values)), len(values))
    return out
