# Sourced by the leased-GPU scripts: the wheels the GPU image lacks (.whl/: diffusers 0.42.1, ml_collections 1.1.0,
# importlib_metadata 8.7.0; not in git: `pip download --no-deps -d .whl diffusers==0.42.1 ml_collections==1.1.0
# importlib_metadata==8.7.0`), the environment, and left N = seconds left of an N-second budget since the start.
start=$(date +%s)
left() { echo $(( $1 - ($(date +%s) - start) )); }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export JAX_COMPILATION_CACHE_DIR=/tmp/jaxcache JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
