"""jaxvc: subject-driven customized video generation in JAX/Flax.

Exact versions used in testing are pinned in launch/requirements-lock.txt (runtime) and
launch/requirements-test.txt (the PyTorch reference side); `bash launch/setup_env.sh` installs them into .venv.
The ranges below are what the code supports (Python 3.11 with jax 0.10.x, Python 3.12 with newer jax).
"""
from setuptools import find_packages, setup

setup(
    name="jaxvc",
    version="0.1.0",
    description="Subject-driven customized video generation (VideoMaker, CustomCrafter, Still-Moving, MicroCinema, "
                "disentangled S2V) in JAX/Flax",
    python_requires=">=3.11",
    packages=find_packages(include=["jaxvc", "jaxvc.*"]),
    include_package_data=True,
    install_requires=[
        "jax>=0.10.2", "flax>=0.12.8", "optax>=0.2.8", "orbax-checkpoint>=0.12.8", "grain>=0.2.18",
        "ml-collections>=1.1.0", "tensorflow-datasets>=4.9.10", "safetensors>=0.8.0", "tokenizers>=0.23",
        "numpy>=2.0", "pillow>=11", "av>=14", "imageio>=2.38", "tensorboardX>=2.6", "tqdm>=4.66", "absl-py>=2.1",
    ],
    extras_require={
        "test": ["torch>=2.13", "diffusers>=0.42.1", "transformers>=5.23", "pytest>=8", "nbclient>=0.10"],
    },
    entry_points={"console_scripts": ["jaxvc=jaxvc.cli:main"]},
)
