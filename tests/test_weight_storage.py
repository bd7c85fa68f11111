"""``jaxvc generate --dtype bfloat16`` keeps the weight matrices of the parts that compute in bf16 (the UNet; the Wan
DiT and UMT5) in bf16, and generates bit for bit the same videos as with float32 weights, at about half their
memory: Wan 2.1 FLF2V (the DiT with its image embedder and position table, UMT5, the VAE and CLIP vision tower kept
in float32) and AnimateDiff. The float32 islands (Wan's timestep MLP, modulation tables and image position table,
T5's position bias) stay float32: rounding them would change the videos, which the first test shows."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import traverse_util

from jaxvc.models.weight_storage import KEEP_FLOAT32, store_weights
from jaxvc.train.state import tree_bytes

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

SETTINGS = dict(num_frames=5, height=32, width=32, num_inference_steps=3, guidance_scale=5.0, seed=3)


def dtypes(tree) -> dict:
    return {"/".join(map(str, path)): leaf.dtype for path, leaf in traverse_util.flatten_dict(tree).items()}


def test_matrices_are_rounded_and_the_float32_parts_kept():
    rng = np.random.default_rng(0)
    tree = {"blocks_0": {"attn1": {"to_q": {"kernel": rng.normal(size=(4, 4)).astype(np.float32),
                                            "bias": rng.normal(size=4).astype(np.float32)}},
                         "scale_shift_table": rng.normal(size=(1, 6, 4)).astype(np.float32)},
            "condition_embedder": {"time_embedder": {"linear_1": {"kernel": np.ones((3, 4), np.float32)}}},
            "ids": np.arange(6, dtype=np.int32).reshape(2, 3), "empty": {}}
    stored = store_weights(tree, jnp.bfloat16)
    kernel = stored["blocks_0"]["attn1"]["to_q"]["kernel"]
    assert isinstance(kernel, np.ndarray) and kernel.dtype == jnp.bfloat16  # rounded on the host
    np.testing.assert_array_equal(np.asarray(kernel, np.float32),
                                  np.asarray(jnp.asarray(tree["blocks_0"]["attn1"]["to_q"]["kernel"])
                                             .astype(jnp.bfloat16), np.float32))  # as XLA rounds (to nearest even)
    assert stored["blocks_0"]["attn1"]["to_q"]["bias"].dtype == np.float32
    assert stored["blocks_0"]["scale_shift_table"].dtype == np.float32
    assert stored["condition_embedder"]["time_embedder"]["linear_1"]["kernel"].dtype == np.float32
    assert stored["ids"].dtype == np.int32 and stored["empty"] == {}
    assert {"time_embedder", "scale_shift_table", "relative_attention_bias", "pos_embed"} <= KEEP_FLOAT32
    assert store_weights(tree, None) is tree
    abstract = store_weights({"k": jax.ShapeDtypeStruct((2, 3), jnp.float32)}, jnp.bfloat16)
    assert isinstance(abstract["k"], jax.ShapeDtypeStruct) and abstract["k"].dtype == jnp.bfloat16
    assert jax.eval_shape(lambda t: store_weights(t, jnp.bfloat16), {"k": jnp.zeros((2, 3))})["k"].dtype == \
        jnp.bfloat16  # traced (the train state's abstract shape)


def _same_videos_with_float32_weights(pipe, generate, float32_params):
    """``generate(pipe)`` with ``pipe``'s stored weights and with float32 weights in their place: bitwise equal
    (returned)."""
    stored_videos = generate(pipe)
    stored_params = pipe.params
    pipe.params = float32_params
    pipe.forget_compiled()
    np.testing.assert_array_equal(stored_videos, generate(pipe))
    pipe.params = stored_params
    pipe.forget_compiled()
    return stored_videos


def test_wan_flf2v_generates_the_same_video_with_bf16_weights(tmp_path):
    from jaxvc.pipeline import CustomVideoPipeline, load_reference_image
    from tests.test_wan_i2v_pipeline import _folder, _image

    folder, _ = _folder(tmp_path, "flf2v")
    pipe = CustomVideoPipeline.from_pretrained(folder, dtype="bfloat16")
    full = CustomVideoPipeline.from_pretrained(folder)  # float32 weights (and compute)
    stored = dtypes(pipe.params["transformer"])
    assert stored["blocks_0/attn1/to_q/kernel"] == jnp.bfloat16 and stored["blocks_0/attn1/to_q/bias"] == jnp.float32
    assert stored["blocks_0/scale_shift_table"] == jnp.float32
    assert stored["condition_embedder/image_embedder/pos_embed"] == jnp.float32  # added to float32 tokens
    assert stored["condition_embedder/image_embedder/ff/net_0/proj/kernel"] == jnp.bfloat16
    assert all(v == jnp.float32 for k, v in stored.items() if "time_embedder" in k)
    text = dtypes(pipe.params["text_encoder"])
    assert text["shared/embedding"] == jnp.bfloat16
    assert all(v == jnp.float32 for k, v in text.items() if "relative_attention_bias" in k)
    for part in ("vae", "image_encoder"):  # they compute in float32
        assert set(dtypes(pipe.params[part]).values()) == {jnp.dtype(jnp.float32)}
    halved = ("transformer", "text_encoder")
    ratio = sum(tree_bytes(pipe.params[p]) for p in halved) / sum(tree_bytes(full.params[p]) for p in halved)
    assert 0.5 < ratio < 0.55, ratio  # the vectors and float32 islands are a few percent at this tiny size

    first, last = (jnp.asarray(load_reference_image(_image(seed, 32), 32, 32))[None] for seed in (0, 1))

    def generate(p):
        return np.asarray(p.generate(first, "a red star turns", negative_prompt="blurry", last_image=last,
                                     decode=False, **SETTINGS))
    videos = _same_videos_with_float32_weights(pipe, generate, full.params)
    # rounding the float32 islands too would change the video: keeping them is not a precaution
    pipe.params = {**pipe.params, "transformer": store_weights(full.params["transformer"], jnp.bfloat16,
                                                               keep=frozenset())}
    pipe.forget_compiled()
    assert not np.array_equal(generate(pipe), videos)


def test_animatediff_generates_the_same_video_with_bf16_unet_weights(tmp_path):
    from PIL import Image

    from jaxvc.pipeline import CustomVideoPipeline
    from tests.tiny_models import build_tiny_animatediff_folder

    folder = build_tiny_animatediff_folder(tmp_path / "animatediff")
    pipe = CustomVideoPipeline.from_pretrained(folder, dtype="bfloat16")
    full = CustomVideoPipeline.from_pretrained(folder)
    unet = dtypes(pipe.params["unet"]["params"])
    assert {v for k, v in unet.items() if k.endswith("kernel")} == {jnp.dtype(jnp.bfloat16)}
    assert set(dtypes(pipe.params["text_encoder"]).values()) == {jnp.dtype(jnp.float32)}  # it computes in float32
    assert 0.5 < tree_bytes(pipe.params["unet"]) / tree_bytes(full.params["unet"]) < 0.55
    reference = tmp_path / "subject.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(reference)

    def generate(p):
        return p(str(reference), "a cat jumps", num_frames=2, height=32, width=32, num_inference_steps=2, seed=3,
                 progress=False)
    float32_weights = {**pipe.params, "unet": full.params["unet"]}
    _same_videos_with_float32_weights(pipe, generate, float32_weights)


def test_a_lora_is_merged_in_float32_before_the_unet_is_stored(tmp_path):
    """``jaxvc generate --lora FILE --dtype bfloat16``: the LoRA is merged into the float32 weights as they load and
    the merged matrices rounded once, so the videos are those of the float32 merge in the same bf16 model. Merged
    into weights already in bf16, some matrices come out one bf16 step away."""
    from PIL import Image

    from jaxvc.convert.lora import save_lora
    from jaxvc.models import lora
    from jaxvc.pipeline import CustomVideoPipeline
    from tests.tiny_models import build_tiny_animatediff_folder

    folder = build_tiny_animatediff_folder(tmp_path / "animatediff")
    full = CustomVideoPipeline.from_pretrained(folder)
    spec = lora.AdapterSpec(include=(r".*attn1/to_[qv]", r".*resnets_0/conv1"), rank=2, alpha=4.0)
    example = (jnp.zeros((1, 2, 8, 8, 4)), jnp.zeros((1,)), jnp.zeros((1, 77, 32)))
    sites = lora.find_sites(lambda: full.unet.init(jax.random.key(0), *example), spec)
    tree = jax.tree.map(lambda v: 0.3 * jax.random.normal(jax.random.key(v.size), v.shape),
                        lora.init_adapter(jax.random.key(1), sites, spec))
    path = save_lora(tmp_path / "subject.safetensors", {"unet": lora.AppliedAdapter(spec, tree)})

    pipe = CustomVideoPipeline.from_pretrained(folder, dtype="bfloat16", lora=[(str(path), 0.8)])
    full.merge_lora(path, scale=0.8)
    merged = traverse_util.flatten_dict(store_weights(full.params["unet"]["params"], jnp.bfloat16))
    stored = traverse_util.flatten_dict(pipe.params["unet"]["params"])
    assert set(stored) == set(merged)
    for key, leaf in stored.items():  # the float32 merge, rounded once
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(merged[key]), err_msg="/".join(key))
    late = CustomVideoPipeline.from_pretrained(folder, dtype="bfloat16").merge_lora(path, scale=0.8)
    twice = traverse_util.flatten_dict(late.params["unet"]["params"])
    changed = [key for key in stored if not np.array_equal(np.asarray(stored[key]), np.asarray(twice[key]))]
    assert changed and all(key[-2] in ("to_q", "to_v", "conv1") for key in changed), changed

    reference = tmp_path / "subject.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(reference)

    def generate(p):
        return p(str(reference), "a cat jumps", num_frames=2, height=32, width=32, num_inference_steps=2, seed=3,
                 progress=False)
    _same_videos_with_float32_weights(pipe, generate, {**pipe.params, "unet": full.params["unet"]})
