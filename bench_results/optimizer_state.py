"""Optimizer-state size per ``optim.name`` for a config's trainable parameters, from the trainer's abstract state
(``jax.eval_shape``: nothing is allocated or compiled; seconds on a CPU even at SD1.5 size).

    .venv/bin/python bench_results/optimizer_state.py [configs/videomaker.py:sd15]
"""
import sys

from jaxvc.config_utils import get_config
from jaxvc.methods import build_method
from jaxvc.train.loop import Trainer
from jaxvc.train.metrics import format_bytes
from jaxvc.train.state import count_params, tree_bytes

CHOICES = (["optim.name=adamw"], ["optim.name=adamw", "optim.mu_dtype=bfloat16"], ["optim.name=adafactor"],
           ["optim.name=lion"], ["optim.name=lion", "optim.mu_dtype=bfloat16"], ["optim.name=sgd"])


def main(spec: str) -> None:
    print(f"| {spec} | trainable parameters | their bytes | optimizer state | / parameters |")
    print("|---|---|---|---|---|")
    for overrides in CHOICES:
        config = get_config(spec, overrides)
        state = Trainer(config, build_method(config), "/tmp/jaxvc-optimizer-state").abstract_state
        params, opt = tree_bytes(state.params), tree_bytes(state.opt_state)
        print(f"| `{' '.join(overrides)}` | {count_params(state.params):,} | {format_bytes(params)} | "
              f"{format_bytes(opt)} | {opt / params:.3f}x |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "configs/videomaker.py:sd15")
