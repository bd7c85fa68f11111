"""Frozen-weight memory per real-size config, float32 vs ``frozen_dtype=bfloat16``, from the trainer's abstract state
(``jax.eval_shape``: nothing is allocated or compiled; 10-30 s per config on a CPU). Per device, divide by the ways
the frozen weights are sharded (``fsdp``, ``tensor``).

    .venv/bin/python bench_results/frozen_weights.py [SPEC ...]

The S2V method's Wan config reads UMT5-XXL from files; here it gets the CLIP stand-in ``text_variant=sd15``, and
UMT5-XXL's own figures are a row of their own (its abstract parameters, stored the same way).
"""
import sys

import jax.numpy as jnp

from jaxvc.config_utils import get_config
from jaxvc.methods import build_method
from jaxvc.train.loop import Trainer
from jaxvc.train.metrics import format_bytes
from jaxvc.train.state import count_params, tree_bytes

SPECS = ("configs/videomaker.py:sd15", "configs/still_moving.py:sd15", "configs/customcrafter.py:sd15",
         "configs/microcinema.py:sd15", "configs/disentangled_s2v.py:wan21_1.3b")
STAND_IN = {"configs/disentangled_s2v.py:wan21_1.3b": ["model.text_variant=sd15"]}


def row(name: str, trainable: int, frozen, stored) -> str:
    full, half = tree_bytes(frozen), tree_bytes(stored)
    return (f"| {name} | {trainable:,} | {count_params(frozen):,} | {format_bytes(full)} | {format_bytes(half)} | "
            f"{format_bytes(full - half)} |")


def umt5_xxl_row() -> str:
    from jaxvc.models.t5_encoder import T5_VARIANTS, T5EncoderConfig, abstract_t5_params
    from jaxvc.models.weight_storage import store_weights
    from jaxvc.train.state import unbox

    frozen = unbox(abstract_t5_params(T5EncoderConfig(**T5_VARIANTS["umt5_xxl"])))
    return row("+ UMT5-XXL text encoder (Wan's, from files)", 0, frozen, store_weights(frozen, jnp.bfloat16))


def main(specs) -> None:
    print("| config | trainable parameters | frozen parameters | frozen, float32 | frozen, `frozen_dtype=bfloat16` "
          "| saved |")
    print("|---|---|---|---|---|---|")
    for spec in specs:
        states = []
        for frozen_dtype in ("", "bfloat16"):
            config = get_config(spec, STAND_IN.get(spec, []) + [f"frozen_dtype={frozen_dtype}"])
            trainer = Trainer(config, build_method(config), "/tmp/jaxvc-frozen-weights")
            states.append(trainer.abstract_state)
            trainer.checkpointer.close()
        name = f"`{spec}`" + (" (CLIP stand-in text encoder)" if spec in STAND_IN else "")
        print(row(name, count_params(states[0].params), states[0].frozen, states[1].frozen), flush=True)
        if spec in STAND_IN:
            print(umt5_xxl_row(), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or SPECS)
