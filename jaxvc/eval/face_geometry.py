"""The image geometry of insightface's face pipeline, reproduced without OpenCV or scikit-image (numpy only), for
``face_similarity.py``: letterboxing a frame into the detector's input, decoding SCRFD's anchor-free outputs into
boxes and 5 landmarks, NMS, choosing the main face, and the ArcFace alignment (a similarity transform of the
landmarks onto ArcFace's 112 x 112 template, then an affine warp).

What is exact and what is not (``tests/test_face_similarity.py`` measures both):

- ``warp_affine`` is OpenCV's ``warpAffine(INTER_LINEAR, BORDER_CONSTANT 0)`` on uint8 images bit for bit, in
  OpenCV 4's arithmetic (source positions in fixed point, 1/1024 then 1/32 of a pixel, the 32 x 32 table of integer
  bilinear weights summing to 2^15 with its rounding correction, the rounding shift of the weighted sum); with
  ``kernel="opencv5"``, OpenCV 5's float arithmetic, equal but for about 5 values in a million (one grey level).
- ``similarity_transform`` is scikit-image's ``_umeyama`` (``SimilarityTransform.estimate``), the same numpy
  operations in the same order.
- ``resize_linear`` is OpenCV's ``resize(INTER_LINEAR)`` on uint8 images bit for bit (11-bit weights, the rounding
  of its SIMD vertical pass), the letterboxing of a frame into the detector's input.
- decoding, NMS and the main-face choice are insightface's ``SCRFD`` functions, transcribed.
"""
from __future__ import annotations

import numpy as np

# ArcFace's landmark template for 112 x 112 crops (insightface ``face_align.arcface_dst``): eyes, nose tip, mouth
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655],
                             [70.7299, 92.2041]], dtype=np.float32)


# ---------------------------------------------------------------- alignment


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """(3, 3) least-squares similarity (rotation, uniform scale, translation) taking ``src`` (N, 2) points onto
    ``dst`` (Umeyama 1991), as scikit-image's ``_umeyama(src, dst, estimate_scale=True)``; NaN when degenerate."""
    src, dst = np.asarray(src), np.asarray(dst)
    count, dim = src.shape
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_demean, dst_demean = src - src_mean, dst - dst_mean
    a = dst_demean.T @ src_demean / count
    d = np.ones((dim,), dtype=np.float64)
    if np.linalg.det(a) < 0:
        d[dim - 1] = -1
    t = np.eye(dim + 1, dtype=np.float64)
    u, s, v = np.linalg.svd(a)
    rank = np.linalg.matrix_rank(a)
    if rank == 0:
        return np.nan * t
    if rank == dim - 1 and np.linalg.det(u) * np.linalg.det(v) <= 0:
        flipped = d.copy()
        flipped[dim - 1] = -1
        t[:dim, :dim] = u @ np.diag(flipped) @ v
    elif rank == dim - 1:
        t[:dim, :dim] = u @ v
    else:
        t[:dim, :dim] = u @ np.diag(d) @ v
    scale = 1.0 / src_demean.var(axis=0).sum() * (s @ d)
    t[:dim, dim] = dst_mean - scale * (t[:dim, :dim] @ src_mean.T)
    t[:dim, :dim] *= scale
    return t


def alignment_matrix(landmarks: np.ndarray, size: int = 112) -> np.ndarray:
    """(2, 3) affine map of a face's 5 landmarks (5, 2) onto ArcFace's template at ``size`` (a multiple of 112 or
    128): insightface's ``face_align.estimate_norm``."""
    landmarks = np.asarray(landmarks)
    if landmarks.shape != (5, 2):
        raise ValueError(f"face alignment needs 5 (x, y) landmarks, got shape {landmarks.shape}")
    if size % 112 == 0:
        ratio, shift = size / 112.0, 0.0
    elif size % 128 == 0:
        ratio = size / 128.0
        shift = 8.0 * ratio
    else:
        raise ValueError(f"ArcFace crops are a multiple of 112 or 128 pixels, got {size}")
    template = ARCFACE_TEMPLATE * ratio
    template[:, 0] += shift
    return similarity_transform(landmarks, template)[0:2, :]


