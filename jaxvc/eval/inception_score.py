"""The video Inception Score on UCF-101 (MicroCinema's "IS", specs/METHODS.md section on MicroCinema): C3D's class
probabilities of generated videos, exp(E_x KL(p(y|x) || p(y))).

What is followed, and from where (TGANv2's ``calc_is.py``, the script the TGAN/TGANv2/MoCoGAN line of UCF-101 IS
figures and Make-A-Video's zero-shot protocol, which MicroCinema follows, go back to):

- **Clips**: 16 frames per video (C3D takes exactly 16); here the first 16, shorter videos are left out and counted.
- **Preprocessing**: every frame resized to 128 x 128 with ``cv2.resize(..., INTER_CUBIC)`` of the float frame
  (no antialiasing, aspect ratio not kept; ``jaxvc.models.resample.resize_cubic``), RGB -> BGR, minus the training
  mean clip (``mean2.npz``, its centre 128 columns, ``jaxvc/convert/c3d.py``), centre crop 112 x 112 (rows and
  columns 8..119). TGANv2 feeds its generator's output scaled to 0..256 (``x * 128 + 128``); decoded videos here are
  uint8 0..255 taken as they are.
- **Network**: TGANv2's ``C3DVersion1`` (``jaxvc.models.c3d``), softmax of fc8 in float32 as chainer computes it.
- **Score**: ``calc_inception``: with p(y) the mean of the N probability rows,
  IS = exp(sum(p log(p + 1e-7) - p log(p(y) + 1e-7)) / N), in float64. ``splits`` > 1 follows StyleGAN-V's
  ``compute_isv`` (the rows shuffled by ``np.random.RandomState(42)``, split into ``splits`` consecutive parts
  ``[i N // splits, (i + 1) N // splits)``, the score of each part, then mean and standard deviation); its ``log``
  has no epsilon (``eps=0`` reproduces it; 1e-7 moves the score by about 1e-7 relative unless a probability is 0).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from jaxvc.models.c3d import C3D, CLIP_FRAMES, CROP_SIZE, NUM_CLASSES
from jaxvc.models.resample import resize_cubic

RESIZE = (128, 128)  # TGANv2: cv.resize(frame, (128, 128)), then the 112 x 112 centre
CROP_START = (RESIZE[0] - CROP_SIZE) // 2  # 8
EPS = 1e-7  # calc_inception's
STYLEGAN_V_SEED = 42  # compute_isv's np.random.RandomState(42).shuffle


def preprocess_clips(videos, mean) -> jax.Array:
    """uint8 videos (B, 16, H, W, 3) RGB and the mean clip (16, 128, 128, 3) BGR -> C3D's input (B, 16, 112, 112, 3):
    cubic resize to 128 x 128, BGR, minus the mean, centre crop."""
    x = resize_cubic(jnp.asarray(videos).astype(jnp.float32), RESIZE)  # (B, 16, 128, 128, 3)
    x = x[..., ::-1] - jnp.asarray(mean, jnp.float32)  # TGANv2: "mean file is BGR-order while model outputs RGB"
    end = CROP_START + CROP_SIZE
    return x[:, :, CROP_START:end, CROP_START:end]


def check_clips(videos, what: str = "videos") -> None:
    """Raise ValueError unless ``videos`` is a uint8 (B, 16, H, W, 3) array."""
    shape, dtype = tuple(np.shape(videos)), getattr(videos, "dtype", None)
    if len(shape) != 5 or shape[-1] != 3 or shape[1] != CLIP_FRAMES:
        raise ValueError(f"{what}: expected uint8 clips (count, {CLIP_FRAMES}, height, width, 3) (C3D takes exactly "
                         f"{CLIP_FRAMES} frames), got shape {shape}")
    if dtype != np.uint8:
        raise ValueError(f"{what}: expected uint8 frames in 0..255, got dtype {dtype}")
    if shape[0] < 1 or min(shape[2:4]) < 1:
        raise ValueError(f"{what}: no videos or empty frames, got shape {shape}")


@dataclass
class C3DProbabilities:
    """C3D's UCF-101 class probabilities of uint8 clips: ``params`` of ``C3D``, the mean clip, and a jitted
    ``uint8 clips -> (N, 101)``; the same batching, device placement and precision as
    ``jaxvc.eval.fvd.I3DFeatures`` (``jaxvc.eval.fvd.FeatureStream`` takes either)."""
    params: dict
    mean: np.ndarray
    batch_size: int = 16
    num_classes: int = NUM_CLASSES
    precision: str | None = "highest"

    def __post_init__(self):
        from jaxvc.eval.feature_metrics import data_parallel

        model = C3D(self.num_classes)
        self.mean = np.asarray(self.mean, np.float32)
        self.mesh, self.params, self.batch_size, self._probabilities = data_parallel(
            lambda params, inputs: jax.nn.softmax(model.apply(params, inputs), axis=-1), self.params,
            self.batch_size)
        self._prepare = jax.jit(preprocess_clips)

    @classmethod
    def from_files(cls, model_path: str | os.PathLike, mean_path: str | os.PathLike, batch_size: int = 16,
                   allow_pickle: bool = False) -> "C3DProbabilities":
        """From TGANv2's ``conv3d_deepnetA_ucf.npz`` (or ``.safetensors``/torch keys) and ``mean2.npz``."""
        from jaxvc.convert.c3d import load_c3d, load_c3d_mean

        _, params = load_c3d(model_path, allow_pickle=allow_pickle)
        return cls(params, load_c3d_mean(mean_path), batch_size)

    check = staticmethod(check_clips)

    def __call__(self, videos, what: str = "videos") -> np.ndarray:
        """uint8 clips (N, 16, H, W, 3), or a list of (16, H, W, 3) clips -> (N, 101) float64 probabilities."""
        if isinstance(videos, (list, tuple)):
            from jaxvc.eval.fvd import FeatureStream

            return FeatureStream.of(self, videos, what)
        from jaxvc.eval.feature_metrics import in_fixed_batches

        check_clips(videos, what)
        return in_fixed_batches(lambda chunk: self.from_prepared(self.prepare(chunk), what), (videos,),
                                self.batch_size)

    def prepare(self, videos) -> np.ndarray:
        """uint8 clips (B, 16, H, W, 3) -> C3D's inputs, float32 (B, 16, 112, 112, 3) (``preprocess_clips``, jitted
        per clip shape)."""
        return np.asarray(self._prepare(videos, self.mean))

    def from_prepared(self, inputs, what: str = "videos") -> np.ndarray:
        """``prepare``'s output (N, 16, 112, 112, 3) -> (N, 101) float64 probabilities, in batches of
        ``batch_size``."""
        from jaxvc.eval.feature_metrics import in_fixed_batches

        with jax.default_matmul_precision(self.precision):
            probabilities = in_fixed_batches(lambda chunk: self._probabilities(self.params, chunk), (inputs,),
                                             self.batch_size)
        return np.asarray(probabilities, np.float64)


