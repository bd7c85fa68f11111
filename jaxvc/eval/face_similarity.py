"""Face similarity (specs/METHODS.md, section 0; VideoMaker's FaceSim): the cosine similarity of ArcFace embeddings of
the reference face and of the face in each generated frame, with insightface's released ONNX models run in JAX
(``jaxvc.models.onnx_graph``): the SCRFD detector (``det_10g.onnx`` of ``buffalo_l``, or antelopev2's
``scrfd_10g_bnkps.onnx``) and an ArcFace recognizer (``w600k_r50.onnx``, or antelopev2's ``glintr100.onnx``).

VideoMaker cites ArcFace and publishes no code; jaxvc follows what ``insightface.app.FaceAnalysis`` does (the
pipeline the face-customization papers' evaluators use), at insightface 0.7's single detection size:

1. detect (SCRFD, ``--face-det-size`` 640 x 640): the image letterboxed into the input, (x - 127.5) / 128; per
   stride, anchors scoring >= 0.5 decode into boxes and 5 landmarks; NMS at IoU 0.4; the main face is insightface's
   ``max_num=1`` choice (largest box, preferring central ones);
2. align: the landmarks' similarity transform onto ArcFace's 112 x 112 template, OpenCV's affine warp
   (``face_geometry``, bit-exact; OpenCV 4's arithmetic by default, as the published evaluations ran, or OpenCV 5's);
3. embed: (x - 127.5) / 127.5 (mean 0, std 1 for the old mxnet exports, which normalise inside, told apart by
   insightface's test of the first node names), the recognizer's 512-d output;
4. score: cos(reference, frame) averaged over the frames that have a face and over the reference images. Frames
   without a detected face are skipped and counted; a video where no frame (or no reference) has a face gets no
   score and is reported as skipped.

Frames are RGB (jaxvc's readers); insightface takes OpenCV's BGR and swaps to RGB itself, so the networks see the
same input.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from jaxvc.eval.face_geometry import (alignment_matrix, anchor_centers, distance_to_box, distance_to_landmarks,
                                      letterbox, main_faces, nms, warp_affine)

DETECTION_SIZE = (640, 640)  # (width, height): FaceAnalysis.prepare(det_size=(640, 640))
DETECTION_THRESHOLD = 0.5
NMS_THRESHOLD = 0.4
# SCRFD's output count -> (strides, anchors per location, has landmarks): insightface's SCRFD._init_vars
SCRFD_LAYOUTS = {6: ((8, 16, 32), 2, False), 9: ((8, 16, 32), 2, True),
                 10: ((8, 16, 32, 64, 128), 1, False), 15: ((8, 16, 32, 64, 128), 1, True)}


def _jitted(graph):
    import jax

    return jax.jit(lambda params, *inputs: graph(params, *inputs))


@dataclass
class FaceDetector:
    """SCRFD: ``detect(image (H, W, 3) uint8 RGB) -> (boxes (N, 5) x1 y1 x2 y2 score, landmarks (N, 5, 2))`` in the
    image's pixels, best first after NMS."""
    graph: object
    input_size: tuple[int, int] = DETECTION_SIZE
    threshold: float = DETECTION_THRESHOLD
    nms_threshold: float = NMS_THRESHOLD
    _run: object = field(init=False, repr=False)

    def __post_init__(self):
        import jax

        layout = SCRFD_LAYOUTS.get(len(self.graph.output_names))
        if layout is None or not layout[2]:
            raise ValueError(f"{self.graph.source}: {len(self.graph.output_names)} outputs; a SCRFD detector with "
                             "landmarks has 9 (strides 8, 16, 32) or 15 (five strides), e.g. buffalo_l's "
                             "det_10g.onnx: face alignment needs the landmarks")
        self.strides, self.anchors, _ = layout
        self.params = jax.device_put(self.graph.params)
        self._run = _jitted(self.graph)

    @classmethod
    def from_file(cls, path: str | os.PathLike, **options) -> "FaceDetector":
        from jaxvc.models.onnx_graph import OnnxGraph

        return cls(OnnxGraph.from_file(path), **options)

    def raw_outputs(self, canvas: np.ndarray) -> list[np.ndarray]:
        """The network's outputs for a letterboxed uint8 canvas (height, width, 3)."""
        blob = (canvas.astype(np.float32) - np.float32(127.5)) * np.float32(1 / 128.0)
        outputs = self._run(self.params, blob.transpose(2, 0, 1)[None])
        return [np.asarray(out) for out in outputs]

    def decode(self, outputs: list[np.ndarray], input_height: int, input_width: int):
        """insightface's ``SCRFD.forward`` after the network: per stride, the anchors scoring >= threshold."""
        count = len(self.strides)
        scores_list, boxes_list, landmarks_list = [], [], []
        for index, stride in enumerate(self.strides):
            scores, box_pred, landmark_pred = (outputs[index + k * count] for k in range(3))
            if scores.ndim == 3:  # a batched export: (1, N, C)
                scores, box_pred, landmark_pred = scores[0], box_pred[0], landmark_pred[0]
            centers = anchor_centers(input_height // stride, input_width // stride, stride, self.anchors)
            positive = np.where(scores >= self.threshold)[0]
            scores_list.append(scores[positive])
            boxes_list.append(distance_to_box(centers, box_pred * stride)[positive])
            landmarks = distance_to_landmarks(centers, landmark_pred * stride)
            landmarks_list.append(landmarks.reshape((landmarks.shape[0], -1, 2))[positive])
        return scores_list, boxes_list, landmarks_list

    def detect(self, image: np.ndarray, max_faces: int = 0):
        canvas, scale = letterbox(image, self.input_size)
        scores, boxes, landmarks = self.decode(self.raw_outputs(canvas), canvas.shape[0], canvas.shape[1])
        if sum(s.size for s in scores) == 0:
            return np.empty((0, 5), np.float32), np.empty((0, 5, 2), np.float32)
        scores = np.vstack(scores)
        order = np.argsort(-scores.ravel(), kind="stable")
        detections = np.hstack((np.vstack(boxes) / scale, scores)).astype(np.float32, copy=False)[order]
        landmarks = (np.vstack(landmarks) / scale)[order]
        keep = nms(detections, self.nms_threshold)
        return main_faces(detections[keep], landmarks[keep], image.shape, max_faces)


@dataclass
class FaceEmbedder:
    """ArcFace: ``embed(aligned crops (N, S, S, 3) uint8 RGB) -> (N, D)`` raw embeddings (cosine compares them)."""
    graph: object
    batch_size: int = 16
    warp: str = "opencv4"  # face_geometry.warp_affine's kernel: OpenCV 4's fixed point or OpenCV 5's float
    _run: object = field(init=False, repr=False)

    def __post_init__(self):
        import jax

        shape = self.graph.input_shapes[0]
        self.crop_size = int(shape[2]) if shape[2] else 112
        if len(self.graph.output_names) != 1:
            raise ValueError(f"{self.graph.source}: {len(self.graph.output_names)} outputs; an ArcFace recognizer "
                             "(w600k_r50.onnx, glintr100.onnx) has one, the embedding")
        # insightface's ArcFaceONNX: mxnet exports subtract and scale inside (Sub/Mul among the first 8 node names)
        names = [node.name for node in self.graph.nodes[:8]]
        inside = any(n.startswith(("Sub", "_minus")) for n in names) and any(n.startswith(("Mul", "_mul"))
                                                                            for n in names)
        self.mean, self.std = (0.0, 1.0) if inside else (127.5, 127.5)
        self.params = jax.device_put(self.graph.params)
        self._run = _jitted(self.graph)

    @classmethod
    def from_file(cls, path: str | os.PathLike, batch_size: int = 16, warp: str = "opencv4") -> "FaceEmbedder":
        from jaxvc.models.onnx_graph import OnnxGraph

        return cls(OnnxGraph.from_file(path), batch_size, warp)

    def embed(self, crops: np.ndarray) -> np.ndarray:
        from jaxvc.eval.feature_metrics import in_fixed_batches

        blob = (np.asarray(crops, np.float32) - np.float32(self.mean)) * np.float32(1.0 / self.std)
        return in_fixed_batches(lambda x: self._run(self.params, x)[0], (blob.transpose(0, 3, 1, 2),),
                                self.batch_size)

    def align(self, image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        return warp_affine(image, alignment_matrix(landmarks, self.crop_size), self.crop_size, self.warp)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, D) x (M, D) -> (N, M) cosine similarities (insightface's ``compute_sim``), in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a @ b.T) / (np.linalg.norm(a, axis=1)[:, None] * np.linalg.norm(b, axis=1)[None, :])


class FaceSimilarity:
    """Scores videos: ``(frames (F, H, W, 3) uint8, references [(H, W, 3) uint8]) -> {"face_similarity": ...}``."""

    def __init__(self, detector: FaceDetector, embedder: FaceEmbedder):
        self.detector, self.embedder = detector, embedder

    def face_crops(self, images) -> tuple[np.ndarray, list[int]]:
        """The aligned main face of each image that has one: (crops (K, S, S, 3), their image indices)."""
        crops, found = [], []
        for index, image in enumerate(images):
            detections, landmarks = self.detector.detect(np.asarray(image), max_faces=1)
            if len(detections):
                crops.append(self.embedder.align(np.asarray(image), landmarks[0]))
                found.append(index)
        size = self.embedder.crop_size
        return (np.stack(crops) if crops else np.empty((0, size, size, 3), np.uint8)), found

    def score(self, frames: np.ndarray, references) -> dict:
        if not len(references):
            raise ValueError("no reference image in the record (a face to compare with)")
        reference_crops, with_face = self.face_crops(references)
        if not with_face:
            raise ValueError(f"no face detected in any of the {len(references)} reference image(s)")
        frame_crops, frames_with_face = self.face_crops(frames)
        if not frames_with_face:
            raise ValueError(f"no face detected in any of the {len(frames)} frames (face similarity undefined)")
        similarity = cosine(self.embedder.embed(frame_crops), self.embedder.embed(reference_crops))
        return {"face_similarity": float(similarity.mean()), "face_frames": len(frames_with_face),
                "frames_without_face": int(len(frames) - len(frames_with_face)),
                "references_with_face": len(with_face)}
