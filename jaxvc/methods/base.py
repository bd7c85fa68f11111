"""What a training method gives the trainer (``jaxvc/train``): the contract every file in ``methods/`` implements.

A method owns its model(s), says which parameter paths train, and computes its loss. The trainer owns everything
else: sharding, the optimizer (built only over the trainable subset), accumulation, checkpoints, the loop.

Parameters are one pytree ``{"params": ...}`` as returned by Flax ``init`` (unboxed). Batches are dicts of arrays
whose first axis is the (per-step global) batch; the trainer shards that axis over ``("data", "fsdp")``.
"""
from __future__ import annotations

import abc
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxvc import compile_options

PyTree = Any


class Method(abc.ABC):
    """Base class for a trainable method."""

    name: str = "method"
    # False when ``init_params`` reads weight files (not traceable): the trainer then calls it eagerly and places
    # the host arrays onto their shardings instead of jitting it with ``out_shardings``.
    init_params_jittable: bool = True
    # True when ``init_params`` makes its parts with ``init_program``: on a one-device mesh the trainer then calls it
    # eagerly (each part its own compiled program) instead of compiling the whole init as one program.
    init_in_parts: bool = False
    # Optional hook, looked up by the trainer: ``sample(self, params, rng) -> {name: (N, F, H, W, 3) videos in
    # [-1, 1]}``; called every ``config.sample_every`` steps on the (EMA if any) full parameter tree under jit.

    @abc.abstractmethod
    def abstract_params(self) -> PyTree:
        """``jax.eval_shape`` of the parameter init: ShapeDtypeStructs, boxed with logical axis names."""

    @abc.abstractmethod
    def init_params(self, rng: jax.Array) -> PyTree:
        """Concrete (unboxed) parameters: random init, or weights loaded from the config's pretrained paths.

        On a mesh of several devices the trainer calls this under ``jax.jit`` with ``out_shardings`` so large
        models are created directly in their shardings; on one device it calls it eagerly (a component's init
        made by ``init_program`` is then its own compiled program); implementations that load files return host
        arrays and the trainer places them.
        """

    @abc.abstractmethod
    def trainable(self, path: tuple[str, ...]) -> bool:
        """Whether the parameter at this Flax path (e.g. ``("params", "down_blocks_0", ..., "kernel")``) trains."""

    @abc.abstractmethod
    def loss(self, params: PyTree, batch: Mapping[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, dict]:
        """Scalar loss for one (micro-)batch and a dict of scalar metrics to log. Pure and jittable."""

    def example_batch(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        """Shapes and dtypes of one batch (for compile-only planning and abstract lowering)."""
        raise NotImplementedError(f"method '{self.name}' does not describe its batch")

    def trainable_mask(self, params: PyTree) -> PyTree:
        """Tree of bools, same structure as ``params``."""
        return jax.tree_util.tree_map_with_path(
            lambda path, _: self.trainable(tuple(_key_name(k) for k in path)), nn.unbox(params))


def validation_sampling(validation) -> dict:
    """A run's sampling settings from its ``config.validation``: steps, guidance, DDIM eta, sampler (None: the
    method's own) and negative prompt, the defaults of its pipelines and of ``jaxvc generate``."""
    validation = validation or {}
    return {"num_inference_steps": int(validation.get("steps", 25)),
            "guidance_scale": float(validation.get("guidance_scale", 8.0)), "eta": float(validation.get("eta", 0.0)),
            "sampler": validation.get("sampler") or None,
            "negative_prompt": str(validation.get("negative_prompt") or "")}


def frame_size(image_size, image_width: int | None = None, *, multiple: int = 1,
               owner: str = "") -> tuple[int, int]:
    """(height, width) of the training frames: ``image_size`` an int (the height; the width too unless
    ``image_width``, as ``config.model.image_size`` / ``image_width``) or a (height, width) pair; both sides must
    be divisible by ``multiple`` (what the model halves or patches them by), else ``owner``'s error."""
    if isinstance(image_size, (int, float)):
        size = (image_size, image_width or image_size)
    else:
        size = tuple(image_size)
    if len(size) != 2 or any(int(s) != s or s < 1 for s in size):
        raise ValueError(f"image_size={image_size!r}, image_width={image_width!r}: expected positive ints (height, "
                         "width)")
    height, width = int(size[0]), int(size[1])
    if height % multiple or width % multiple:
        raise ValueError(f"{owner}: frames of {height}x{width} pixels; this model needs both sides divisible by "
                         f"{multiple} (model.image_size, model.image_width)")
    return height, width


def model_frame_size(model) -> tuple[int, int]:
    """(height, width) of a config's ``model`` section: ``image_size`` (and ``image_width``, default square)."""
    return frame_size(model.image_size, model.get("image_width"))


def init_program(owner, name: str, init):
    """``init(*args) -> params`` as its own compiled program, made once per ``owner``, ``name`` and compiler options
    (``compile_options.current()``: the trainer's inside its ``scope``): a model component's random init. Called
    eagerly, the component compiles alone (the same tiny UNet in several methods is one program, which a persistent
    compilation cache serves to every run after the first; calling ``init_params`` again reuses the compiled
    program); traced inside a larger jit (the sharded trainer's init), it is inlined into that program."""
    def run(*args):
        if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(args)):
            return init(*args)
        options = compile_options.current()
        key = (name, repr(sorted(options.items())) if options else None)
        programs = owner.__dict__.setdefault("_init_programs", {})
        if key not in programs:
            programs[key] = jax.jit(init, compiler_options=options) if options else jax.jit(init)
        return programs[key](*args)
    return run


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


class PipelineValidation:
    """``set_validation`` and the trainer's ``sample`` hook for methods that generate with
    ``self.pipeline(params, tokenizer)`` (a ``CustomVideoPipeline``-like ``generate``), from prompts and, where
    ``uses_reference``, one reference image each. Needs ``name``, ``uses_reference``, ``tokenizer``, ``num_frames``,
    ``height``, ``width`` and ``validation = []`` / ``validation_settings = {}`` set in ``__init__``."""

    generation_frames: int | None = None  # frames it samples (config.validation.num_frames); None: num_frames
    # how its pipelines sample unless told (config.validation: steps, guidance, eta, sampler, negative prompt);
    # None: the pipeline class's
    sampling_defaults: dict | None = None

    @property
    def sample_frames(self) -> int:
        """Frames of the validation samples and of ``jaxvc generate``'s default video."""
        return int(self.generation_frames or self.num_frames)

    @property
    def frame_size(self) -> tuple[int, int]:
        """(height, width) of the training frames in pixels."""
        return self.height, self.width

    def set_validation(self, prompts, references, *, num_inference_steps: int = 25, guidance_scale: float = 8.0,
                       seed: int = 0, sampler: str | None = None, eta: float = 0.0, negative_prompt: str = "") -> None:
        """What ``sample`` generates every ``config.sample_every`` steps: each prompt (with its reference image when
        the method takes one; ``references`` may be empty otherwise). ``sampler``: a name of
        ``jaxvc.diffusion.samplers`` ("" or None for the method's own); ``eta``: DDIM's (applied with DDIM only)."""
        if self.uses_reference and len(prompts) != len(references):
            raise ValueError(f"{self.name} validation: {len(prompts)} prompts but {len(references)} reference images "
                             "(one each)")
        takes_eta = (sampler or "ddim") == "ddim" and not getattr(self, "flow_matching", False)
        if eta and not takes_eta:  # refused, not dropped: the user asked for a stochastic sampler they would not get
            raise ValueError(f"{self.name} validation: eta={eta} is DDIM's; this samples with "
                             f"{sampler or 'its own sampler'}, which takes none (use eta=0)")
        references = list(references) if references else [None] * len(prompts)
        self.validation = list(zip(prompts, references))
        self.validation_settings = dict(num_inference_steps=int(num_inference_steps),
                                        guidance_scale=float(guidance_scale), seed=int(seed), sampler=sampler or None,
                                        eta=float(eta), negative_prompt=str(negative_prompt or ""))

    def sample(self, params, rng):
        """Validation videos ``{"validation": (N, F, S, S, 3)}`` in [-1, 1], traced under the trainer's jit. Each
        uses the seed ``validation_settings["seed"] + i``, not ``rng``: the same noise at every sample point, so the
        videos show what training changed."""
        del rng
        if not self.validation:
            raise ValueError(f"{self.name}: no validation prompts (config.validation.prompts) to sample")
        from jaxvc.models.tokenizer import load_tokenizer

        pipe = self.pipeline(params, self.tokenizer or load_tokenizer(None))
        settings = self.validation_settings
        options = dict(num_frames=self.sample_frames, height=self.height, width=self.width,
                       num_inference_steps=settings["num_inference_steps"], guidance_scale=settings["guidance_scale"],
                       sampler=settings["sampler"], eta=settings.get("eta", 0.0),
                       negative_prompt=settings.get("negative_prompt", ""))
        prompts, references = [prompt for prompt, _ in self.validation], [image for _, image in self.validation]
        if getattr(pipe, "samples_batches", False):  # one sampling loop for all (video i: seed + i), not N loops
            pixels = None if references[0] is None else jnp.stack([jnp.asarray(r, jnp.float32) for r in references])
            return {"validation": jnp.clip(pipe.generate(pixels, prompts, seed=settings["seed"], **options), -1, 1)}
        videos = [pipe.generate(None if reference is None else jnp.asarray(reference, jnp.float32)[None], prompt,
                                seed=settings["seed"] + i, **options)[0]
                  for i, (prompt, reference) in enumerate(self.validation)]
        return {"validation": jnp.clip(jnp.stack(videos), -1.0, 1.0)}