def _inverse_affine(matrix: np.ndarray) -> np.ndarray:
    """OpenCV's ``invertAffineTransform`` (float64)."""
    det = matrix[0, 0] * matrix[1, 1] - matrix[0, 1] * matrix[1, 0]
    det = 1.0 / det if det != 0 else 0.0
    a11, a22, a12, a21 = matrix[1, 1] * det, matrix[0, 0] * det, -matrix[0, 1] * det, -matrix[1, 0] * det
    return np.array([[a11, a12, -a11 * matrix[0, 2] - a12 * matrix[1, 2]],
                     [a21, a22, -a21 * matrix[0, 2] - a22 * matrix[1, 2]]])


def _bilinear_weight_table() -> np.ndarray:
    """(32, 32, 2, 2) int64: OpenCV's ``initInterTab2D(INTER_LINEAR, fixpt=true)``. Entry [fy, fx, dy, dx] is the
    weight (of 2^15) of neighbour (dy, dx) at the fractional position (fy / 32, fx / 32): float32 products rounded,
    and the rounding error moved onto the largest (sum too small) or smallest (too large) weight."""
    steps = np.arange(32, dtype=np.float32) / np.float32(32)
    one_d = np.stack([np.float32(1) - steps, steps], axis=1)  # (32, 2)
    table = np.zeros((32, 32, 2, 2), np.int64)
    for fy in range(32):
        for fx in range(32):
            weights = np.rint(np.outer(one_d[fy], one_d[fx]).astype(np.float32) * np.float32(32768)).astype(np.int64)
            flat = weights.ravel()
            diff = int(flat.sum()) - 32768
            if diff:
                low = high = 0
                for k in range(4):  # OpenCV's scan: the first strict minimum / maximum
                    if flat[k] < flat[low]:
                        low = k
                    elif flat[k] > flat[high]:
                        high = k
                flat[high if diff < 0 else low] -= diff
            table[fy, fx] = flat.reshape(2, 2)
    return table


_WEIGHT_TABLE = None


WARP_KERNELS = ("opencv4", "opencv5")


