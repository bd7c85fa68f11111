"""NVIDIA GPUs described for XLA's compiler, so that a program compiles for one on a host without it.

XLA's GPU compiler needs a target description (``stream_executor.GpuTargetConfigProto``, as text): SM count, clock,
shared memory, L2, memory size and bandwidth, compute capability, cuDNN and CUDA versions. jax builds a device-less
topology from it (``jax.experimental.topologies.get_topology_desc(platform="cuda", target_config=...)``) when its
CUDA plugin is installed (``pip install "jax[cuda12]"``), even with no GPU and no driver. Programs whose arguments
are placed on that topology's device then compile with the real GPU pipeline: fusion, layout assignment, cuDNN and
cuBLAS custom calls, buffer assignment, and so XLA's memory plan of one call. Autotuning needs the device and is
skipped (heuristic choices), so the plan can differ slightly from the device's.

Other GPUs: wherever a target name is taken, a file in the same text format works (the format of XLA's
``xla/tools/hlo_opt/gpu_specs/*.txtpb``), with the figures of that GPU.
"""
from __future__ import annotations

import dataclasses
import os


@dataclasses.dataclass(frozen=True)
class GpuTarget:
    name: str
    description: str
    compute_capability: str  # "9.0"
    sm_count: int
    fpus_per_sm: int
    clock_ghz: float
    memory_bytes: int
    memory_bandwidth: float  # bytes/s
    l2_bytes: int
    shared_memory_per_sm: int
    shared_memory_per_block_optin: int
    peak_bf16_flops: float = 0.0   # dense bf16 tensor-core peak, FLOP/s (datasheet)
    nvlink_bandwidth: float = 0.0  # bytes/s, all NVLink links of one GPU together, both directions (datasheet)

    def target_config(self, cudnn: str = "9.19", cuda: str = "12.8") -> str:
        """The ``GpuTargetConfigProto`` text of this GPU with the given cuDNN and CUDA runtime versions."""
        major, minor = (int(part) for part in self.compute_capability.split("."))
        cudnn_major, cudnn_minor = (int(part) for part in cudnn.split(".")[:2])
        cuda_major, cuda_minor = (int(part) for part in cuda.split(".")[:2])
        return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {self.shared_memory_per_sm}
  threads_per_core_limit: 2048
  core_count: {self.sm_count}
  fpus_per_core: {self.fpus_per_sm}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(self.memory_bandwidth)}
  l2_cache_size: {self.l2_bytes}
  clock_rate_ghz: {self.clock_ghz}
  device_memory_size: {self.memory_bytes}
  shared_memory_per_block_optin: {self.shared_memory_per_block_optin}
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: {cudnn_major} minor: {cudnn_minor} }}
runtime_version {{ major: {cuda_major} minor: {cuda_minor} }}
device_description_str: "{self.description}"
"""


# The figures a device reports of itself (the H100's as XLA's own tests and users' dumps of real devices show them;
# the H200 is the same GH100 chip with 141 GB at 4.8 TB/s, the memory total being what the leased H200 reported:
# 143771 MiB; the A100 from NVIDIA's A100 datasheet and the SM 8.0 tuning guide). Peaks and NVLink from the H100/H200
# SXM and A100 SXM datasheets: 989 / 989 / 312 TFLOP/s dense bf16, 900 / 900 / 600 GB/s NVLink.
TARGETS = {
    "h100": GpuTarget("h100", "NVIDIA H100 80GB HBM3", "9.0", sm_count=132, fpus_per_sm=128, clock_ghz=1.98,
                      memory_bytes=84_929_347_584, memory_bandwidth=3.35232e12, l2_bytes=52_428_800,
                      shared_memory_per_sm=233_472, shared_memory_per_block_optin=232_448,
                      peak_bf16_flops=989e12, nvlink_bandwidth=900e9),
    "h200": GpuTarget("h200", "NVIDIA H200", "9.0", sm_count=132, fpus_per_sm=128, clock_ghz=1.98,
                      memory_bytes=143_771 * 2 ** 20, memory_bandwidth=4.8e12, l2_bytes=52_428_800,
                      shared_memory_per_sm=233_472, shared_memory_per_block_optin=232_448,
                      peak_bf16_flops=989e12, nvlink_bandwidth=900e9),
    "a100": GpuTarget("a100", "NVIDIA A100-SXM4-80GB", "8.0", sm_count=108, fpus_per_sm=64, clock_ghz=1.41,
                      memory_bytes=85_899_345_920, memory_bandwidth=2.039e12, l2_bytes=41_943_040,
                      shared_memory_per_sm=167_936, shared_memory_per_block_optin=166_912,
                      peak_bf16_flops=312e12, nvlink_bandwidth=600e9),
}


@dataclasses.dataclass(frozen=True)
class ResolvedTarget:
    name: str
    config_text: str
    compute_capability: str
    memory_bytes: int | None


def resolve_target(name_or_path: str, *, cudnn: str = "9.19", cuda: str = "12.8") -> ResolvedTarget:
    """A target by name (``TARGETS``) or a ``GpuTargetConfigProto`` text file saved from a real device."""
    if name_or_path in TARGETS:
        target = TARGETS[name_or_path]
        return ResolvedTarget(target.name, target.target_config(cudnn, cuda), target.compute_capability,
                              target.memory_bytes)
    if not os.path.isfile(name_or_path):
        raise ValueError(f"GPU target {name_or_path!r}: not one of {sorted(TARGETS)} and not a file (a "
                         f"GpuTargetConfigProto text, the format of XLA's gpu_specs/*.txtpb)")
    with open(name_or_path) as handle:
        text = handle.read()
    return ResolvedTarget(os.path.basename(name_or_path), text, _field_capability(text, name_or_path),
                          _field_int(text, "device_memory_size"))


def _field_int(text: str, field: str) -> int | None:
    import re

    match = re.search(rf"\b{field}\s*:\s*(\d+)", text)
    return int(match.group(1)) if match else None


def _field_capability(text: str, path: str) -> str:
    import re

    block = re.search(r"cuda_compute_capability\s*\{([^}]*)\}", text)
    if block is None:
        raise ValueError(f"{path}: no cuda_compute_capability {{ major: .. minor: .. }} block: not an NVIDIA GPU "
                         f"target config")
    major, minor = _field_int(block.group(1), "major") or 0, _field_int(block.group(1), "minor") or 0
    return f"{major}.{minor}"


PLUGIN_FOLDER = os.path.join("opt", "jax-cuda")  # under the venv: where `launch/setup_env.sh --gpu-compile` puts it


def device_sharding(target: ResolvedTarget):
    """A replicated ``NamedSharding`` on the one device of a device-less topology of ``target``."""
    import jax
    from jax.experimental import topologies

    mesh = topologies.make_mesh(topology_description(target), (1,), ("devices",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def topology_description(target: ResolvedTarget, hosts: int = 1, gpus_per_host: int = 1):
    """The device-less topology of ``hosts`` x ``gpus_per_host`` GPUs of ``target`` (its ``.devices`` are abstract
    devices a mesh can be built over; the devices of host i have process_index i)."""
    import sys

    import jax
    from jax.experimental import topologies

    # jax checks the plugin's CUDA libraries against the driver when it registers the plugin; with no driver the
    # check fails (loudly) and the plugin is left out, though a device-less compile needs no driver
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    folder = os.path.join(sys.prefix, PLUGIN_FOLDER)
    if os.path.isdir(folder) and folder not in sys.path:
        sys.path.append(folder)  # this process only (see launch/requirements-cuda-compile.txt)

    def topology():
        return topologies.get_topology_desc(platform="cuda", target_config=target.config_text,
                                            topology=f"1x{hosts}x{gpus_per_host}")

    try:
        try:
            description = topology()
        except NotImplementedError:  # "topology not implemented for cuda": the plugin did not register
            if not _register_cuda_plugin():
                raise
            description = topology()
    except Exception as error:
        raise RuntimeError(f"cannot build a device-less CUDA topology for {target.name} "
                           f"({type(error).__name__}: {str(error).strip().splitlines()[0][:200] if str(error) else ''})"
                           f". Compiling for a GPU without one needs jax's CUDA plugin (no GPU or driver): "
                           f"`bash launch/setup_env.sh --gpu-compile` puts it in .venv/{PLUGIN_FOLDER}, or pip "
                           f"install \"jax[cuda12]=={jax.__version__}\" in a separate venv") from error
    return description


def _register_cuda_plugin() -> bool:
    """Register jax's CUDA plugin with its CUDA version check skipped. jax registers the plugin when its backends
    start, after a check of the installed CUDA against the driver; with no driver (a CPU host) the check fails and
    the plugin, with its topology factory, is left out, though a device-less compile needs no driver."""
    import importlib

    for version in (13, 12):
        try:
            plugin = importlib.import_module(f"jax_plugins.xla_cuda{version}")
        except ImportError:
            continue
        plugin.initialize()
        _complete_late_registration("cuda")
        return True
    return False


def _complete_late_registration(platform: str) -> None:
    """Give a plugin registered after jax started what jax gives each plugin it discovers at start: the registrations
    other modules asked for (FFI targets, custom-call partitioners).

    Those asked for before the start are kept in jax's list and replayed here. Those asked for after it were applied
    to the plugins present then and not kept; jax's custom partitioning is one. jax's cuDNN attention uses it under a
    sharded mesh, which fails to compile without it ("No registered implementation for custom call to
    CustomSPMDPartitioning for platform CUDA"), so it is registered here unless the list already holds it."""
    from jax._src import custom_partitioning as partitioning
    from jax._src import xla_bridge
    from jax._src.lib import xla_client

    c_api = xla_bridge._backend_factories[platform].c_api
    callbacks = list(xla_bridge._plugin_callbacks)
    for callback in callbacks:
        callback(c_api=c_api)
    name = partitioning._CUSTOM_PARTITIONING_CALL_NAME
    if not any(getattr(callback, "keywords", {}).get("name") == name for callback in callbacks):
        xla_client.register_custom_call_partitioner(
            name=name, prop_user_sharding=partitioning._custom_partitioning_propagate_user_sharding,
            partition=partitioning._custom_partitioning_partition,
            infer_sharding_from_operands=partitioning._custom_partitioning_infer_sharding_from_operands,
            can_side_effecting_have_replicated_sharding=True, c_api=c_api)
