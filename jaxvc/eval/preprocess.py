"""Frames -> the pixels an image tower expects, as transformers' PIL image processors make them.

CLIP (``CLIPImageProcessor``): resize the short side to ``size`` (bicubic, PIL), centre-crop ``crop_size``, scale
to [0, 1], normalise with OpenAI's mean/std. DINO (``ViTImageProcessor``, ``facebook/dino-vits16``): resize to
``size`` x ``size`` (bilinear), no crop, ImageNet mean/std. A ``preprocessor_config.json`` in the model folder
overrides these defaults, as transformers would read it. The resize runs in PIL on uint8 images on the host, so the
pixels equal the reference processor's (``tests/test_eval_metrics.py``); the towers then run jitted.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# PIL resampling codes as transformers' configs store them (PILImageResampling).
RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


@dataclass(frozen=True)
class ImagePreprocessor:
    """How one tower's processor turns an (H, W, 3) uint8 frame into (crop_h, crop_w, 3) float32 pixels."""
    resize_short_side: int | None  # resize keeping the aspect ratio so the short side is this...
    resize_to: tuple[int, int] | None  # ...or to exactly (height, width)
    crop_to: tuple[int, int] | None
    resample: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def default(cls, family: str, image_size: int) -> "ImagePreprocessor":
        if family == "clip":
            return cls(image_size, None, (image_size, image_size), Image.Resampling.BICUBIC, OPENAI_CLIP_MEAN,
                       OPENAI_CLIP_STD)
        return cls(None, (image_size, image_size), None, Image.Resampling.BILINEAR, IMAGENET_MEAN, IMAGENET_STD)

    @classmethod
    def for_model(cls, folder, family: str, image_size: int) -> "ImagePreprocessor":
        """The folder's ``preprocessor_config.json`` if there is one, else the family's default."""
        path = Path(folder) / "preprocessor_config.json"
        default = cls.default(family, image_size)
        if not path.is_file():
            return default
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error})") from error
        short_side, resize_to = default.resize_short_side, default.resize_to
        if config.get("do_resize", True):
            size = config.get("size", image_size)
            if isinstance(size, int):  # an int means the short side for CLIP and a square for ViT, as transformers
                short_side, resize_to = (size, None) if family == "clip" else (None, (size, size))
            elif "shortest_edge" in size:
                short_side, resize_to = int(size["shortest_edge"]), None
            elif "height" in size and "width" in size:
                short_side, resize_to = None, (int(size["height"]), int(size["width"]))
            else:
                raise ValueError(f"{path}: size {size} has neither 'shortest_edge' nor 'height' and 'width'")
        else:
            short_side, resize_to = None, None
        crop_to = None
        if config.get("do_center_crop", family == "clip"):
            crop = config.get("crop_size", image_size)
            crop_to = (crop, crop) if isinstance(crop, int) else (int(crop["height"]), int(crop["width"]))
        resample = int(config.get("resample", default.resample))
        if resample not in RESAMPLE_NAMES:
            raise ValueError(f"{path}: resample {resample} is not a PIL resampling filter {RESAMPLE_NAMES}")
        mean, std = (tuple(config.get(k, d)) for k, d in (("image_mean", default.mean), ("image_std", default.std)))
        if not config.get("do_normalize", True):
            mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        return cls(short_side, resize_to, crop_to, resample, mean, std)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        if self.crop_to is not None:
            return self.crop_to
        if self.resize_to is not None:
            return self.resize_to
        return self._short_side_size(height, width) if self.resize_short_side else (height, width)

    def _short_side_size(self, height: int, width: int) -> tuple[int, int]:
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(self.resize_short_side * long / short)  # truncation, as transformers and torchvision
        return (new_long, self.resize_short_side) if width <= height else (self.resize_short_side, new_long)

    def __call__(self, images) -> np.ndarray:
        """(N, H, W, 3) uint8, or a list of (H, W, 3) uint8 images of any sizes -> (N, h, w, 3) float32 pixels."""
        out = []
        for image in images:
            image = np.asarray(image)
            if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
                raise ValueError(f"images must be (H, W, 3) uint8, got {image.dtype} of shape {image.shape}")
            out.append(self._one(image))
        if not out:
            raise ValueError("no images to preprocess")
        return np.stack(out)

    def _one(self, frame: np.ndarray) -> np.ndarray:
        height, width = frame.shape[:2]
        size = self.resize_to or (self._short_side_size(height, width) if self.resize_short_side else None)
        if size is not None and size != (height, width):
            frame = np.asarray(Image.fromarray(frame).resize((size[1], size[0]), resample=self.resample))
        if self.crop_to is not None:
            frame = _center_crop(frame, self.crop_to)
        pixels = frame.astype(np.float32) * np.float32(1 / 255)
        return ((pixels - np.float32(self.mean)) / np.float32(self.std)).astype(np.float32)


def _center_crop(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """transformers' centre crop: offsets (H - h) // 2 and (W - w) // 2."""
    height, width = frame.shape[:2]
    if height < size[0] or width < size[1]:
        raise ValueError(f"a {height}x{width} image cannot be centre-cropped to {size[0]}x{size[1]}: the "
                         "preprocessor's resize must reach the crop size")
    top, left = (height - size[0]) // 2, (width - size[1]) // 2
    return frame[top:top + size[0], left:left + size[1]]
