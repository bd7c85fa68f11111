"""The training loop: mesh, sharded state, the jitted step, checkpoints, resume, preemption, logging.

``train(config, method, data, workdir)`` is the entry point every method uses (``jaxvc train`` calls it):

* the mesh comes from ``config.mesh`` and the parameter shardings from the method's ``abstract_params`` through
  the rule table (``config.rules`` overrides it); the state is created directly in its shardings
  (``jit(init, out_shardings=...)``) or restored onto them from the latest checkpoint in ``<workdir>/checkpoints``;
* ``data`` is an iterator of host-local numpy batch dicts with ``get_state()``/``set_state()``, or a factory
  ``data(rows)`` that builds one for this host's rows ``[start, stop)`` of the global batch;
* each step is one call of the compiled step (state donated); metrics are fetched one step behind so the host
  never stalls the device, except at log/checkpoint/sample points;
* SIGTERM (preemption) finishes the current step, saves, waits for the write and returns (``preempted=True``);
  with several processes the hosts agree on stopping every ``config.preemption_check_every`` steps;
  ``config.max_nonfinite_in_a_row`` consecutive non-finite steps raise ``NonFiniteError`` without saving;
* ``config.profile`` traces chosen steps for the profiler (jaxvc/train/profiling.py).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import signal
import threading
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec

from jaxvc import compile_options
from jaxvc.config_utils import ConfigError, config_to_dict, write_config
from jaxvc.models.weight_storage import store_weights
from jaxvc.parallel.mesh import activate, make_mesh
from jaxvc.parallel.rules import param_shardings, rules_from_config
from jaxvc.storage import run_path
from jaxvc.train import distributed
from jaxvc.train.checkpoint import Checkpointer, abstract_with_shardings
from jaxvc.train.compute import frozen_dtype
from jaxvc.train.config_changes import (ResumeMismatchError, config_changes, data_mismatch_error, resume_notice,
                                        state_mismatch_error)
from jaxvc.train.metrics import (MetricWriter, compiled_flops, compiled_memory_bytes, format_bytes, mfu,
                                 peak_flops_per_device)
from jaxvc.train.optim import build_optimizer
from jaxvc.train.profiling import StepProfiler
from jaxvc.train.state import TrainState, count_params, new_state, split_params, state_from_tree, state_to_tree, unbox
from jaxvc.train.step import make_train_step


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


@dataclasses.dataclass
class TrainResult:
    state: TrainState
    history: list[dict]  # per-step host metrics of the steps run in this call ("step" = batches consumed after it)
    start_step: int  # the step the run started (or resumed) from
    final_step: int
    preempted: bool
    workdir: epath.Path  # a local folder or a bucket URL (jaxvc/storage.py)


def _check_best_metric(config) -> None:
    """A ``checkpoint.best_metric`` from the validation scores exists only at sample steps and on process 0 (see
    ``Trainer.score_samples``): refuse the settings under which checkpoints would be ranked without it."""
    best_metric = str(setting(config, "checkpoint.best_metric", "loss"))
    if not (int(setting(config, "checkpoint.keep_best", 0) or 0) and best_metric.startswith("validation/")):
        return
    sample_every, ckpt_every = int(setting(config, "sample_every", 0)), int(setting(config, "checkpoint.every", 0))
    if sample_every <= 0 or ckpt_every <= 0 or ckpt_every % sample_every:
        raise ValueError(f"checkpoint.best_metric '{best_metric}' is computed every sample_every ({sample_every}) "
                         f"steps; checkpoint.every ({ckpt_every}) must be a multiple of it")
    if jax.process_count() > 1:
        raise ValueError(f"checkpoint.best_metric '{best_metric}': validation scores are computed on one process; "
                         "rank checkpoints by them in single-process runs only")


def setting(config, dotted: str, default: Any = None) -> Any:
    """``config.a.b`` or ``default`` when the config does not define it (configs of other methods may omit fields)."""
    node = config
    for part in dotted.split("."):
        if node is None or part not in node:
            return default
        node = node[part]
    return default if node is None else node


class _Preemption:
    """SIGTERM sets a flag the loop checks between steps (the handler itself does nothing risky)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        return False


