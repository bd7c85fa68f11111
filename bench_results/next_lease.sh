#!/bin/bash
# The next leased-GPU call for issue 6, prepared so one call (run(..., timeout_s=590)) fills the missing rows:
#   1. jaxvc train step @256 and @512 (never measured: cuDNN refused the odd cross-attention length in session 9),
#      and jaxvc sampling @256 again (session 11 changed the einsum attention the motion modules use);
#   2. torch eager + torch.compile for the train step and sampling @256 (torch.compile never measured on a GPU).
# Each bench call writes its JSON after every measurement, so whatever finishes before the timeout comes back.
# Checked on a CPU on 2026-12-05 with the GPU image's jax 0.11.2: every workload here lowers and compiles for an H200
# (`--lower-for cuda`, `--compile-for h200`); XLA plans 10.7 / 13.7 GiB for the train step at 256 / 512 px.
# Run from the repository root as `bash bench_results/next_lease.sh`, with .whl/ carried (see lease_env.sh).
set -u
source "$(dirname "$0")/lease_env.sh"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/gpu.txt
python3 -c "import jax, torch; print(jax.__version__, torch.__version__)" > $OUT/versions.txt
echo "setup $(( $(date +%s) - start )) s"
timeout $(left 330) python3 -m jaxvc.bench --size sd15 --image-size 256 512 --no-torch --workloads train sampling \
  --warmup 1 --iters 3 --time-budget $(left 240) --out $OUT/sd15_jaxvc 2>&1 | grep -v "^WARNING: All log" \
  | tee $OUT/jaxvc.log
echo "jaxvc done at $(( $(date +%s) - start )) s"
if [ "$(left 570)" -gt 90 ]; then
  timeout $(left 570) python3 -m jaxvc.bench --size sd15 --image-size 256 --workloads train sampling --torch-compile \
    --warmup 1 --iters 3 --time-budget $(left 450) --out $OUT/sd15_torch256 2>&1 | grep -v "^WARNING: All log" \
    | tee $OUT/torch256.log
fi
echo "all done at $(( $(date +%s) - start )) s"
