"""Does a trained MicroCinema run use its center frame? Its noise-prediction error on held-out clips with their
center frame against the same with a zero center frame (the unconditional input), per band of timesteps.

    python -m jaxvc.eval.condition_gain RUN [--clips 8] [--seeds 4] [--bands 4]

prints one row per band: timesteps, error with the center frame, error without, their ratio, and how far the center
frame moves the prediction (||eps(c) - eps(0)|| / ||eps(c)||). The clips come from the run's own data config with
another seed (the synthetic world draws other clips of its subjects).
"""
from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np


def condition_gain(run, *, clips: int = 8, seeds: int = 4, bands: int = 4, data_seed: int = 7919):
    """[(t_lo, t_hi, error with the center frame, error with zeros, relative change of the prediction)] for a
    ``TrainedRun`` of MicroCinema."""
    from jaxvc.config_utils import apply_overrides
    from jaxvc.diffusion.schedule import add_noise
    from jaxvc.train.cli import build_data

    method, config = run.method, run.config
    if not hasattr(method, "center_latent"):
        raise ValueError(f"condition_gain: method '{config.method}' has no center frame (MicroCinema runs only)")
    apply_overrides(config, [("data.seed", str(data_seed)), ("batch_size", str(clips))])
    data = build_data(config, (0, clips), method.tokenizer)
    batch = {k: jnp.asarray(v) for k, v in next(data).items() if k in ("video", "tokens", "reference")}
    data.close()
    params = jax.tree.map(jnp.asarray, run.params)
    steps = method.options.num_train_timesteps

    @jax.jit
    def errors(params, lo, hi, seed):
        latents = method.encode_pixels(params, batch["video"])
        center = method.center_latent(params, batch, latents)
        text = method.encode_text(params, batch["tokens"])
        rng_t, rng_noise = jax.random.split(jax.random.key(seed))
        t = jax.random.randint(rng_t, (clips,), lo, hi)
        noise = method.training_noise(rng_noise, latents.shape, center)
        noisy = add_noise(method.schedule, latents, noise, t)
        with_center, without = (method.denoise(params, noisy, t, text, condition)
                                for condition in (center, jnp.zeros_like(center)))
        return (jnp.mean(jnp.square(with_center - noise)), jnp.mean(jnp.square(without - noise)),
                jnp.linalg.norm(with_center - without) / jnp.linalg.norm(with_center))

    rows = []
    edges = np.linspace(0, steps, bands + 1).astype(int)
    for lo, hi in zip(edges[:-1], edges[1:]):
        values = np.mean([[float(e) for e in errors(params, int(lo), int(hi), seed)] for seed in range(seeds)], axis=0)
        rows.append((int(lo), int(hi), *(float(v) for v in values)))
    return rows


def main(argv=None) -> int:
    from jaxvc.train.trained_run import load_trained_run

    parser = argparse.ArgumentParser(prog="python -m jaxvc.eval.condition_gain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a MicroCinema training run folder (jaxvc train --workdir)")
    parser.add_argument("--clips", type=int, default=8, help="held-out clips per evaluation (default 8)")
    parser.add_argument("--seeds", type=int, default=4, help="noise draws averaged per band (default 4)")
    parser.add_argument("--bands", type=int, default=4, help="equal bands of timesteps (default 4)")
    args = parser.parse_args(argv)
    rows = condition_gain(load_trained_run(args.run), clips=args.clips, seeds=args.seeds, bands=args.bands)
    print("| timesteps | noise error, center frame | noise error, zero center frame | ratio | prediction change |")
    print("|---|---|---|---|---|")
    for lo, hi, with_center, without, change in rows:
        print(f"| {lo}-{hi} | {with_center:.4f} | {without:.4f} | {without / with_center:.3f} | {change:.2e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
