"""Which all-gathers the Wan 2.1 I2V 14B sampling step's TPU program holds (v5e:2x4, fsdp=8, 81 x 480 x 832, splash),
summed by result shape and op name: `.venv/bin/python bench_results/tpu-plan-2026-12-06-sampling/allgather_breakdown.py`
(about 2-3 minutes on a 2-core VM; output in allgather_breakdown.txt)."""
import collections
import re

from jaxvc.plan import hlo, sampling
from jaxvc.plan.hardware import slice_devices

tpu = slice_devices("v5e:2x4")
# reuse plan_sampling's pieces by monkeypatching compiled_figures to keep the HLO text
texts = []
orig = sampling.compiled_figures
def keep(compiled, tpu_slice, capacity, keep_hlo=False):
    texts.append(compiled.as_text())
    return orig(compiled, tpu_slice, capacity)
sampling.compiled_figures = keep
r = sampling.plan_sampling("wan21_i2v_14b", tpu, {"fsdp": 8}, frames=81, height=480, width=832,
                           attention_backend="splash")
text = texts[0]
# the planner's own reading of an instruction (jaxvc/plan/hlo.py): a channel counts once, as the TPU compiler copies
# a large collective into each fusion of its chain (start, continuations, done)
sizes = collections.Counter(); counts = collections.Counter(); channels = set()
for line in text.splitlines():
    match = hlo._INSTRUCTION.match(line)
    if not match or match.group("op") != "all-gather":
        continue
    channel = hlo._CHANNEL.search(line)
    if channel is not None:
        if channel.group(1) in channels:
            continue
        channels.add(channel.group(1))
    arrays = hlo._arrays_bytes(match.group("shape"))
    nbytes = arrays[-1]  # the gathered result (an async start's tuple ends with it)
    op = re.search(r'op_name="([^"]+)"', line)
    name = re.sub(r"blocks_\d+", "blocks_N", op.group(1) if op else "?")
    shape = re.search(r"\w+\[[\d,]*\]", match.group("shape")).group(0)
    key = (shape, name[-110:])
    sizes[key] += nbytes; counts[key] += 1
total = sum(sizes.values())
print("all-gather GiB", total / 2**30)
for key, b in sizes.most_common(25):
    print(f"{b / 2**30:8.2f} GiB {counts[key]:4d}x {key[0]:>28} {key[1]}")
