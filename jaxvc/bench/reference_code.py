"""The metrics' PyTorch reference code, for the parity tests and ``python -m jaxvc.eval.bench``: it ships inside
packages whose own ``__init__`` pulls in what neither needs (VBench's imports decord, cv2 and torchvision), so the
wanted folder is loaded as a stand-alone package by file path. Installed without dependencies by
``launch/setup_env.sh --test`` (``launch/requirements-test-nodeps.txt``)."""
import importlib.util
import os
import sys


def load_package_folder(package: str, folder: str, alias: str):
    """Import ``<package>/<folder>`` (a folder of modules with relative imports) as the top-level package ``alias``
    without running ``<package>/__init__.py``; returns the package module (import its submodules as
    ``alias.submodule``)."""
    if alias in sys.modules:
        return sys.modules[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"{package} is not installed (bash launch/setup_env.sh --test installs it)")
    path = os.path.join(list(spec.submodule_search_locations)[0], *folder.split("/"))
    init = os.path.join(path, "__init__.py")
    module_spec = importlib.util.spec_from_file_location(alias, init, submodule_search_locations=[path])
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[alias] = module
    module_spec.loader.exec_module(module)
    return module


def vbench_raft():
    """princeton-vl/RAFT's ``core`` as VBench 0.1.5 ships it: ``(RAFT class, InputPadder class)``."""
    load_package_folder("vbench", "third_party/RAFT/core", "vbench_raft_core")
    import importlib

    raft = importlib.import_module("vbench_raft_core.raft")
    utils = importlib.import_module("vbench_raft_core.utils_core.utils")
    return raft.RAFT, utils.InputPadder


def cdfvd_i3d():
    """cd-fvd 0.1.1's copy of piergiaj's I3D (TATS's): ``(pytorch_i3d module, utils module)`` (``InceptionI3d``;
    ``preprocess_i3d`` and ``frechet_distance``)."""
    import importlib

    load_package_folder("cdfvd", "third_party/i3d", "_cdfvd_i3d")
    return importlib.import_module("_cdfvd_i3d.pytorch_i3d"), importlib.import_module("_cdfvd_i3d.utils")
