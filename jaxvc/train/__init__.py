"""Training: the engine under every method.

  state.py        TrainState (trainable / frozen split, optimizer state over the trainable part only; frozen
                  matrices kept in config.frozen_dtype)
  optim.py        Optax chains from config.optim (clipping; AdamW, Adafactor, Lion, SGD; decay mask; LR schedules)
  step.py         the pure train step (micro-batch accumulation, non-finite guard, EMA)
  loop.py         Trainer / train(config, method, data, workdir): mesh, shardings, jit, checkpoints, logging
  checkpoint.py   Orbax CheckpointManager (state, data-iterator state, config; keep latest + best)
  distributed.py  jax.distributed start-up, host batch slices, global arrays
  metrics.py      TensorBoard writer, MFU
  bucket_events.py  TensorBoard events for a gs:// run folder, uploaded in bounded pieces
  profiling.py    profiler traces of chosen steps (config.profile)
  schedules.py    learning-rate schedules (warmup, cosine, linear, rsqrt, WSD)
  compute.py      compute dtype and remat policy names
  cli.py          the `jaxvc train` subcommand
  toy_data.py     deterministic synthetic video stream (tests, toy method)

Submodules are imported explicitly (``from jaxvc.train.loop import train``) so that models importing
``jaxvc.train.compute`` do not pull in Orbax.
"""
