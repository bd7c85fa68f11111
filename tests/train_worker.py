"""Subprocess side of the trainer's multi-device tests (run with 8 forced CPU devices or as one of two processes).

  python tests/train_worker.py layouts OUT.npz WORKDIR                 one process, 8 devices: several meshes
  python tests/train_worker.py distributed OUT.npz WORKDIR PORT ID N   process ID of N on 127.0.0.1:PORT

Results (losses, final parameters, shardings used) go to OUT.npz; the pytest side compares them.
"""
from __future__ import annotations

import sys
from pathlib import Path

import jax
import numpy as np

jax.config.update("jax_default_matmul_precision", "highest")

from flax import traverse_util  # noqa: E402

from jaxvc.config_utils import get_config  # noqa: E402
from jaxvc.methods import build_method  # noqa: E402
from jaxvc.parallel.mesh import make_mesh  # noqa: E402
from jaxvc.train import distributed, toy_data  # noqa: E402
from jaxvc.train.loop import Trainer  # noqa: E402

STEPS = 3
OVERRIDES = [f"steps={STEPS}", "checkpoint.every=0", "progress_bar=false", "matmul_precision=highest",
             "model.num_blocks=1", "compiler_options={'xla_backend_optimization_level': 0}"]
# name -> mesh axis sizes for the layouts test (the single-device reference first).
LAYOUTS = {
    "single": {"data": 1},
    "data": {"data": 8},
    "fsdp": {"fsdp": 8},
    "fsdp_tensor": {"fsdp": 4, "tensor": 2},
}


def flat_params(tree) -> dict[str, np.ndarray]:
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(distributed.to_host(tree)).items()}


def record(out: dict, name: str, trainer: Trainer, result) -> None:
    out[f"{name}/loss"] = np.array([h["loss"] for h in result.history])
    for path, value in flat_params(result.state.full_params()).items():
        out[f"{name}/param/{path}"] = value
    sharded = [s for s in jax.tree.leaves(trainer.state_shardings.params) + jax.tree.leaves(
        trainer.state_shardings.frozen) if any(p is not None for p in s.spec)]
    out[f"{name}/sharded_leaves"] = np.array(len(sharded))
    out[f"{name}/opt_sharded_leaves"] = np.array(sum(
        any(p is not None for p in s.spec) for s in jax.tree.leaves(trainer.state_shardings.opt_state)))


def layouts(out_path: str, workdir: str) -> None:
    config = get_config("configs/toy.py:tiny", OVERRIDES)
    method = build_method(config)
    devices = jax.devices()
    assert len(devices) == 8, devices
    out: dict[str, np.ndarray] = {}
    for name, sizes in LAYOUTS.items():
        mesh = make_mesh(sizes, devices[:1] if name == "single" else devices)
        trainer = Trainer(config, method, Path(workdir) / name, mesh=mesh)
        result = trainer.fit(lambda rows: toy_data.from_config(config, rows))
        record(out, name, trainer, result)
    # Gradient accumulation on a sharded mesh (2 micro-batches of 8 rows over data 2 x fsdp 4) against one device
    # without accumulation; noise comes with the data so the loss does not depend on the split.
    accum = ["batch_size=16", "data.with_noise=true"]
    for name, sizes, extra in (("single_big", {"data": 1}, []),
                               ("fsdp_accum", {"data": 2, "fsdp": 4}, ["optim.accumulation_steps=2"])):
        cfg = get_config("configs/toy.py:tiny", OVERRIDES + accum + extra)
        mesh = make_mesh(sizes, devices[:1] if name == "single_big" else devices)
        trainer = Trainer(cfg, build_method(cfg), Path(workdir) / name, mesh=mesh)
        record(out, name, trainer, trainer.fit(lambda rows: toy_data.from_config(cfg, rows)))
    # Restore the fsdp run's checkpoint (written from 8 devices) onto 4 devices and onto 1.
    for name, sizes, devs in (("restore4", {"fsdp": 2, "tensor": 2}, devices[:4]), ("restore1", {"data": 1}, devices[:1])):
        trainer = Trainer(config, method, Path(workdir) / "fsdp", mesh=make_mesh(sizes, devs))
        state, data_state, _ = trainer.restore()
        assert {d.id for d in jax.tree.leaves(state.params)[0].sharding.device_set} == {d.id for d in devs}
        for path, value in flat_params(state.full_params()).items():
            out[f"{name}/param/{path}"] = value
        out[f"{name}/data_next_batch"] = np.array(data_state["next_batch"])
    np.savez(out_path, **out)


def run_distributed(out_path: str, workdir: str, port: int, process_id: int, num_processes: int) -> None:
    if num_processes > 1:
        distributed.initialize(f"127.0.0.1:{port}", num_processes, process_id)
    assert jax.device_count() == 8, jax.devices()
    config = get_config("configs/toy.py:tiny", OVERRIDES + ["checkpoint.every=2"])
    config.mesh = {"data": 2, "fsdp": 4, "tensor": 1, "sequence": 1}
    method = build_method(config)
    trainer = Trainer(config, method, workdir)
    result = trainer.fit(lambda rows: toy_data.from_config(config, rows))
    out: dict[str, np.ndarray] = {"rows": np.array(trainer.host_rows)}
    record(out, "run", trainer, result)
    out["checkpoints"] = np.array(trainer.checkpointer.all_steps())
    if jax.process_index() == 0 or num_processes == 1:
        np.savez(out_path, **out)
    else:
        np.savez(out_path.replace(".npz", f".p{process_id}.npz"), rows=out["rows"])


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "layouts":
        layouts(sys.argv[2], sys.argv[3])
    elif mode == "distributed":
        run_distributed(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))
    else:
        raise SystemExit(f"unknown mode {mode}")
