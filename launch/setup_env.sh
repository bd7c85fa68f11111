#!/usr/bin/env bash
# Make (or reuse) the project's virtual environment at .venv with the pinned versions, then install jaxvc into it.
#   bash launch/setup_env.sh          runtime dependencies (enough for `jaxvc demo`, training, generation)
#   bash launch/setup_env.sh --test   also the PyTorch reference side (torch, diffusers, transformers) and pytest
#   bash launch/setup_env.sh --gpu-compile   also jax's CUDA plugin in .venv/opt/jax-cuda (~5 GB), for
#                                     `python -m jaxvc.bench --compile-for h200` on a CPU host (can go with --test)
# Re-running is cheap: a stamp file records what was installed and nothing is reinstalled unless the pins change.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
want_test=0
want_gpu_compile=0
for arg in "$@"; do
  case "$arg" in
    --test) want_test=1 ;;
    --gpu-compile) want_gpu_compile=1 ;;
    -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
    *) echo "setup_env.sh: unknown argument '$arg' (expected --test or --gpu-compile)" >&2; exit 2 ;;
  esac
done
python_bin="${PYTHON:-python3}"
if ! "$python_bin" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'; then
  echo "setup_env.sh: jaxvc needs Python >= 3.11; '$python_bin' is $("$python_bin" --version 2>&1)" >&2; exit 1
fi
[ -x .venv/bin/python ] || "$python_bin" -m venv .venv
pip=(.venv/bin/python -m pip install --disable-pip-version-check -q)
files=(launch/requirements-lock.txt setup.py)
[ "$want_test" = 1 ] && files+=(launch/requirements-test.txt launch/requirements-test-nodeps.txt
                                 launch/constraints-build.txt launch/requirements-libtpu.txt)
[ "$want_gpu_compile" = 1 ] && files+=(launch/requirements-cuda-compile.txt)
stamp=".venv/.jaxvc-installed-$(cat "${files[@]}" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "setup_env.sh: installing pinned dependencies into .venv (a minute or two the first time)" >&2
  reqs=(-r launch/requirements-lock.txt)
  [ "$want_test" = 1 ] && reqs+=(-r launch/requirements-test.txt)
  "${pip[@]}" "${reqs[@]}"
  # open_clip_torch ships the real CLIP BPE vocabulary (bpe_simple_vocab_16e6.txt.gz); jaxvc only reads that file,
  # so the wheel goes in without its dependencies (torchvision has no CPU build here).
  "${pip[@]}" --no-deps open_clip_torch==3.3.0
  "${pip[@]}" --no-deps -e .
  if [ "$want_test" = 1 ]; then
    # PIP_CONSTRAINT reaches the isolated build environments too: chainer's sdist needs a setuptools that still
    # ships pkg_resources
    PIP_CONSTRAINT=launch/constraints-build.txt "${pip[@]}" --no-deps -r launch/requirements-test-nodeps.txt
    # libtpu for `jaxvc plan`, outside site-packages (see launch/requirements-libtpu.txt); emptied first, since pip's
    # --target keeps an older version's metadata beside the new one
    rm -rf .venv/opt/libtpu
    "${pip[@]}" --no-deps --target .venv/opt/libtpu -r launch/requirements-libtpu.txt
  fi
  if [ "$want_gpu_compile" = 1 ]; then
    # jax's CUDA plugin for `jaxvc bench --compile-for`, outside site-packages (launch/requirements-cuda-compile.txt)
    echo "setup_env.sh: installing jax's CUDA plugin into .venv/opt/jax-cuda (about 5 GB)" >&2
    "${pip[@]}" --no-deps --upgrade --target .venv/opt/jax-cuda -r launch/requirements-cuda-compile.txt
  fi
  touch "$stamp"
fi
