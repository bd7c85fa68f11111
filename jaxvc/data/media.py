"""Reading media files: videos with PyAV (MP4, MOV, MKV, WebM, AVI, GIF, ...), images and masks with Pillow.

Every reader raises `MediaError` naming the file and what went wrong, so `jaxvc pack` can report and skip it.
Frames come back as uint8 RGB arrays (N, H, W, 3); masks as bool arrays (N, H, W) (non-zero = subject).
"""
from __future__ import annotations

import io
import os

import numpy as np

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".gif")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


class MediaError(ValueError):
    """A media file could not be read (missing, truncated, not a video/image, no frames)."""


def is_video(path: str) -> bool:
    return path.lower().endswith(VIDEO_EXTENSIONS)


def is_image(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def _resize_short_side(image, short_side: int | None):
    """Pillow image scaled so its shorter side is at most `short_side` (never upscaled)."""
    from PIL import Image

    if short_side is None or min(image.size) <= short_side:
        return image
    w, h = image.size
    f = short_side / min(w, h)
    return image.resize((max(1, round(w * f)), max(1, round(h * f))), Image.BILINEAR)


def read_video(path: str, max_frames: int | None = None, stride: int = 1,
               short_side: int | None = None) -> tuple[np.ndarray, float]:
    """Decode every `stride`-th frame (at most `max_frames`) of a video file. Returns (frames (N, H, W, 3), fps of the
    kept frames)."""
    import av  # PyAV; imported here so importing jaxvc.data does not require it

    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    if not os.path.isfile(path):
        raise MediaError(f"{path}: no such file")
    frames = []
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise MediaError(f"{path}: no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or 0
            fps = float(rate) if rate else 0.0
            for i, frame in enumerate(container.decode(stream)):
                if i % stride:
                    continue
                image = _resize_short_side(frame.to_image(), short_side)
                frames.append(np.asarray(image.convert("RGB")))
                if max_frames is not None and len(frames) >= max_frames:
                    break
    except MediaError:
        raise
    except Exception as e:  # PyAV raises many error types (InvalidDataError, EOFError, ...)
        if not frames:
            raise MediaError(f"{path}: cannot decode video ({type(e).__name__}: {e})") from e
        # A truncated tail: keep the frames decoded so far (common for partly downloaded clips).
    if not frames:
        raise MediaError(f"{path}: video has no decodable frames")
    shapes = {f.shape for f in frames}
    if len(shapes) != 1:
        raise MediaError(f"{path}: frame size changes within the video ({sorted(shapes)})")
    return np.stack(frames), fps / stride


def read_image(path: str, short_side: int | None = None, background: tuple[int, int, int] | None = None) -> np.ndarray:
    """(H, W, 3) uint8 RGB; with ``background``, transparent pixels become that colour (a subject cut out on
    white, as the papers' references), else the alpha channel is dropped."""
    from PIL import Image

    if not os.path.isfile(path):
        raise MediaError(f"{path}: no such file")
    try:
        with Image.open(path) as image:
            image.load()
            return np.asarray(_resize_short_side(rgb_image(image, background), short_side))
    except Exception as e:
        raise MediaError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from e


# what a reference's transparent pixels become wherever jaxvc reads one (generation, packing, evaluation): the
# papers' references are subjects cut out on white
REFERENCE_BACKGROUND = (255, 255, 255)

# PIL modes of more than 8 bits per sample: convert("RGB") clips them to 255 (a 16-bit grey PNG turns white)
_WIDE_MODES = {"I;16": 16, "I;16L": 16, "I;16B": 16, "I;16N": 16, "I": 16}


def rgb_image(image, background: tuple[int, int, int] | None = None):
    """A PIL image as 8-bit RGB, upright (its EXIF orientation applied): 16-bit grey (PNG ``I;16``, or ``I`` holding 16-bit values) scaled to 0..255,
    transparent pixels on ``background`` (else the alpha channel dropped). A float image (``F``) has no range to
    scale by: refused."""
    from PIL import Image

    from PIL import ImageOps

    image = ImageOps.exif_transpose(image)  # a phone photo's pixels are stored sideways; EXIF says how to turn them
    if image.mode == "F":
        raise ValueError("a 32-bit float image (PIL mode F): save it as an 8-bit (or 16-bit) image")
    if image.mode in _WIDE_MODES:
        values = np.asarray(image).astype(np.int64)
        if values.min() < 0 or values.max() >= 1 << _WIDE_MODES[image.mode]:
            raise ValueError(f"a {image.mode} image with values in [{values.min()}, {values.max()}]: expected "
                             f"0..{(1 << _WIDE_MODES[image.mode]) - 1}")
        image = Image.fromarray((values >> (_WIDE_MODES[image.mode] - 8)).astype(np.uint8), "L")
    if background is not None and (image.mode in ("RGBA", "LA", "PA", "P") or "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (*background, 255)), rgba)
    return image.convert("RGB")


def mask_pixels(image) -> np.ndarray:
    """A mask image as (H, W) bool, "non-zero = subject" whatever its format: a palette (label) mask (DAVIS, VOC)
    by its index (> 0: not the background's; their colours can be as dark as (128, 0, 0)), a 0/1 label mask by
    its values, a 0/255 mask (JPEG noise included) by its brightest channel over half scale."""
    from PIL import ImageOps

    image = ImageOps.exif_transpose(image)
    if image.mode in ("P", "PA"):
        return np.asarray(image.convert("P") if image.mode == "PA" else image) > 0
    if image.mode in _WIDE_MODES:
        values = np.asarray(image).astype(np.int64) >> (_WIDE_MODES[image.mode] - 8)
    else:
        values = np.asarray(image.convert("RGB")).max(axis=-1)
    return values > (0 if values.max() <= 1 else 127)


def read_mask(path: str, num_frames: int | None = None, stride: int = 1,
              size: tuple[int, int] | None = None) -> np.ndarray:
    """A mask file (image: one frame; video: every `stride`-th frame, at most num_frames) as (N, H, W) bool.
    size (H, W): resize (nearest) to match the frames it belongs to."""
    from PIL import Image

    if is_video(path):
        frames, _ = read_video(path, max_frames=num_frames, stride=stride)
        masks = frames.max(axis=-1) > 127
    else:
        if not os.path.isfile(path):
            raise MediaError(f"{path}: no such file")
        try:
            with Image.open(path) as image:
                masks = mask_pixels(image)[None]
        except Exception as e:
            raise MediaError(f"{path}: cannot decode mask ({type(e).__name__}: {e})") from e
    if size is not None and masks.shape[1:] != tuple(size):
        masks = np.stack([np.asarray(Image.fromarray(m).resize((size[1], size[0]), Image.NEAREST)) for m in masks])
    return masks.astype(bool)


def encode_image(image: np.ndarray, fmt: str = "jpeg", quality: int = 90) -> bytes:
    """(H, W, 3) uint8 -> JPEG or PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    if fmt == "jpeg":
        Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    elif fmt == "png":
        Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    else:
        raise ValueError(f"image encoding must be 'jpeg' or 'png', got {fmt!r}")
    return buf.getvalue()


def decode_image(data: bytes, min_size: tuple[int, int] | None = None) -> np.ndarray:
    """JPEG/PNG/... bytes -> (H, W, 3) uint8. min_size (H, W): a JPEG may be decoded at a reduced scale (DCT
    scaling, much faster for large frames) as long as both sides stay >= min_size."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        if min_size is not None and image.format == "JPEG":
            w, h = image.size
            scale = min(w / max(min_size[1], 1), h / max(min_size[0], 1))
            if scale >= 2:
                image.draft("RGB", (int(np.ceil(w / scale)), int(np.ceil(h / scale))))
        return np.asarray(image.convert("RGB"))
