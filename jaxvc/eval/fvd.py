"""FVD and KVD between a set of real and a set of generated videos (specs/METHODS.md, section 0), with I3D.

What is followed, and from where:

- **Features**: the logits (400-d, Kinetics-400) of I3D (``jaxvc.models.i3d``, TATS's ``i3d_pretrained_400.pt``),
  as cd-fvd's ``get_i3d_logits`` and CustomCrafter's ``utils/fvd_utils.get_fvd_logits`` take them: ``i3d(x)``.
- **Preprocessing**: cd-fvd's ``preprocess_i3d`` (= CustomCrafter's ``preprocess``): uint8 frames, bilinear resize
  to 224x224 with ``F.interpolate(mode="bilinear", align_corners=False)`` (no antialiasing, even when shrinking),
  then ``2 x / 255 - 1``. ``jax.image.resize`` antialiases when downsampling, so the resize here is torch's formula
  written as two interpolation matrices (``jaxvc.models.resample``).
- **FVD**: ``frechet_distance`` of cd-fvd's ``third_party/i3d/utils.py`` (identical in CustomCrafter's
  ``utils/fvd_utils.py``): means, *unbiased* covariances, and the trace term through TF-GAN's symmetric matrix
  square roots (SVD, singular values below 1e-10 kept unrooted): Tr(S_r + S_f) - 2 Tr(sqrt(sqrt(S_r) S_f sqrt(S_r)))
  + |m_r - m_f|^2. Computed in float64 (the references run it in float32 torch). cd-fvd's ``cdfvd.compute_fvd``
  class method instead uses biased covariances and ``scipy.linalg.sqrtm``; that variant is not followed.
- **KVD**: CustomCrafter's ``eval/eval_fvd_kvd.py`` -> ``utils/cal_fvd_text2video.cal_fvd`` ->
  ``utils/fvd_utils.polynomial_mmd(fake, real)`` (the same function as in TATS's and StyleGAN-V's FVD scripts): the
  unbiased MMD^2 estimate with sklearn's default ``polynomial_kernel``, k(x, y) = (x.y / d + 1)^3 (degree 3,
  gamma = 1 / feature dimension, coef0 = 1), on *all* features at once (no subsets, unlike KID's 100 subsets of 1000):
  sum_{i != j} k(x_i, x_j) / (m (m - 1)) + sum_{i != j} k(y_i, y_j) / (n (n - 1)) - 2 sum_{i,j} k(x_i, y_j) / (m n).
  Reported unscaled (CustomCrafter prints it as is). Computed in float64 (sklearn gets float32 features there).

Both distances are symmetric in their two sets. Videos are (B, T, H, W, 3) uint8, T >= 9 (I3D's minimum).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from jaxvc.models.i3d import MAX_FRAME_SIZE, MIN_FRAMES, InceptionI3d
from jaxvc.models.resample import bilinear_matrix, resize_bilinear

TARGET_SIZE = (MAX_FRAME_SIZE, MAX_FRAME_SIZE)  # cd-fvd's TARGET_RESOLUTION, (224, 224)
SQRT_EPS = 1e-10  # TF-GAN's _symmetric_matrix_square_root eps


# ---------------------------------------------------------------- preprocessing


def preprocess_videos(videos, size: tuple[int, int] = TARGET_SIZE) -> jax.Array:
    """uint8 videos (B, T, H, W, C) -> float32 (B, T, 224, 224, C) in [-1, 1], cd-fvd's ``preprocess_i3d`` in NTHWC.

    The resize is separable: rows (224, H) @ frame @ cols (W, 224), at full float32 precision (no bf16 passes)."""
    x = resize_bilinear(jnp.asarray(videos).astype(jnp.float32), size)  # (B, T, 224, 224, C)
    return 2.0 * x / 255.0 - 1.0


def check_videos(videos, what: str = "videos") -> None:
    """Raise ValueError unless ``videos`` is a uint8 (B, T, H, W, 3) array with T >= 9."""
    shape, dtype = tuple(np.shape(videos)), getattr(videos, "dtype", None)
    if len(shape) != 5 or shape[-1] != 3:
        raise ValueError(f"{what}: expected uint8 videos (count, frames, height, width, 3), got shape {shape}")
    if dtype != np.uint8:
        raise ValueError(f"{what}: expected uint8 frames in 0..255 (as cd-fvd's preprocess_i3d), got dtype {dtype}")
    if shape[1] < MIN_FRAMES:
        raise ValueError(f"{what}: {shape[1]} frames per video; I3D needs at least {MIN_FRAMES} (its time axis "
                         f"shrinks 8x before a 2-step average pool), got shape {shape}")
    if shape[0] < 1 or min(shape[2:4]) < 1:
        raise ValueError(f"{what}: no videos or empty frames, got shape {shape}")


# ---------------------------------------------------------------- features


@dataclass
class I3DFeatures:
    """I3D logits of uint8 videos: ``params`` of ``InceptionI3d``, a jitted ``preprocess_videos`` (``prepare``, one
    compile per video shape) and a jitted ``inputs (N, T, 224, 224, 3) -> (N, 400)`` (``from_prepared``).

    Batches of ``batch_size`` videos (the last one zero-padded, so one compile per video length), data parallel over
    this host's devices like ``jaxvc.eval.feature_metrics.ImageTower``. ``precision`` is the matmul/conv precision
    while tracing: "highest" keeps float32 on GPUs (no TF32) and TPUs (no single bf16 pass), as the references'
    float32 torch runs; preprocessing is always at full precision."""
    params: dict
    batch_size: int = 16
    num_classes: int = 400
    precision: str | None = "highest"

    def __post_init__(self):
        from jaxvc.eval.feature_metrics import data_parallel

        model = InceptionI3d(self.num_classes)
        self.mesh, self.params, self.batch_size, self._logits = data_parallel(
            lambda params, inputs: model.apply(params, inputs), self.params, self.batch_size)
        self._prepare = jax.jit(preprocess_videos)

    @classmethod
    def from_file(cls, path: str | os.PathLike, batch_size: int = 16, allow_pickle: bool = False) -> "I3DFeatures":
        """From TATS's ``i3d_pretrained_400.pt`` (needs ``allow_pickle``) or the same keys in a ``.safetensors``."""
        from jaxvc.convert.i3d import load_i3d

        _, params = load_i3d(path, allow_pickle=allow_pickle)
        return cls(params, batch_size)

    check = staticmethod(check_videos)

    def __call__(self, videos, what: str = "videos") -> np.ndarray:
        """uint8 videos (N, T, H, W, 3), or a list of (T, H, W, 3) videos (grouped by shape) -> (N, 400) float64."""
        if isinstance(videos, (list, tuple)):
            return FeatureStream.of(self, videos, what)  # batches the videos' inputs, keeps the order
        from jaxvc.eval.feature_metrics import in_fixed_batches

        check_videos(videos, what)
        return in_fixed_batches(lambda chunk: self.from_prepared(self.prepare(chunk), what), (videos,),
                                self.batch_size)

    def prepare(self, videos) -> np.ndarray:
        """uint8 videos (B, T, H, W, 3) -> the network's inputs, float32 (B, T, 224, 224, 3) in [-1, 1]
        (``preprocess_videos``, jitted per video shape)."""
        return np.asarray(self._prepare(videos))

    def from_prepared(self, inputs, what: str = "videos") -> np.ndarray:
        """``prepare``'s output (N, T, 224, 224, 3) -> (N, 400) float64 logits, in batches of ``batch_size``."""
        from jaxvc.eval.feature_metrics import in_fixed_batches

        with jax.default_matmul_precision(self.precision):
            logits = in_fixed_batches(lambda chunk: self._logits(self.params, chunk), (inputs,), self.batch_size)
        return np.asarray(logits, np.float64)