def _opt_state_shardings(abstract_opt_state, abstract_params, params_shardings, replicated):
    """Optimizer-state leaves that mirror a parameter (AdamW's moments, Lion's and SGD's momentum) get its sharding;
    the rest (counts, Adafactor's factored row and column statistics, small next to the parameter) is replicated.

    A leaf mirrors a parameter when the parameter's key path is a suffix of the leaf's and the shapes agree.
    """
    def names(path):
        return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)

    by_path = {}
    for (path, leaf), sharding in zip(jax.tree_util.tree_flatten_with_path(abstract_params)[0],
                                      jax.tree.leaves(params_shardings)):
        by_path[names(path)] = (leaf.shape, sharding)

    def one(path, leaf):
        key = names(path)
        for start in range(len(key)):
            hit = by_path.get(key[start:])
            if hit is not None and hit[0] == leaf.shape:
                return hit[1]
        return replicated

    return jax.tree_util.tree_map_with_path(one, abstract_opt_state)


class Trainer:
    """Everything about a run that does not depend on the data: mesh, shardings, optimizer, checkpoints."""

    def __init__(self, config, method, workdir: str | Path, mesh=None):
        self.config = config
        self.method = method
        self.workdir = run_path(workdir)  # gs://... stays a URL (jaxvc/storage.py)
        self.mesh = mesh if mesh is not None else make_mesh(dict(setting(config, "mesh", {"data": -1})))
        self.rules = rules_from_config(setting(config, "rules", ()))
        self.batch_size = int(config.batch_size)
        self.steps = int(config.steps)
        split = self.batch_size_divisor = distributed.batch_axis_size(self.mesh, self.rules)  # ways the batch is cut
        self.accumulation = int(setting(config, "optim.accumulation_steps", 1))
        # the global batch sizes steps can have: batch_size, and each switched stream's own (method (e): 8 / 6)
        stream_sizes = setting(config, "data.batch_sizes", None) or {}
        sizes = {"batch_size": self.batch_size, **{f"data.batch_sizes.{name}": int(size) for name, size in (
            stream_sizes.items())}}
        for key, size in sizes.items():
            if size % split:
                raise ConfigError(f"config.{key} {size} is not divisible by the {split}-way batch split of the mesh "
                                  f"{dict(self.mesh.shape)}")
            if size % self.accumulation:
                raise ConfigError(f"config.{key} {size} is not divisible by optim.accumulation_steps "
                                  f"{self.accumulation}")
        self.ema_decay = setting(config, "optim.ema_decay", None)
        self.precision = setting(config, "matmul_precision", None)
        self.save_frozen = bool(setting(config, "checkpoint.save_frozen", True))
        self.frozen_in_checkpoint = self.save_frozen  # what restore() found in the checkpoint it read
        self.frozen_dtype = frozen_dtype(setting(config, "frozen_dtype", ""))  # None: frozen weights stay float32
        _check_best_metric(config)
        self.profiler = StepProfiler(setting(config, "profile", None), self.workdir)  # checks config.profile now
        # XLA options for every compile of the run (e.g. TPU scheduler flags; CPU tests use a low LLVM opt level),
        # over jaxvc's defaults for the mesh's platform (jaxvc/compile_options.py)
        options = setting(config, "compiler_options", None)
        self.compiler_options = compile_options.merged(
            options.to_dict() if hasattr(options, "to_dict") else options, platform=self.mesh.devices.flat[0].platform)

        boxed = method.abstract_params()
        abstract_params = unbox(boxed)
        shardings = param_shardings(boxed, self.mesh, self.rules)
        self.abstract_trainable, self.abstract_frozen = split_params(abstract_params, method.trainable)
        trainable_sh, frozen_sh = split_params(shardings, method.trainable)
        if not jax.tree.leaves(self.abstract_trainable):
            raise ValueError(f"method '{method.name}' marks no parameter as trainable")
        self.optimizer, self.schedule = build_optimizer(config.optim, self.steps)
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        rng_abstract = jax.ShapeDtypeStruct((2,), np.uint32)
        self.abstract_state = jax.eval_shape(
            lambda t, f, r: new_state(t, f, self.optimizer, r, self.ema_decay is not None, self.frozen_dtype),
            self.abstract_trainable, self.abstract_frozen, rng_abstract)
        rep = self.replicated
        self.state_shardings = TrainState(
            step=rep, opt_steps=rep, params=trainable_sh, frozen=frozen_sh,
            opt_state=_opt_state_shardings(self.abstract_state.opt_state, self.abstract_trainable, trainable_sh, rep),
            rng=rep, ema=trainable_sh if self.ema_decay is not None else None,
            nonfinite_in_a_row=rep, nonfinite_total=rep)
        self.checkpointer = Checkpointer(self.workdir / "checkpoints", config.checkpoint)
        self._compiled = None  # the step program of the last batch shape seen
        self._programs: dict = {}  # batch signature -> (compiled step, its FLOPs): a mixture of image batches and
        #                          video batches (method (e)'s task switching) has one program per shape
        self._init_compiled = None
        self._sample_fn = None
        self._scorer = None
        self.flops_per_step = None

    # ----------------------------------------------------------------------------------------------------- setup
    def _context(self):
        stack = contextlib.ExitStack()
        stack.enter_context(activate(self.mesh, self.rules))
        if self.precision:
            stack.enter_context(jax.default_matmul_precision(self.precision))
        return stack

    @property
    def host_rows(self) -> tuple[int, int]:
        """This process's rows ``[start, stop)`` of every global batch."""
        return distributed.host_batch_rows(distributed.batch_sharding(self.mesh, 1, self.rules), self.batch_size)

    def _rngs(self):
        init_rng, train_rng = jax.random.split(jax.random.PRNGKey(int(setting(self.config, "seed", 0))))
        return init_rng, train_rng

    def init_state(self) -> TrainState:
        """A fresh state, created directly in its shardings."""
        init_rng, train_rng = self._rngs()
        use_ema = self.ema_decay is not None
        with self._context():
            jittable = getattr(self.method, "init_params_jittable", True)
            if jittable and (self.mesh.size > 1 or not getattr(self.method, "init_in_parts", False)):
                if self._init_compiled is None:  # compiled once: restore() without frozen weights calls it again
                    def init(init_rng, train_rng):
                        trainable, frozen = split_params(self.method.init_params(init_rng), self.method.trainable)
                        return new_state(trainable, frozen, self.optimizer, train_rng, use_ema, self.frozen_dtype)
                    self._init_compiled = jax.jit(init, out_shardings=self.state_shardings).lower(
                        init_rng, train_rng).compile(self.compiler_options)
                return self._init_compiled(init_rng, train_rng)
            # Weights read from files arrive as host arrays, and on one device a method made of parts runs its init
            # eagerly, each part its own program compiled with the run's options (which a persistent compilation
            # cache shares between runs and methods): place each leaf on its sharding, then build the state.
            with compile_options.scope(self.compiler_options):
                params = self.method.init_params(init_rng)
            trainable, frozen = split_params(params, self.method.trainable)
            frozen = store_weights(frozen, self.frozen_dtype)  # before placing: weights read from files (host arrays)
            #                                                   reach the devices already in frozen_dtype

            def place(x, sharding):  # a copy: the build below donates its inputs, and a leaf may be shared by two
                #                      parameters (MicroCinema's AppearNet starts as the UNet's encoder)
                if isinstance(x, jax.Array) and self.mesh.size == 1:
                    return jax.device_put(x, sharding, may_alias=False)
                return jax.make_array_from_callback(np.shape(x), sharding, lambda idx: np.asarray(x)[idx])
            trainable = jax.tree.map(place, trainable, self.state_shardings.params)
            frozen = jax.tree.map(place, frozen, self.state_shardings.frozen)
            if self._init_compiled is None:  # compiled once, as above
                build = jax.jit(lambda t, f, r: new_state(t, f, self.optimizer, r, use_ema, self.frozen_dtype),
                                out_shardings=self.state_shardings, donate_argnums=(0, 1))
                self._init_compiled = build.lower(trainable, frozen, train_rng).compile(self.compiler_options)
            return self._init_compiled(trainable, frozen, train_rng)

    def restore(self, step: int | None = None) -> tuple[TrainState, dict, dict] | None:
        """(state, data state, saved config) from the checkpoint at ``step`` (default: latest), or None."""
        step = self.checkpointer.latest_step() if step is None else step
        if step is None:
            return None
        saved = self.checkpointer.item_metadata(step)
        saved_tree = (saved or {}).get("state")
        # Frozen weights come from the checkpoint when it holds them, whatever checkpoint.save_frozen says now, and
        # from the method when it does not: the setting may change between a run's resumes.
        self.frozen_in_checkpoint = "frozen" in saved_tree if isinstance(saved_tree, dict) else self.save_frozen
        abstract = abstract_with_shardings(self.abstract_state, self.state_shardings)
        target = state_to_tree(abstract, include_frozen=self.frozen_in_checkpoint)
        with_config = saved is None or "config" in saved
        # A state this config lays out otherwise is refused naming the changed keys, before Orbax (whose error is a
        # tree dump) and after it (for what the metadata did not show)
        check = functools.partial(state_mismatch_error, self.checkpointer.directory, step, target, saved_tree,
                                  lambda: self.checkpointer.saved_config(step) if with_config else {},
                                  config_to_dict(self.config))
        mismatch = check()
        if mismatch is not None:
            raise mismatch
        try:
            tree, data_state, saved_config = self.checkpointer.restore(step, target, with_config=with_config)
        except Exception as error:
            mismatch = check(error=error)
            if mismatch is None:
                raise
            raise mismatch from error
        frozen = None if self.frozen_in_checkpoint else self.init_state().frozen
        state = state_from_tree(tree, frozen)
        if int(state.step) != step:
            raise RuntimeError(f"checkpoint {self.checkpointer.directory}/{step} holds state.step={int(state.step)}")
        return state, data_state, saved_config

    def save(self, state: TrainState, data_state: dict | None, metrics: dict | None = None) -> None:
        self.checkpointer.save(int(state.step), state_to_tree(state, include_frozen=self.save_frozen), data_state,
                               config_to_dict(self.config), metrics)

    def compile(self, state: TrainState, batch: dict):
        """The compiled step for these (global) argument shapes (compiled at their first sight; each shape's FLOPs
        per step recorded)."""
        signature = tuple(sorted((k, tuple(v.shape), str(v.dtype)) for k, v in batch.items()))
        if signature in self._programs:
            self._compiled, self.flops_per_step = self._programs[signature]
            return self._compiled
        step_fn = make_train_step(
            self.method, self.optimizer, self.schedule, accumulation_steps=self.accumulation,
            ema_decay=self.ema_decay,
            constrain_micro_batches=(_rows(batch) // self.accumulation) % self.batch_size_divisor == 0)
        batch_shardings = {k: distributed.batch_sharding(self.mesh, v.ndim, self.rules) for k, v in batch.items()}
        started = time.perf_counter()
        with self._context():
            jitted = jax.jit(step_fn, in_shardings=(self.state_shardings, batch_shardings),
                             out_shardings=(self.state_shardings, self.replicated), donate_argnums=0)
            self._compiled = jitted.lower(state, batch).compile(self.compiler_options)
        self.flops_per_step = compiled_flops(self._compiled)
        self._programs[signature] = (self._compiled, self.flops_per_step)
        if jax.process_index() == 0:
            from tqdm.auto import tqdm

            tqdm.write(_compile_report(time.perf_counter() - started, batch, self.flops_per_step,
                                       compiled_memory_bytes(self._compiled)))
        return self._compiled

    def step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        return self.compile(state, batch)(state, batch)

    def sample(self, state: TrainState, step: int) -> dict[str, np.ndarray] | None:
        """The method's ``sample(params, rng)`` hook on the (EMA if any) parameters, on host; None if absent."""
        hook = getattr(self.method, "sample", None)
        if not callable(hook):
            return None
        rng = jax.random.fold_in(jax.random.PRNGKey(int(setting(self.config, "seed", 0)) + 1), step)
        params = state.full_params(use_ema=True)
        with self._context():
            if self._sample_fn is None:
                self._sample_fn = jax.jit(hook, out_shardings=self.replicated).lower(params, rng).compile(
                    self.compiler_options)
            out = self._sample_fn(params, rng)
        return {k: np.asarray(v) for k, v in distributed.to_host(out).items()}

    def score_samples(self, videos: dict[str, np.ndarray]) -> dict[str, float]:
        """CLIP-T / CLIP-I / DINO-I / T.Cons of the ``"validation"`` videos against the method's ``validation``
        (prompt, reference) pairs, when ``config.validation`` names the backbones; on process 0 only."""
        clip = setting(self.config, "validation.clip_model", "")
        dino = setting(self.config, "validation.dino_model", "")
        pairs = getattr(self.method, "validation", None)
        if not (clip or dino) or not pairs or "validation" not in videos or jax.process_index() != 0:
            return {}
        from jaxvc.eval.feature_metrics import VideoScorer, mean_scores
        from jaxvc.media import to_uint8

        if self._scorer is None:
            self._scorer = VideoScorer.from_folders(clip or None, dino or None)
        per_video = [self._scorer.score(to_uint8(video), prompt, [to_uint8(reference)])
                     for video, (prompt, reference) in zip(videos["validation"], pairs)]
        return {f"validation/{name}": value for name, (value, _) in mean_scores(per_video).items()}

    def _sample_and_score(self, writer, progress, state: TrainState, step: int) -> dict[str, float]:
        """Write the method's samples at ``step`` and log their validation scores; returns the scores."""
        videos = self.sample(state, step)
        if not videos:
            return {}
        writer.videos(step, videos, self.workdir / "samples" / f"step_{step:08d}")
        scores = self.score_samples(videos)
        if scores:
            writer.scalars(step, scores)
            progress.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
        return scores

    # ------------------------------------------------------------------------------------------------------ loop
    def fit(self, data) -> TrainResult:
        config = self.config
        if callable(data) and not hasattr(data, "__next__"):
            data = data(self.host_rows)
        restored = self.restore()
        if restored is None:
            state, start = self.init_state(), 0
        else:
            state, data_state, saved_config = restored
            start = int(state.step)
            changes = self._check_saved_config(saved_config)
            if data_state:
                if not hasattr(data, "set_state"):
                    raise TypeError("the data iterator has no set_state(); a resumed run would not see the data "
                                    "it would have seen uninterrupted")
                try:
                    data.set_state(data_state)
                except (ValueError, KeyError) as error:  # a position in another stream (batch size, data, seed)
                    raise data_mismatch_error(self.checkpointer.directory, start, error, changes) from error
            if jax.process_index() == 0:
                for line in resume_notice(start, changes, self.frozen_in_checkpoint):
                    print(f"jaxvc train: {line}")
        if jax.process_index() == 0:
            write_config(config, self.workdir)
        history: list[dict] = []
        if start >= self.steps:
            return TrainResult(state, history, start, start, False, self.workdir)

        log_every = int(setting(config, "log_every", 1))
        ckpt_every = int(setting(config, "checkpoint.every", 0))
        sample_every = int(setting(config, "sample_every", 0))
        max_nonfinite = int(setting(config, "max_nonfinite_in_a_row", 0))
        # One process reads its own SIGTERM flag every step; several must agree (a collective), so less often.
        check_every = 1 if jax.process_count() == 1 else int(setting(config, "preemption_check_every", 10))
        peak = peak_flops_per_device(self.mesh.devices.flat[0], setting(config, "peak_flops_per_device", None))
        writer = MetricWriter(self.workdir / "tensorboard")
        progress = _progress_bar(bool(setting(config, "progress_bar", True)), self.steps, start)
        if jax.process_index() == 0:
            n_train, n_frozen = count_params(self.abstract_trainable), count_params(self.abstract_frozen)
            stored = "" if self.frozen_dtype is None else f" (matrices in {np.dtype(self.frozen_dtype).name})"
            progress.write(f"jaxvc train: {self.method.name}, {n_train:,} trainable / {n_frozen:,} frozen params"
                           f"{stored}, mesh {dict(self.mesh.shape)}, {jax.process_count()} process(es), steps "
                           f"{start}->{self.steps}, workdir {self.workdir}")

        pending: list[tuple[int, Any]] = []
        since_checkpoint: list[float] = []
        window_start, window_steps, window_samples = time.perf_counter(), 0, 0
        window_data_s = 0.0  # host time spent getting batches (reading, decoding, the copy to the devices)
        preempted = False
        step_index = start

        def save_checkpoint(state, data_state, scores) -> None:
            """A checkpoint of ``state`` with the mean loss since the last one; the scalars up to it flushed (they are
            where the checkpoint is, a bucket too)."""
            loss = float(np.mean(since_checkpoint)) if since_checkpoint else math.nan
            self.save(state, data_state, {"loss": loss, **scores})
            since_checkpoint.clear()
            writer.flush()

        def consume():
            """Fetch the pending metrics (waits for those steps) and check the non-finite budget."""
            nonlocal pending
            for after_step, metrics in pending:
                values = {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items()}
                values["step"] = after_step
                history.append(values)
                if values["finite"]:
                    since_checkpoint.append(values["loss"])
                if max_nonfinite and values["nonfinite_in_a_row"] >= max_nonfinite:
                    pending = []
                    raise NonFiniteError(
                        f"{int(values['nonfinite_in_a_row'])} consecutive steps had a non-finite loss or gradient "
                        f"(last at step {after_step}, loss {values['loss']}, grad norm {values['grad_norm']}); "
                        f"parameters were left unchanged by those steps and nothing was saved after them")
            pending = []

        try:
            with _Preemption() as preemption, self.profiler.start(start) as profiler:
                for step_index in range(start, self.steps):
                    fetch_start = time.perf_counter()
                    try:
                        local = next(data)
                    except StopIteration:
                        raise RuntimeError(f"the data iterator ended after {step_index} batches, before config.steps="
                                           f"{self.steps}; make the stream repeat or lower steps") from None
                    except Exception:
                        # A SIGTERM to the process group (launch/common.sh's stop, a scheduler's) reaches the data
                        # workers too, and the batch they were making is lost: the steps done are not. One process
                        # only: hosts could fail at different steps, and a checkpoint is saved by all of them.
                        if not preemption.requested or jax.process_count() > 1:
                            raise
                        consume()
                        self.checkpointer.wait()
                        if step_index > start and self.checkpointer.latest_step() != step_index:
                            save_checkpoint(state, data_state, {})
                        preempted = True
                        progress.write(f"jaxvc train: preempted (SIGTERM) after step {step_index}, its data workers "
                                       f"stopped by the same signal; checkpoint saved")
                        break
                    data_state = json.loads(json.dumps(data.get_state())) if hasattr(data, "get_state") else None
                    # the pipeline says a batch's global size where streams have their own (data.batch_sizes)
                    size = int(local.get("global_batch_size", self.batch_size))
                    batch = distributed.global_batch(local, self.mesh, size, self.rules)
                    window_samples += size
                    window_data_s += time.perf_counter() - fetch_start
                    if self._compiled is None:
                        self.compile(state, batch)
                        window_start = time.perf_counter() - window_data_s  # the compile out, the batch in
                    profiler.before_step(step_index)
                    with profiler.annotation(step_index):
                        state, metrics = self.compile(state, batch)(state, batch)
                    traced = profiler.after_step(step_index, state)
                    if traced:
                        progress.write(traced)
                    consume()  # the previous step's metrics: the device is already busy with this one
                    pending.append((step_index + 1, metrics))
                    window_steps += 1
                    done = step_index + 1
                    progress.update(1)
                    stop = (done % check_every == 0 or done == self.steps) and distributed.any_process(
                        preemption.requested)
                    do_log = log_every > 0 and (done % log_every == 0 or done == self.steps)
                    do_ckpt = stop or done == self.steps or (ckpt_every > 0 and done % ckpt_every == 0)
                    do_sample = sample_every > 0 and done % sample_every == 0
                    if not (do_log or do_ckpt or do_sample):
                        continue
                    consume()
                    if do_log:
                        elapsed = time.perf_counter() - window_start
                        self._log(writer, progress, history[-1], elapsed, window_steps, window_samples,
                                  window_data_s, peak)
                    # Sample first, so a checkpoint of the same step carries the validation scores (keep_best can
                    # rank by them); on SIGTERM the checkpoint comes first, it is what the grace period is for.
                    scores = self._sample_and_score(writer, progress, state, done) if do_sample and not stop else {}
                    if do_ckpt:
                        save_checkpoint(state, data_state, scores)
                    if do_sample and stop:
                        self._sample_and_score(writer, progress, state, done)
                    window_start, window_steps, window_samples, window_data_s = time.perf_counter(), 0, 0, 0.0
                    if stop:
                        preempted = True
                        if jax.process_index() == 0:
                            progress.write(f"jaxvc train: preempted (SIGTERM) after step {done}; "
                                           f"checkpoint saved")
                        break
                consume()
        finally:
            self.checkpointer.wait()
            writer.close()
            progress.close()
        return TrainResult(state, history, start, int(state.step), preempted, self.workdir)

    def _log(self, writer, progress, values: dict, elapsed: float, steps: int, samples: int, data_seconds: float,
             peak):
        """Scalars of the step just fetched; the perf ones over the window of ``steps`` steps of ``samples``
        examples in all (``elapsed`` seconds, ``data_seconds`` of them waiting for the input pipeline: near 1 of it
        means input-bound)."""
        step = int(values["step"])
        step_seconds = elapsed / max(steps, 1)
        scalars = {"train/loss": values["loss"], "train/grad_norm": values["grad_norm"],
                   "train/learning_rate": values["learning_rate"], "train/nonfinite_total": values["nonfinite_total"],
                   "perf/step_time_s": step_seconds, "perf/samples_per_s": samples / max(elapsed, 1e-9),
                   "perf/mfu": mfu(self.flops_per_step, step_seconds, peak),
                   "perf/data_wait_s": data_seconds / max(steps, 1),
                   "perf/data_wait_fraction": data_seconds / elapsed if elapsed > 0 else 0.0}
        scalars.update({k: v for k, v in values.items() if k.startswith("method/")})
        writer.scalars(step, scalars)
        progress.set_postfix(loss=f"{values['loss']:.4g}", lr=f"{values['learning_rate']:.3g}", refresh=False)

    def _check_saved_config(self, saved: dict) -> list:
        """The config changes since the checkpoint (dotted keys, old and new values); a change of method refused."""
        if saved and saved.get("method") not in (None, self.config.method):
            raise ResumeMismatchError(
                f"the checkpoint in {self.checkpointer.directory} was written by method '{saved.get('method')}', "
                f"this run is '{self.config.method}': train it in a new --workdir")
        return config_changes(saved, config_to_dict(self.config)) if saved else []


def _rows(batch: dict) -> int:
    """The global batch size of a batch of arrays (their common first axis)."""
    return int(next(iter(batch.values())).shape[0])


def _compile_report(seconds: float, batch: dict, flops: float | None, planned_bytes: int | None) -> str:
    """One line per compiled step program: how long it took, and what XLA says one step costs per device (the
    memory plan is what decides whether a layout fits before the first step runs)."""
    shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in sorted(batch.items()))
    line = f"jaxvc train: compiled the step for {shapes} in {seconds:.1f} s"
    if flops:
        line += f"; {flops / 1e9:.4g} GFLOP per device per step"
    if planned_bytes:
        line += f"; XLA plans {format_bytes(planned_bytes)} per device"
    return line


def _progress_bar(enabled: bool, total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not (enabled and jax.process_index() == 0),
                dynamic_ncols=True, desc="train")


def train(config, method, data, workdir: str | Path, mesh=None) -> TrainResult:
    """Train ``method`` on ``data`` per ``config``, resuming from ``<workdir>/checkpoints`` if present."""
    return Trainer(config, method, workdir, mesh=mesh).fit(data)
