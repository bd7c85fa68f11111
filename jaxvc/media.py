"""Writing what users look at: MP4 and GIF videos and contact-sheet PNGs.

Frames are uint8 (F, H, W, 3) or float in [-1, 1] (converted). Files are written to a temporary name and renamed,
so a crash never leaves a half-written video under the final name.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from jaxvc.storage import is_remote, run_path


def to_uint8(frames) -> np.ndarray:
    """float frames in [-1, 1] -> uint8 [0, 255]; uint8 passes through."""
    frames = np.asarray(frames)
    if frames.dtype == np.uint8:
        return frames
    return np.clip(np.round((frames.astype(np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def _check_video(frames: np.ndarray, path) -> np.ndarray:
    frames = to_uint8(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"{path}: expected frames of shape (F, H, W, 3), got {frames.shape}")
    return frames


def _upscale(frames: np.ndarray, min_size: int) -> np.ndarray:
    """Nearest-neighbour upscale so tiny (e.g. 32x32) videos are viewable and meet encoder minimums."""
    factor = max(1, int(np.ceil(min_size / min(frames.shape[1:3]))))
    return frames.repeat(factor, axis=1).repeat(factor, axis=2) if factor > 1 else frames


def write_mp4(path, frames, fps: int = 8, min_size: int = 128) -> Path:
    """H.264 MP4 (yuv420p, even dimensions) via PyAV."""
    import av

    path = Path(path)
    frames = _upscale(_check_video(frames, path), min_size)
    height, width = (frames.shape[1] // 2) * 2, (frames.shape[2] // 2) * 2
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    with av.open(str(tmp), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "18"}
        for frame in frames:
            packet_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame[:height, :width]), format="rgb24")
            for packet in stream.encode(packet_frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    os.replace(tmp, path)
    return path


def gif_delays_ms(num_frames: int, fps: float) -> list[int]:
    """Per-frame GIF delays in ms, multiples of 10 (GIF stores centiseconds): frame i ends at the centisecond nearest
    (i + 1) / fps, so the video's length is exact to 5 ms whatever the rate."""
    ends = [int(np.floor(100 * (i + 1) / fps + 0.5)) for i in range(num_frames)]
    return [10 * (end - start) for start, end in zip([0] + ends[:-1], ends)]


def write_gif(path, frames, fps: int = 8, min_size: int = 128) -> Path:
    """A GIF at ``path``, written atomically; ``path`` may be a bucket URL (a run folder on ``gs://``). GIF delays
    are whole centiseconds: each frame's is rounded so that the frames end where ``fps`` puts them (8 fps: 130,
    120, 130, ... ms, 2.0 s for 16 frames; a fixed 120 ms would play 4 % fast). Pillow merges identical
    consecutive frames into one with their summed delay (the timing holds; a reader counting frames sees fewer):
    the MP4 beside it has every frame, and is what ``jaxvc eval`` scores."""
    frames = _upscale(_check_video(frames, path), min_size)
    images = [Image.fromarray(f) for f in frames]
    duration = gif_delays_ms(len(images), fps)
    if is_remote(path):  # an object store writes whole objects: no partial file to hide
        buffer = io.BytesIO()
        images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=duration,
                       loop=0)
        target = run_path(path)
        target.write_bytes(buffer.getvalue())
        return target
    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=duration, loop=0)
    os.replace(tmp, path)
    return path


def contact_sheet(rows: Sequence[np.ndarray], labels: Sequence[str] | None = None, cell: int = 96,
                  label_width: int = 0) -> Image.Image:
    """A grid image: one row per video (F frames across); an optional label column on the left.

    ``rows``: list of (F, H, W, 3) arrays (uint8 or [-1, 1] floats); rows may have different frame counts and
    sizes, e.g. a reference image (1 frame) followed by its generated video. Tiles are ``cell`` pixels high and as
    wide as the frame's aspect ratio makes them (a 480 x 832 Wan frame: 96 x 166); small frames are enlarged
    without smoothing (the synthetic world's 32 x 32 pixels stay sharp), large ones reduced by area averaging.
    """
    rows = [_check_video(r, "contact sheet") for r in rows]
    widths = [max(1, round(cell * r.shape[2] / r.shape[1])) for r in rows]
    if labels is not None and not label_width:
        label_width = 8 + 7 * max((len(s) for s in labels), default=0)
    sheet_width = label_width + max(r.shape[0] * (w + 2) for r, w in zip(rows, widths))
    sheet = Image.new("RGB", (sheet_width, len(rows) * (cell + 2)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (frames, width) in enumerate(zip(rows, widths)):
        top = r * (cell + 2)
        if labels is not None:
            draw.text((4, top + cell // 2 - 6), labels[r], fill="black")
        resample = Image.NEAREST if frames.shape[1] <= cell else Image.BOX
        for c, frame in enumerate(frames):
            tile = Image.fromarray(frame).resize((width, cell), resample)
            sheet.paste(tile, (label_width + c * (width + 2), top))
    return sheet


def save_png(path, image: Image.Image) -> Path:
    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    image.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path
