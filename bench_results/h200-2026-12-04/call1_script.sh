#!/bin/bash
# One leased-GPU session: the SD1.5 benchmark table (torch eager, jaxvc, torch.compile), then jaxvc variants.
set -u
start=$(date +%s)
left() { echo $(( $1 - ($(date +%s) - start) )); }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export JAX_COMPILATION_CACHE_DIR=/tmp/jaxcache JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv | tee $OUT/gpu.txt
python3 -c "import sys, jax, flax, optax, torch, diffusers, transformers; print(sys.version.split()[0], 'jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, jax.devices())" 2>&1 | tee $OUT/versions.txt
echo "setup $(( $(date +%s) - start )) s"
# the table: 256 then 512 (torch eager, jaxvc), then torch.compile; what is measured is written after each row
timeout $(left 470) python3 -m jaxvc.bench --size sd15 --image-size 256 512 --warmup 1 --iters 5 --torch-compile \
  --time-budget $(left 400) --out $OUT/sd15_h200 2>&1 | grep -v "^WARNING: All log messages" | tee $OUT/bench.log
echo "main done at $(( $(date +%s) - start )) s"
# variants of the jaxvc path (GPU switches): XLA einsum attention instead of cuDNN at 256 px
if [ "$(left 560)" -gt 100 ]; then
  timeout $(left 560) python3 -m jaxvc.bench --size sd15 --image-size 256 --no-torch --workloads train sampling \
    --attention xla --warmup 1 --iters 3 --out $OUT/sd15_h200_xla_attention 2>&1 | tee $OUT/variant_xla.log
fi
if [ "$(left 570)" -gt 110 ]; then
  timeout $(left 570) python3 -m jaxvc.bench --size sd15 --image-size 512 --no-torch --workloads train \
    --remat dots_saveable --warmup 1 --iters 3 --out $OUT/sd15_h200_dots_saveable 2>&1 | tee $OUT/variant_remat.log
fi
echo "all done at $(( $(date +%s) - start )) s"
