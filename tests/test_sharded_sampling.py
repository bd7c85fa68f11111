"""Sampling on a device mesh (``pipe.shard``, ``jaxvc generate --mesh``; ``jaxvc/parallel/inference.py``) gives
what one device gives. One subprocess with 8 simulated CPU devices, mesh fsdp 4 x sequence 2: a Wan FLF2V folder
(CLIP image tokens, the concatenated condition), a two-expert Wan 2.2 T2V folder (the ``lax.cond`` between the
experts) and the disentangled S2V method (its reference token stream); latents and decoded videos, with every
parameter group on all 8 devices and the DiT's sharded."""
from tests.multidevice import run_with_devices

SHARDED_SAMPLING = """
import tempfile
from pathlib import Path
import jax, jax.numpy as jnp, numpy as np
from jaxvc.methods import build_method
from jaxvc.pipeline import CustomVideoPipeline, load_reference_image
from tests.conftest import relative_error
from tests.test_wan_i2v_pipeline import NEGATIVE, PROMPT, SMALL, _folder, _image
from tests.tiny_models import method_config

def check(name, pipe, dit_group, reference, **kwargs):
    single = [np.asarray(pipe.generate(reference, PROMPT, decode=decode, **kwargs)) for decode in (False, True)]
    pipe.shard("fsdp=4,sequence=2")
    for group, tree in pipe.params.items():
        assert {len(leaf.sharding.device_set) for leaf in jax.tree.leaves(tree)} == {8}, group
    assert any(not leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(dit_group(pipe.params))), name
    sharded = [np.asarray(pipe.generate(reference, PROMPT, decode=decode, **kwargs)) for decode in (False, True)]
    errors = [relative_error(a, b) for a, b in zip(sharded, single)]
    print(name, "sharded vs one device: latents %.1e, video %.1e" % tuple(errors))
    assert max(errors) < 1e-5, errors

root = Path(tempfile.mkdtemp())
first, last = (jnp.asarray(load_reference_image(_image(seed, 32), 32, 32))[None] for seed in (0, 1))
wan = dict(SMALL, negative_prompt=NEGATIVE, seed=3, num_inference_steps=3)
check("Wan FLF2V", CustomVideoPipeline.from_pretrained(_folder(root, "flf2v")[0]), lambda p: p["transformer"], first,
      last_image=last, **wan)
check("Wan 2.2 T2V A14B", CustomVideoPipeline.from_pretrained(_folder(root, "t2v-a14b")[0]),
      lambda p: p["transformer_2"], None, **wan)
method = build_method(method_config("configs/disentangled_s2v.py:tiny"))
params = method.init_params(jax.random.key(0))
check("S2V", method.pipeline(params), lambda p: p["params"]["transformer"], first, num_frames=5, height=32, width=32,
      num_inference_steps=3, seed=1)
print("SHARDED_OK")
"""


def test_sharded_sampling_equals_one_device():
    run_with_devices(SHARDED_SAMPLING, devices=8)