def warp_affine(image: np.ndarray, matrix: np.ndarray, size: int, kernel: str = "opencv4") -> np.ndarray:
    """OpenCV's ``warpAffine(image, matrix, (size, size), INTER_LINEAR, BORDER_CONSTANT, 0)`` for a uint8
    (H, W, C) image: output pixel (x, y) samples the source at ``matrix^-1 (x, y, 1)``. ``kernel``: "opencv4"
    (OpenCV <= 4.x, what the published evaluations ran: positions in fixed point, 1/32 px, integer weights; bit for
    bit) or "opencv5" (OpenCV 5 computes in float32; this reproduces OpenCV 5.1's output but for about 5 values in a
    million, off by one grey level). The two differ by up to a few grey levels at about half of the pixels."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(f"warp_affine takes uint8 (H, W, C) images, got {image.dtype} {image.shape}")
    if kernel not in WARP_KERNELS:
        raise ValueError(f"warp kernel '{kernel}': expected one of {WARP_KERNELS}")
    inverse = _inverse_affine(np.asarray(matrix, np.float64))
    if kernel == "opencv4":
        x0, y0, weights = _fixed_point_taps(inverse, size)
        corners = _corners(image, x0, y0, np.int64)
        total = sum(corners[dy, dx] * weights[..., dy, dx, None] for dy in (0, 1) for dx in (0, 1))
        return np.clip((total + (1 << 14)) >> 15, 0, 255).astype(np.uint8)
    # OpenCV 5: float32 positions, then two fused lerps (horizontal, vertical), each rounded once to float32; the
    # products are exact in float64, so float64 arithmetic rounded to float32 is the fused multiply-add
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    x = (inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2]).astype(np.float32)
    y = (inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2]).astype(np.float32)
    x0, y0 = np.floor(x), np.floor(y)
    fx = (x - x0).astype(np.float32)[..., None].astype(np.float64)
    fy = (y - y0).astype(np.float32)[..., None].astype(np.float64)
    corners = _corners(image, x0.astype(np.int64), y0.astype(np.int64), np.float64)
    top = (fx * (corners[0, 1] - corners[0, 0]) + corners[0, 0]).astype(np.float32)
    bottom = (fx * (corners[1, 1] - corners[1, 0]) + corners[1, 0]).astype(np.float32)
    out = (fy * (bottom - top).astype(np.float64) + top).astype(np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _corners(image: np.ndarray, x0: np.ndarray, y0: np.ndarray, dtype) -> dict:
    """The 2 x 2 source pixels of each output pixel, (dy, dx) -> (size, size, C); outside the image: 0."""
    height, width = image.shape[:2]
    corners = {}
    for dy in (0, 1):
        for dx in (0, 1):
            cx, cy = x0 + dx, y0 + dy
            inside = (cx >= 0) & (cx < width) & (cy >= 0) & (cy < height)
            values = image[np.clip(cy, 0, height - 1), np.clip(cx, 0, width - 1)].astype(dtype)
            corners[dy, dx] = np.where(inside[..., None], values, 0)
    return corners


def _fixed_point_taps(inverse: np.ndarray, size: int):
    """OpenCV 4's ``WarpAffineInvoker``: the top-left source pixel of each output pixel and its 2 x 2 integer
    weights (of 2^15), positions rounded to 1/1024 px per row and column term, then shifted to 1/32 px."""
    global _WEIGHT_TABLE
    if _WEIGHT_TABLE is None:
        _WEIGHT_TABLE = _bilinear_weight_table()
    scale, steps = 1024, np.arange(size)  # AB_BITS = 10
    x_step = np.rint(inverse[0, 0] * steps * scale).astype(np.int64)  # per output column
    y_step = np.rint(inverse[1, 0] * steps * scale).astype(np.int64)
    x_row = np.rint((inverse[0, 1] * steps + inverse[0, 2]) * scale).astype(np.int64) + 16  # per row, + 1/64 px
    y_row = np.rint((inverse[1, 1] * steps + inverse[1, 2]) * scale).astype(np.int64) + 16
    x = (x_row[:, None] + x_step[None, :]) >> 5  # (size, size) in 1/32 px
    y = (y_row[:, None] + y_step[None, :]) >> 5
    return x >> 5, y >> 5, _WEIGHT_TABLE[y & 31, x & 31]


def _resize_taps(in_size: int, out_size: int, clamp: bool) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV's INTER_LINEAR taps along one axis: (first source index (out,), 11-bit integer weights (out, 2)).
    Columns clamp the position at the borders (``clamp``: weight 1 on the edge pixel); rows do not (the row index
    is clamped when read), which changes the rounding in the top and bottom rows."""
    scale = 1.0 / (out_size / in_size)
    position = ((np.arange(out_size) + 0.5) * scale - 0.5).astype(np.float32)
    first = np.floor(position).astype(np.int64)
    fraction = (position - first.astype(np.float32)).astype(np.float32)
    if clamp:
        low, high = first < 0, first >= in_size - 1
        fraction[low | high] = 0
        first = np.where(low, 0, np.where(high, in_size - 1, first))
    weights = np.stack([(np.float32(1) - fraction) * np.float32(2048), fraction * np.float32(2048)], axis=1)
    return first, np.rint(weights).astype(np.int64)


