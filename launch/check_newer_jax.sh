#!/usr/bin/env bash
# Run the test suite against the newest releases instead of the pins: what a user on a GPU machine or a TPU VM gets
# (Python 3.12, a newer jax). The pinned environment (.venv, launch/setup_env.sh) is not touched.
#   bash launch/check_newer_jax.sh [PYTEST ARGS...]      (default: tests, the whole suite)
# Environment: PYTHON (default python3.12), VENV (default .venv-newer), JAX_VERSION (default: the newest jax the
# registry serves for that Python). It installs the package names of launch/requirements-lock.txt and
# requirements-test.txt without their pins, the libtpu that jax's own "tpu" extra names (into $VENV/opt/libtpu, for
# `jaxvc plan`), then runs pytest. torch for Python != 3.11 comes from PyPI as a CUDA build: several GB the first
# time. Re-running reuses the venv (delete it to pick up newer releases).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
case "${1:-}" in -h|--help) sed -n '2,9p' "$0"; exit 0 ;; esac
python_bin="${PYTHON:-python3.12}"
venv="${VENV:-.venv-newer}"
command -v "$python_bin" >/dev/null || { echo "check_newer_jax.sh: '$python_bin' not found (set PYTHON)" >&2; exit 1; }
[ -x "$venv/bin/python" ] || "$python_bin" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --disable-pip-version-check -q)
if [ ! -f "$venv/.jaxvc-newer-installed" ]; then
  # names only: "jax==0.10.2" -> "jax"; comments and blank lines dropped
  mapfile -t names < <(sed -e 's/#.*//' -e 's/[=<>!~].*//' -e 's/[[:space:]]//g' \
    launch/requirements-lock.txt launch/requirements-test.txt | grep -v '^$' | grep -v -x -e jax -e jaxlib)
  jax_pin=()
  [ -n "${JAX_VERSION:-}" ] && jax_pin=("jax==$JAX_VERSION" "jaxlib==$JAX_VERSION")
  [ -z "${JAX_VERSION:-}" ] && jax_pin=(jax jaxlib)
  echo "check_newer_jax.sh: installing the newest releases into $venv" >&2
  "${pip[@]}" "${jax_pin[@]}" "${names[@]}"
  "${pip[@]}" --no-deps open_clip_torch==3.3.0  # the CLIP BPE vocabulary file only (see setup_env.sh)
  # the metrics' reference code (see that file); chainer's sdist builds with launch/constraints-build.txt
  PIP_CONSTRAINT=launch/constraints-build.txt "${pip[@]}" --no-deps -r launch/requirements-test-nodeps.txt
  "${pip[@]}" --no-deps -e .
  libtpu="$("$venv/bin/python" - <<'EOF'
import importlib.metadata as md
for requirement in md.requires("jax") or []:
    spec, _, marker = requirement.partition(";")
    if spec.strip().startswith("libtpu") and "tpu" in marker:
        print(spec.strip().replace(" ", ""))
        break
EOF
)"
  if [ -n "$libtpu" ]; then
    # the registry may not hold the libtpu a brand-new jax names: then only the TPU plan tests are skipped
    "${pip[@]}" --no-deps --upgrade --target "$venv/opt/libtpu" "$libtpu" ||
      echo "check_newer_jax.sh: could not install $libtpu; the TPU plan tests will be skipped" >&2
  else
    echo "check_newer_jax.sh: jax names no libtpu in its tpu extra; the TPU plan tests will be skipped" >&2
  fi
  touch "$venv/.jaxvc-newer-installed"
fi
"$venv/bin/python" - <<'EOF'
import sys, jax, flax, optax, orbax.checkpoint, grain, torch, diffusers, transformers
print(f"check_newer_jax.sh: Python {sys.version.split()[0]}, jax {jax.__version__}, flax {flax.__version__}, "
      f"optax {optax.__version__}, grain {grain.__version__ if hasattr(grain, '__version__') else '?'}, "
      f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}",
      file=sys.stderr)
EOF
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider "${@:-tests}"
