"""Sampling on a device mesh: a pipeline's parameters placed by the rule table, its jitted calls traced under it.

A video is sampled one at a time (a batch of 1, 2 with guidance), so data parallelism has nothing to split. The
inference layout keeps the batch whole and shards the video's tokens over ``sequence`` and ``fsdp`` together:
every device holds 1/N of the weights (all-gathered layer by layer, as in FSDP training) and computes 1/N of the
tokens (sequence parallelism; attention gathers the keys and values). ``tensor`` splits heads and feed-forward
channels as in training. On ``fsdp=8`` a 14 B Wan DiT in bf16 (28 GB) takes 3.5 GB of each chip.

    pipe = CustomVideoPipeline.from_pretrained(folder, dtype="bfloat16").shard("fsdp=8")
    frames = pipe("first_frame.png", "a cat turns its head")      # every jitted call runs on the mesh

``jaxvc generate --mesh fsdp=8`` does the same.

The UNet pipeline (``CustomVideoPipeline``: VideoMaker, Still-Moving, MicroCinema, CustomCrafter) is the other
case: its weights fit any accelerator (SD1.5's UNet is 1.7 GB in bf16), so its mesh is ``data=N`` alone: the
weights replicated, a batch of videos (``generate`` with a list of prompts; ``jaxvc generate --prompts`` with
``--batch-size``) split over the devices, N videos at the cost of one (``DATA_PARALLEL_RULES``).
"""
from __future__ import annotations

import contextlib

import jax
from jax.sharding import Mesh

from jaxvc.parallel.mesh import activate, make_mesh, parse_axis_sizes
from jaxvc.parallel.rules import DEFAULT_RULES, param_shardings, rules_from_config

# The training table with the batch kept whole and the video's tokens (and frames) over sequence x fsdp, and conv
# kernels whole along their input channels. The last because XLA in jax 0.10.2 miscompiles a 3-D convolution whose
# input is sharded along frames or height on a mesh axis that also shards the kernel's input channels (errors of
# order 1 against the one-device result, on 8 CPU devices; jax 0.12.1 computes it right). GSPMD propagation gives
# the Wan VAE exactly such inputs when it decodes sampled latents; its kernels are small (0.13 B parameters).
INFERENCE_RULES = rules_from_config([("batch", None), ("tokens", ("sequence", "fsdp")),
                                     ("frames", ("sequence", "fsdp")), ("conv_in", None)])

# Data parallelism only: the batch over ``data``, every other logical axis (parameters included) whole.
DATA_PARALLEL_RULES = tuple((name, "data" if name == "batch" else None) for name, _ in DEFAULT_RULES)


def inference_mesh(spec: str | Mesh, devices=None) -> Mesh:
    """A mesh from ``"fsdp=8"``-style text (the axes of ``jaxvc train``'s meshes; -1 fills the rest) or a Mesh."""
    if isinstance(spec, Mesh):
        return spec
    return make_mesh(parse_axis_sizes(spec), devices)


class MeshPlacement:
    """Mixin for pipelines with ``params`` (a dict of parameter subtrees) and ``abstract_params()`` (the same
    dict of boxed ShapeDtypeStruct subtrees, whose logical names place them)."""
    mesh: Mesh | None = None
    rules = INFERENCE_RULES

    def shard(self, mesh: str | Mesh, rules=INFERENCE_RULES):
        """Place the parameters on ``mesh`` by ``rules`` and run every later call under it; returns self."""
        mesh = inference_mesh(mesh)
        abstract = self.abstract_params()
        if set(abstract) != set(self.params):
            raise ValueError(f"shard: parameter groups {sorted(self.params)} but abstract groups {sorted(abstract)}")
        self.params = {name: jax.device_put(self.params[name], param_shardings(abstract[name], mesh, rules))
                       for name in self.params}
        self.mesh, self.rules = mesh, rules
        self.forget_compiled()
        return self

    def forget_compiled(self):
        """Drop the jitted calls traced so far: a trace made off the mesh has no sharding constraints, and the
        rules' context is not part of jit's cache key."""
        self.__dict__.pop("_jitted", None)
        generate_fn = getattr(type(self), "_generate_fn", None)
        if hasattr(generate_fn, "cache_clear"):
            generate_fn.cache_clear()

    def on_mesh(self):
        """The context every traced call of this pipeline runs in: the mesh and its rules, or nothing."""
        return contextlib.nullcontext() if self.mesh is None else activate(self.mesh, self.rules)
