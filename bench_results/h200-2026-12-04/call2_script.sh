#!/bin/bash
# Second leased-GPU call: jaxvc at 256 px (torch eager 256 was measured in the first call), then 512 px side by side.
set -u
start=$(date +%s)
left() { echo $(( $1 - ($(date +%s) - start) )); }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export JAX_COMPILATION_CACHE_DIR=/tmp/jaxcache JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
echo "setup $(( $(date +%s) - start )) s"
timeout $(left 290) python3 -m jaxvc.bench --size sd15 --image-size 256 --no-torch --warmup 1 --iters 3 \
  --time-budget $(left 200) --out $OUT/sd15_h200_jaxvc256 2>&1 | grep -v "^WARNING: All log" | tee $OUT/bench256.log
echo "256 done at $(( $(date +%s) - start )) s"
if [ "$(left 300)" -gt 60 ]; then
  timeout $(left 300) python3 -m jaxvc.bench --size sd15 --image-size 512 --workloads train sampling --warmup 1 \
    --iters 3 --time-budget $(left 240) --out $OUT/sd15_h200_512 2>&1 | grep -v "^WARNING: All log" | tee $OUT/bench512.log
fi
echo "all done at $(( $(date +%s) - start )) s"