class FeatureStream:
    """A network's outputs for videos added one at a time: each video is turned into the network's input (I3D: resized
    to 224 x 224; C3D: resized and cropped to 112 x 112) as it comes, and the inputs of one shape wait until a full
    batch of them is there, so a large set is never held in memory whole, whatever its frame sizes (videos of one
    length share one queue of at most a batch). ``finish()`` -> (N, classes) float64 in the order the videos were
    added. ``network`` is an ``I3DFeatures`` (FVD/KVD) or a ``jaxvc.eval.inception_score.C3DProbabilities``: it has
    ``batch_size``, ``num_classes``, ``check(videos, what)``, ``prepare(videos)`` and ``from_prepared(inputs,
    what)``."""

    def __init__(self, network, what: str = "videos"):
        self.network, self.what = network, what
        self.pending: dict[tuple, list[tuple[int, np.ndarray]]] = {}
        self.done: dict[int, np.ndarray] = {}
        self.count = 0

    @classmethod
    def of(cls, network, videos, what: str = "videos") -> np.ndarray:
        """The network's outputs for a list of videos of any sizes: (N, classes) float64, in the list's order."""
        if not len(videos):
            raise ValueError(f"{what}: no videos")
        stream = cls(network, what)
        for video in videos:
            stream.add(video)
        return stream.finish()

    def add(self, video: np.ndarray) -> None:
        """One uint8 video (T, H, W, 3) the network takes (I3D: T >= 9; C3D: T = 16)."""
        video = np.asarray(video)
        self.network.check(video[None], self.what)
        inputs = self.network.prepare(video[None])[0]
        queue = self.pending.setdefault(inputs.shape, [])
        queue.append((self.count, inputs))
        self.count += 1
        if len(queue) >= self.network.batch_size:
            self._run(inputs.shape)

    def _run(self, shape) -> None:
        queue = self.pending.pop(shape, [])
        if queue:
            features = self.network.from_prepared(np.stack([inputs for _, inputs in queue]), self.what)
            self.done.update((index, row) for (index, _), row in zip(queue, features))

    def finish(self) -> np.ndarray:
        for shape in list(self.pending):
            self._run(shape)
        return np.stack([self.done[index] for index in range(self.count)]) if self.count else \
            np.zeros((0, self.network.num_classes))


