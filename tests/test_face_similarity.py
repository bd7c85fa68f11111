"""Face similarity (jaxvc/eval/face_similarity.py, face_geometry.py) against insightface 2.1's own pipeline code
(SCRFD decoding and NMS, ``face_align.norm_crop``, ``ArcFaceONNX``) run with onnxruntime, OpenCV and scikit-image.

The geometry is checked piece by piece (the affine warp bit for bit against ``cv2.warpAffine``, the similarity
transform against scikit-image, the letterbox resize within OpenCV's fixed-point rounding), then the whole
detect-align-embed pipeline on small random SCRFD-like and ArcFace-like networks exported to ONNX from torch.
"""
import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")
pytest.importorskip("skimage")
pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")


def random_landmarks(rng, center, size):
    """5 face-like landmarks (eyes, nose, mouth corners) around ``center``, jittered and rotated."""
    from jaxvc.eval.face_geometry import ARCFACE_TEMPLATE

    angle = rng.uniform(-0.5, 0.5)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    points = (ARCFACE_TEMPLATE - 56.0) * (size / 112.0) @ rotation.T + center
    return (points + rng.normal(0, size / 40, points.shape)).astype(np.float32)


def test_alignment_matches_insightface_norm_crop():
    from jaxvc.bench.reference_code import insightface_modules
    from jaxvc.eval.face_geometry import alignment_matrix, warp_affine

    _, _, face_align = insightface_modules()
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (240, 200, 3), dtype=np.uint8)
    for trial in range(12):  # faces inside, at the border and partly outside the image; 112 and 128 crops
        size = 112 if trial % 3 else 128
        landmarks = random_landmarks(rng, rng.uniform(-20, 220, 2), rng.uniform(30, 160))
        matrix = alignment_matrix(landmarks, size)
        np.testing.assert_allclose(matrix, face_align.estimate_norm(landmarks, size), rtol=0, atol=1e-9)
        ours, want = warp_affine(image, matrix, size), face_align.norm_crop(image, landmarks, size)
        assert ours.shape == want.shape == (size, size, 3)
        np.testing.assert_array_equal(ours, want)  # OpenCV's fixed-point warp, bit for bit


def test_letterbox_resize_matches_opencv():
    from scipy.ndimage import gaussian_filter

    from jaxvc.eval.face_geometry import letterbox, resize_linear

    rng = np.random.default_rng(1)
    image = gaussian_filter(rng.uniform(0, 255, (360, 480, 3)), (2, 2, 0)).round().astype(np.uint8)
    noise = rng.integers(0, 256, (123, 77, 3), dtype=np.uint8)
    for source, (width, height) in ((image, (640, 480)), (image, (333, 250)), (image, (240, 180)),
                                    (image, (481, 361)), (image, (640, 427)), (noise, (640, 640)),
                                    (noise, (50, 80)), (noise, (77, 123))):
        # OpenCV's fixed-point bilinear (and its INTER_AREA switch for the exact 2x reduction 480x360 -> 240x180)
        np.testing.assert_array_equal(resize_linear(source, width, height), cv2.resize(source, (width, height)))
    canvas, scale = letterbox(image, (640, 640))
    assert canvas.shape == (640, 640, 3) and scale == 640 / 480
    assert not canvas[480:].any()  # the image fills the top 480 rows; the rest is black
    canvas, scale = letterbox(image[:, :240], (640, 640))  # portrait: fills the height
    assert scale == 640 / 360 and not canvas[:, 426:].any() and canvas[:, :426].any()


def test_decoding_and_nms_match_scrfd():
    from jaxvc.bench.reference_code import insightface_modules
    from jaxvc.eval.face_geometry import (anchor_centers, distance_to_box, distance_to_landmarks, main_faces,
                                          nms)

    scrfd, _, _ = insightface_modules()
    rng = np.random.default_rng(2)
    centers = anchor_centers(6, 7, 16, 2)
    assert centers.shape == (84, 2) and tuple(centers[2]) == (16.0, 0.0) and tuple(centers[14]) == (0.0, 16.0)
    distances = rng.uniform(0, 40, (84, 4)).astype(np.float32)
    np.testing.assert_array_equal(distance_to_box(centers, distances), scrfd.distance2bbox(centers, distances))
    offsets = rng.normal(0, 20, (84, 10)).astype(np.float32)
    np.testing.assert_array_equal(distance_to_landmarks(centers, offsets), scrfd.distance2kps(centers, offsets))

    boxes = np.concatenate([rng.uniform(0, 200, (60, 2)), rng.uniform(10, 80, (60, 2))], 1)
    boxes[:, 2:] += boxes[:, :2]
    detections = np.hstack([boxes, rng.uniform(0.5, 1, (60, 1))]).astype(np.float32)
    detector = scrfd.SCRFD.__new__(scrfd.SCRFD)  # only its nms(), which reads nms_thresh
    detector.nms_thresh = 0.4
    keep = nms(detections, 0.4)
    assert keep == [int(i) for i in detector.nms(detections)] and 5 < len(keep) < 60
    landmarks = rng.uniform(0, 300, (60, 5, 2))
    for metric in ("default", "max"):
        chosen, chosen_landmarks = main_faces(detections[keep], landmarks[keep], (300, 280), 2, metric)
        kept = detections[keep]
        area = (kept[:, 2] - kept[:, 0]) * (kept[:, 3] - kept[:, 1])
        if metric == "max":
            np.testing.assert_array_equal(chosen[:, :4], kept[np.argsort(area)[::-1][:2], :4])
        assert chosen.shape == (2, 5) and chosen_landmarks.shape == (2, 5, 2)
