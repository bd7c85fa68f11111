"""The metrics' PyTorch reference code, for the parity tests and ``python -m jaxvc.eval.bench``: it ships inside
packages whose own ``__init__`` pulls in what neither needs (VBench's imports decord, cv2 and torchvision), so the
wanted folder is loaded as a stand-alone package by file path. Installed without dependencies by
``launch/setup_env.sh --test`` (``launch/requirements-test-nodeps.txt``)."""
import importlib.util
import os
import sys


def package_root(package: str) -> str:
    """The folder of an installed package, without importing it (nor failing where ``register_bare`` put it)."""
    if package in sys.modules and getattr(sys.modules[package], "__path__", None):
        return list(sys.modules[package].__path__)[0]  # a bare module has no spec to find
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"{package} is not installed (bash launch/setup_env.sh --test installs it)")
    return list(spec.submodule_search_locations)[0]


def register_bare(package: str, *subpackages: str) -> str:
    """Register ``package`` (and ``package.<sub>`` for each of ``subpackages``) as bare namespaces pointing at their
    folders, so modules that import ``package.x.y`` by absolute name load without ``package/__init__.py`` running.
    Returns the package's folder."""
    import types

    root = package_root(package)
    for name in (package, *(f"{package}.{sub}" for sub in subpackages)):
        if name not in sys.modules:
            bare = types.ModuleType(name)
            bare.__path__ = [os.path.join(root, *name.split(".")[1:])]
            sys.modules[name] = bare
    return root


def load_package_folder(package: str, folder: str, alias: str):
    """Import ``<package>/<folder>`` (a folder of modules with relative imports) as the top-level package ``alias``
    without running ``<package>/__init__.py``; returns the package module (import its submodules as
    ``alias.submodule``)."""
    if alias in sys.modules:
        return sys.modules[alias]
    path = os.path.join(package_root(package), *folder.split("/"))
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


def vbench_amt():
    """MCG-NKU/AMT as VBench 0.1.5 ships it (``third_party/amt``): ``(AMT-S Model class, utils module)`` (the utils
    have ``InputPadder``, ``img2tensor``, ``tensor2img``). Its modules import ``vbench.third_party.amt...`` by
    absolute name, so ``vbench`` is registered as a bare namespace (its ``__init__`` is not run)."""
    import importlib

    root = register_bare("vbench")
    if "_vbench_amt_s" not in sys.modules:
        path = os.path.join(root, "third_party", "amt", "networks", "AMT-S.py")
        module_spec = importlib.util.spec_from_file_location("_vbench_amt_s", path)  # "AMT-S" is no module name
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        sys.modules["_vbench_amt_s"] = module
    return sys.modules["_vbench_amt_s"].Model, importlib.import_module("vbench.third_party.amt.utils.utils")


def insightface_modules():
    """insightface 2.1's pure-Python face pipeline (installed without dependencies): ``(model_zoo.scrfd,
    model_zoo.arcface_onnx, utils.face_align)`` modules. ``insightface`` and the two subpackages are registered as
    bare namespaces: their ``__init__``s import the whole library (GUI, mesh rendering, downloads)."""
    import importlib

    register_bare("insightface", "model_zoo", "utils")
    return tuple(importlib.import_module(f"insightface.{name}")
                 for name in ("model_zoo.scrfd", "model_zoo.arcface_onnx", "utils.face_align"))