def inception_score(probabilities, splits: int = 1, eps: float = EPS,
                    seed: int = STYLEGAN_V_SEED) -> tuple[float, float]:
    """(mean, standard deviation over splits) of exp(mean KL(p(y|x) || p(y))) for (N, classes) probabilities.

    ``splits=1`` is TGANv2's ``calc_inception`` (standard deviation 0); more splits shuffle the rows with
    ``RandomState(seed)`` first, as StyleGAN-V's ``compute_isv``. ``eps`` is added inside both logarithms."""
    p = np.asarray(probabilities, np.float64)
    if p.ndim != 2 or len(p) < 1:
        raise ValueError(f"inception score: expected probabilities (count, classes), got shape {p.shape}")
    if splits < 1 or splits > len(p):
        raise ValueError(f"inception score: {splits} splits of {len(p)} videos; need 1 <= splits <= videos")
    if not np.all(np.isfinite(p)) or np.any(p < 0):
        raise ValueError("inception score: probabilities must be finite and non-negative")
    if splits > 1:
        p = p.copy()
        np.random.RandomState(seed).shuffle(p)
    scores = []
    for index in range(splits):
        part = p[index * len(p) // splits:(index + 1) * len(p) // splits]
        marginal = part.mean(axis=0, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):  # eps=0 with a zero probability: 0 * log 0 -> NaN
            kl = part * (np.log(part + eps) - np.log(marginal + eps))
        scores.append(float(np.exp(np.sum(kl) / len(part))))
    return float(np.mean(scores)), float(np.std(scores))


__all__ = ["C3DProbabilities", "check_clips", "inception_score", "preprocess_clips"]