def resize_linear(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """OpenCV's ``resize(image, (width, height))`` (INTER_LINEAR) of a uint8 (H, W, C) image, bit for bit: 11-bit
    fixed-point weights, a horizontal pass in integers, then the vertical pass as OpenCV's SIMD kernel rounds it
    (each product of a weight and the row value shifted right by 4 is itself shifted right by 16, then (sum + 2) >> 2).
    An exact 2x reduction is OpenCV's INTER_AREA (it switches there): the rounded mean of each 2 x 2 block."""
    in_height, in_width = image.shape[:2]
    pixels = np.asarray(image).astype(np.int64)
    if (in_width, in_height) == (2 * width, 2 * height):
        blocks = pixels.reshape(height, 2, width, 2, -1).sum(axis=(1, 3))
        return ((blocks + 2) >> 2).astype(np.uint8)
    columns, column_weights = _resize_taps(in_width, width, clamp=True)
    rows, row_weights = _resize_taps(in_height, height, clamp=False)
    horizontal = (pixels[:, columns] * column_weights[None, :, 0, None]
                  + pixels[:, np.minimum(columns + 1, in_width - 1)] * column_weights[None, :, 1, None])  # (H, w, C)
    top = horizontal[np.clip(rows, 0, in_height - 1)] >> 4
    bottom = horizontal[np.clip(rows + 1, 0, in_height - 1)] >> 4
    out = (((row_weights[:, 0, None, None] * top) >> 16) + ((row_weights[:, 1, None, None] * bottom) >> 16) + 2) >> 2
    return np.clip(out, 0, 255).astype(np.uint8)


def letterbox(image: np.ndarray, input_size: tuple[int, int]) -> tuple[np.ndarray, float]:
    """SCRFD's ``_detect_candidates`` input: the image resized to fit ``input_size`` (width, height) keeping its
    aspect ratio, in the top-left corner of a black canvas. Returns (canvas (height, width, C) uint8, scale)."""
    image_ratio = float(image.shape[0]) / image.shape[1]
    model_ratio = float(input_size[1]) / input_size[0]
    if image_ratio > model_ratio:
        new_height = input_size[1]
        new_width = int(new_height / image_ratio)
    else:
        new_width = input_size[0]
        new_height = int(new_width * image_ratio)
    scale = float(new_height) / image.shape[0]
    resized = image if (new_height, new_width) == image.shape[:2] else resize_linear(image, new_width, new_height)
    canvas = np.zeros((input_size[1], input_size[0], image.shape[2]), np.uint8)
    canvas[:new_height, :new_width] = resized
    return canvas, scale


# ---------------------------------------------------------------- SCRFD decoding


def anchor_centers(height: int, width: int, stride: int, anchors: int) -> np.ndarray:
    """(height * width * anchors, 2) float32 (x, y) pixel positions of a stride's anchors, row-major, each location
    repeated ``anchors`` times."""
    centers = np.stack(np.mgrid[:height, :width][::-1], axis=-1).astype(np.float32)
    centers = (centers * stride).reshape((-1, 2))
    return np.stack([centers] * anchors, axis=1).reshape((-1, 2)) if anchors > 1 else centers


def distance_to_box(points: np.ndarray, distance: np.ndarray) -> np.ndarray:
    """(N, 2) anchors and (N, 4) distances (left, top, right, bottom) -> (N, 4) boxes (x1, y1, x2, y2)."""
    return np.stack([points[:, 0] - distance[:, 0], points[:, 1] - distance[:, 1],
                     points[:, 0] + distance[:, 2], points[:, 1] + distance[:, 3]], axis=-1)


def distance_to_landmarks(points: np.ndarray, distance: np.ndarray) -> np.ndarray:
    """(N, 2) anchors and (N, 2K) offsets -> (N, 2K) landmark coordinates."""
    coords = [points[:, i % 2] + distance[:, i] for i in range(distance.shape[1])]
    return np.stack(coords, axis=-1)


def nms(detections: np.ndarray, threshold: float) -> list[int]:
    """insightface's greedy NMS of (N, 5) (x1, y1, x2, y2, score), with its +1 pixel box areas: indices kept, best
    first."""
    x1, y1, x2, y2, scores = (detections[:, i] for i in range(5))
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size > 0:
        best, rest = order[0], order[1:]
        keep.append(int(best))
        w = np.maximum(0.0, np.minimum(x2[best], x2[rest]) - np.maximum(x1[best], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[best], y2[rest]) - np.maximum(y1[best], y1[rest]) + 1)
        inter = w * h
        overlap = inter / (areas[best] + areas[rest] - inter)
        order = rest[np.where(overlap <= threshold)[0]]
    return keep


def main_faces(detections: np.ndarray, landmarks: np.ndarray, image_shape, count: int = 1,
               metric: str = "default") -> tuple[np.ndarray, np.ndarray]:
    """SCRFD.detect's ``max_num``: the ``count`` faces with the largest box area ("max") or area minus twice the
    squared distance of the box centre from the image centre ("default": insightface's preference for central
    faces)."""
    if count <= 0 or len(detections) <= count:
        return detections, landmarks
    area = (detections[:, 2] - detections[:, 0]) * (detections[:, 3] - detections[:, 1])
    center = image_shape[0] // 2, image_shape[1] // 2
    offsets = np.vstack([(detections[:, 0] + detections[:, 2]) / 2 - center[1],
                         (detections[:, 1] + detections[:, 3]) / 2 - center[0]])
    values = area if metric == "max" else area - np.sum(np.power(offsets, 2.0), 0) * 2.0
    chosen = np.argsort(values)[::-1][:count]
    return detections[chosen], landmarks[chosen]
