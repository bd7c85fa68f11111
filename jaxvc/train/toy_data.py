"""A deterministic synthetic video stream for the trainer's tests and the toy method: moving squares.

Example ``i`` of the stream is a pure function of ``(seed, i)``: a coloured square on a coloured background moving
with a constant velocity (bouncing off the borders). Global batch ``n`` holds examples ``n*B .. n*B+B-1``; a host
yields only its rows ``[start, stop)`` of every global batch, so any number of hosts together see exactly the stream
one host would see. ``get_state()``/``set_state()`` (a JSON-able dict) make resumption exact.
Optionally each example also carries its diffusion noise and timestep (drawn from the same per-example generator),
which makes a loss independent of how a batch is split into micro-batches.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np


def _bounce(position: np.ndarray, low: float, high: float) -> np.ndarray:
    """Reflect positions into [low, high] (a triangle wave)."""
    span = high - low
    if span <= 0:
        return np.full_like(position, low)
    phase = np.mod(position - low, 2 * span)
    return low + np.where(phase > span, 2 * span - phase, phase)


def render_example(seed: int, index: int, frames: int, height: int, width: int, channels: int,
                   with_noise: bool = False, num_train_timesteps: int = 1000) -> dict[str, np.ndarray]:
    """Example ``index`` of the stream: {"video": (F, H, W, C) float32 in [-1, 1]} (+ "noise", "timesteps")."""
    rng = np.random.default_rng([int(seed), int(index)])
    background = rng.uniform(-1, 1, channels).astype(np.float32)
    colour = rng.uniform(-1, 1, channels).astype(np.float32)
    size = int(rng.integers(max(1, min(height, width) // 4), max(2, min(height, width) // 2) + 1))
    start = rng.uniform(0, [height - size, width - size])
    velocity = rng.uniform(-1.5, 1.5, 2)
    video = np.broadcast_to(background, (frames, height, width, channels)).copy()
    ys, xs = np.arange(height)[:, None], np.arange(width)[None, :]
    for f in range(frames):
        y0 = int(round(float(_bounce(np.array(start[0] + velocity[0] * f), 0, height - size))))
        x0 = int(round(float(_bounce(np.array(start[1] + velocity[1] * f), 0, width - size))))
        inside = (ys >= y0) & (ys < y0 + size) & (xs >= x0) & (xs < x0 + size)
        video[f][inside] = colour
    example = {"video": video}
    if with_noise:
        example["noise"] = rng.standard_normal((frames, height, width, channels)).astype(np.float32)
        example["timesteps"] = np.int32(rng.integers(0, num_train_timesteps))
    return example


class ToyVideoData:
    """Infinite iterator of host-local batch dicts (numpy), resumable through ``get_state``/``set_state``."""

    def __init__(self, global_batch_size: int, frames: int, height: int, width: int, channels: int = 3,
                 seed: int = 0, rows: tuple[int, int] | None = None, with_noise: bool = False,
                 num_train_timesteps: int = 1000):
        self.global_batch_size = int(global_batch_size)
        self.shape = (int(frames), int(height), int(width), int(channels))
        self.seed = int(seed)
        start, stop = rows if rows is not None else (0, self.global_batch_size)
        if not 0 <= start < stop <= self.global_batch_size:
            raise ValueError(f"toy data: host rows [{start}, {stop}) do not lie in the global batch of "
                             f"{self.global_batch_size}")
        self.rows = (int(start), int(stop))
        self.with_noise = bool(with_noise)
        self.num_train_timesteps = int(num_train_timesteps)
        self.next_batch = 0

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        first = self.next_batch * self.global_batch_size
        examples = [render_example(self.seed, first + row, *self.shape, with_noise=self.with_noise,
                                   num_train_timesteps=self.num_train_timesteps)
                    for row in range(*self.rows)]
        self.next_batch += 1
        return {key: np.stack([e[key] for e in examples]) for key in examples[0]}

    def get_state(self) -> dict:
        return {"next_batch": self.next_batch, "seed": self.seed, "global_batch_size": self.global_batch_size}

    def set_state(self, state: dict) -> None:
        for key in ("seed", "global_batch_size"):
            if key in state and int(state[key]) != getattr(self, key):
                raise ValueError(f"toy data: checkpointed iterator state has {key}={state[key]}, but this run "
                                 f"uses {key}={getattr(self, key)}; resuming would not replay the same stream")
        self.next_batch = int(state["next_batch"])


def from_config(config, rows: tuple[int, int] | None = None) -> ToyVideoData:
    """The toy stream for ``config`` (model shape from ``config.model``, options from ``config.data``)."""
    m = config.model
    return ToyVideoData(config.batch_size, m.frames, m.height, m.width, m.channels, seed=config.data.seed,
                        rows=rows, with_noise=config.data.with_noise,
                        num_train_timesteps=m.num_train_timesteps)