# ---------------------------------------------------------------- distances


def _check_feature_sets(real, fake) -> tuple[np.ndarray, np.ndarray]:
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    for name, features in (("real", real), ("fake", fake)):
        if features.ndim != 2:
            raise ValueError(f"{name} features: expected (count, dim), got shape {features.shape}")
        if len(features) < 2:
            raise ValueError(f"{name} set: {len(features)} video(s); FVD/KVD need at least 2 per set (a covariance, "
                             "and the unbiased MMD's pairs)")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dimensions differ: real {real.shape}, fake {fake.shape}")
    return real, fake


def symmetric_matrix_square_root(matrix: np.ndarray, eps: float = SQRT_EPS) -> np.ndarray:
    """TF-GAN's ``_symmetric_matrix_square_root``: U diag(s') V^T from the SVD, s' = sqrt(s) unless s < eps (then s)."""
    u, s, vh = np.linalg.svd(matrix)
    return (u * np.where(s < eps, s, np.sqrt(s))) @ vh


def trace_sqrt_product(sigma: np.ndarray, sigma_other: np.ndarray) -> float:
    """Tr(sqrt(sigma sigma_other)) computed as Tr(sqrt(sqrt(sigma) sigma_other sqrt(sigma))) (TF-GAN)."""
    root = symmetric_matrix_square_root(sigma)
    return float(np.trace(symmetric_matrix_square_root(root @ sigma_other @ root)))


def frechet_distance(real_features, fake_features) -> float:
    """FVD of two feature sets (count, dim): |m_r - m_f|^2 + Tr(S_r + S_f) - 2 Tr(sqrt(S_r S_f)), unbiased S."""
    real, fake = _check_feature_sets(real_features, fake_features)
    sigma_real, sigma_fake = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)  # (dim, dim), divided by N - 1
    trace = np.trace(sigma_real + sigma_fake) - 2.0 * trace_sqrt_product(sigma_real, sigma_fake)
    return float(trace + np.sum((real.mean(0) - fake.mean(0)) ** 2))


def polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int = 3, gamma: float | None = None,
                      coef0: float = 1.0) -> np.ndarray:
    """sklearn's ``polynomial_kernel``: (gamma x.y + coef0)^degree, gamma defaulting to 1 / dim. (m, d), (n, d) ->
    (m, n)."""
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    return (gamma * (x @ y.T) + coef0) ** degree


def kernel_distance(real_features, fake_features, degree: int = 3, gamma: float | None = None,
                    coef0: float = 1.0) -> float:
    """KVD: the unbiased MMD^2 of two feature sets with the polynomial kernel (CustomCrafter's ``polynomial_mmd``;
    the defaults are sklearn's, which it uses). Can be slightly negative for sets from one distribution."""
    real, fake = _check_feature_sets(real_features, fake_features)
    m, n = len(real), len(fake)
    k_rr = polynomial_kernel(real, real, degree, gamma, coef0)
    k_ff = polynomial_kernel(fake, fake, degree, gamma, coef0)
    k_rf = polynomial_kernel(real, fake, degree, gamma, coef0)
    within_real = (k_rr.sum() - np.trace(k_rr)) / (m * (m - 1))
    within_fake = (k_ff.sum() - np.trace(k_ff)) / (n * (n - 1))
    return float(within_real + within_fake - 2.0 * k_rf.sum() / (m * n))


def score_features(real_features, fake_features) -> dict[str, float]:
    """``{"fvd": ..., "kvd": ...}`` from precomputed I3D logits (e.g. real-set features computed once)."""
    return {"fvd": frechet_distance(real_features, fake_features),
            "kvd": kernel_distance(real_features, fake_features)}


def score_sets(real_videos, fake_videos, i3d: I3DFeatures) -> dict[str, float]:
    """``{"fvd": ..., "kvd": ...}`` between uint8 video sets ((N, T, H, W, 3) arrays or lists of (T, H, W, 3)).

    The two sets may differ in size and in frame size; each needs at least 2 videos of at least 9 frames."""
    for name, videos in (("real videos", real_videos), ("fake videos", fake_videos)):
        count = len(videos)
        if count < 2:
            raise ValueError(f"{name}: {count} video(s); FVD/KVD need at least 2 per set")
        for video in (videos if isinstance(videos, (list, tuple)) else [videos[0]]):
            check_videos(np.asarray(video)[None], name)
    return score_features(i3d(real_videos, "real videos"), i3d(fake_videos, "fake videos"))


__all__ = ["FeatureStream", "I3DFeatures", "bilinear_matrix", "frechet_distance", "kernel_distance",
           "polynomial_kernel", "preprocess_videos", "score_features", "score_sets", "symmetric_matrix_square_root",
           "trace_sqrt_product"]

