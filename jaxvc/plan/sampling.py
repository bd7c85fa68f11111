"""Plan a Wan DiT's sampling on a TPU slice from a CPU (``jaxvc plan --sample VARIANT``).

Sampling runs the DiT once per step on the guided batch (2: unconditional and conditional halves), so one step
compiled for the slice says what sampling costs: ``plan_sampling`` lowers the DiT's forward for abstract inputs
with the inference layout of ``jaxvc generate --mesh`` (``jaxvc/parallel/inference.py``: parameters placed by the
rule table, the batch whole, the video's tokens over sequence x fsdp) and reads memory per device, FLOPs,
collectives and the roofline step time off the TPU executable, as ``jaxvc plan`` does for train steps
(``planner.py``). Nothing is initialised. The text encoder and the VAE run once per video, outside the loop.

    jaxvc plan --sample wan21_i2v_14b --topology v5e:2x4 --mesh fsdp=8 --frames 81 --height 480 --width 832 \\
        --dtype bfloat16 --steps 40 [--memory-only]
"""
from __future__ import annotations

import time
from typing import Mapping

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec

from jaxvc.parallel.inference import INFERENCE_RULES
from jaxvc.parallel.mesh import activate, make_mesh
from jaxvc.parallel.rules import param_shardings
from jaxvc.plan.hardware import Slice
from jaxvc.plan.planner import PlanError, compiled_figures, mesh_label, refused_for_memory, resolve_mesh

TEXT_TOKENS = 512  # UMT5's max_sequence_length in Wan's pipelines
IMAGE_TOKENS = 257  # CLIP ViT-H/14 at 224 px: class token + 16 x 16 patches (FLF2V: two images, 514)
GUIDED_BATCH = 2


def latent_grid(variant: str, frames: int, height: int, width: int) -> tuple[int, int, int]:
    """(F', h, w) latents of a video: the Wan 2.1 VAE (8x, 4x in time) or, for the 48-channel TI2V-5B, Wan 2.2's
    (16x). Raises PlanError for sizes the VAE and the patches do not divide."""
    factor = 16 if "ti2v" in variant else 8
    if (frames - 1) % 4 or frames < 1:
        raise PlanError(f"--frames {frames}: the Wan VAE codes 1 + 4k frames (e.g. 49, 81)")
    for name, size in (("height", height), ("width", width)):
        if size % (2 * factor):
            raise PlanError(f"--{name} {size} must be a multiple of {2 * factor} (the VAE's {factor}x and the "
                            "DiT's 2x2 patches)")
    return 1 + (frames - 1) // 4, height // factor, width // factor


def plan_sampling(variant: str, tpu_slice: Slice, mesh_sizes: Mapping[str, int], *, frames: int, height: int,
                  width: int, dtype: str = "bfloat16", steps: int = 50, attention_backend: str = "xla",
                  hbm_bytes: int | None = None, **config_overrides) -> dict:
    """One guided denoising step of the Wan DiT ``variant`` (``config_overrides``: fields of its ``WanConfig``) at
    ``frames`` x ``height`` x ``width`` compiled for ``tpu_slice`` on this mesh; the report dict
    (``planner.plan_layout``'s fields, plus ``tokens`` and the roofline time of ``steps`` steps, ``sampling_s``)."""
    from jaxvc.models.wan import WanTransformer3D, abstract_wan_params, wan_config
    from jaxvc.train.checkpoint import abstract_with_shardings
    from jaxvc.train.state import count_params

    from jaxvc.models.weight_storage import store_weights

    config = wan_config(variant, dtype=jnp.dtype(dtype), attention_backend=attention_backend, **config_overrides)
    grid = latent_grid(variant, frames, height, width)
    sizes = resolve_mesh(mesh_sizes, tpu_slice)
    mesh = make_mesh(sizes, devices=tpu_slice.devices)
    capacity = int(hbm_bytes) if hbm_bytes else tpu_slice.device_hbm_bytes
    tokens = grid[0] * (grid[1] // 2) * (grid[2] // 2)
    report = {"topology": tpu_slice.topology, "generation": tpu_slice.chip.generation,
              "chips": tpu_slice.num_chips, "devices": len(tpu_slice.devices), "mesh": sizes,
              "mesh_label": mesh_label(sizes), "global_batch": GUIDED_BATCH,
              "batch_per_chip": GUIDED_BATCH / tpu_slice.num_chips, "variant": variant,
              "video": [frames, height, width], "latents": list(grid), "tokens": tokens, "steps": steps,
              "compute_dtype": dtype, "hbm_capacity": capacity}

    abstract = abstract_wan_params(config)["params"]  # boxed: the logical names place each parameter
    report["params"] = count_params(nn.unbox(abstract))
    # the weights as `jaxvc generate --dtype` keeps them: matrices in dtype, the float32 parts and vectors float32
    params = abstract_with_shardings(store_weights(nn.unbox(abstract), jnp.dtype(dtype)),
                                     param_shardings(abstract, mesh, INFERENCE_RULES))
    whole = NamedSharding(mesh, PartitionSpec())
    inputs = [jax.ShapeDtypeStruct((GUIDED_BATCH, *grid, config.in_channels), jnp.float32, sharding=whole),
              jax.ShapeDtypeStruct((GUIDED_BATCH,), jnp.float32, sharding=whole),
              jax.ShapeDtypeStruct((GUIDED_BATCH, TEXT_TOKENS, config.text_dim), jnp.dtype(dtype), sharding=whole)]
    if config.image_dim is not None:
        image_tokens = config.pos_embed_seq_len or IMAGE_TOKENS
        inputs.append(jax.ShapeDtypeStruct((GUIDED_BATCH, image_tokens, config.image_dim), jnp.dtype(dtype),
                                           sharding=whole))
    transformer = WanTransformer3D(config)

    def denoise(params, latents, timesteps, text, image=None):  # one guided step's DiT call
        return transformer.apply({"params": params}, latents, timesteps, text, image)

    start = time.perf_counter()
    with activate(mesh, INFERENCE_RULES):
        try:
            compiled = jax.jit(denoise).lower(params, *inputs).compile()
        except Exception as err:  # the TPU compiler refuses programs that overflow HBM (or --memory-only's cap)
            report["compile_s"] = time.perf_counter() - start
            if not refused_for_memory(report, err, (params, inputs), capacity):
                raise
            return report
    report["compile_s"] = time.perf_counter() - start
    report.update(compiled_figures(compiled, tpu_slice, capacity))
    if report["roofline"]:
        report["sampling_s"] = steps * report["roofline"]["step_s"]
    return report
