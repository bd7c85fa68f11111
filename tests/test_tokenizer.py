"""jaxvc's tokenizers-only CLIP tokenizer against transformers' CLIPTokenizer on the same SD 1.5-layout folder.

The folder is derived offline from open_clip's ``bpe_simple_vocab_16e6.txt.gz`` (installed by launch/setup_env.sh
with ``--no-deps``; ``$JAXVC_CLIP_BPE`` may point at the file instead). Without it these tests skip, except under
CI, where they fail.
"""
import json
import os
import shutil

import numpy as np
import pytest

from jaxvc.models import tokenizer as tokenizer_module
from jaxvc.models.tokenizer import (CLIP_VOCAB_SIZE, CLIPTokenizer, TokenizerFilesError, build_clip_tokenizer_files,
                                    default_tokenizer, find_open_clip_bpe)

PROMPTS = [
    "a photo of a cat",
    "A  PHOTO\tof a Dög,\n naïve café — 東京タワー 🐱🚀!!",
    "sks dog, (masterpiece:1.2), [best quality]'s it's we'll they've I'm you'd he's don't",
    "Ünïcödé: Å vs Å (NFC), ﬁ ligature, 1234567 3.14 e=mc^2 #hashtag @user http://x.y/z?q=1&r=2",
    "a woman <|endoftext|> dancing <|startoftext|> in the rain",
    " ".join(f"word{i}" for i in range(120)),  # far beyond 75 text tokens: truncated
    "",
    "   ",
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    try:
        find_open_clip_bpe()
    except TokenizerFilesError as error:
        if os.environ.get("CI"):  # CI installs open_clip_torch (launch/setup_env.sh): a skip there would hide a gap
            raise
        pytest.skip(f"CLIP BPE source unavailable: {error}")
    return build_clip_tokenizer_files(tmp_path_factory.mktemp("clip_tokenizer"))


def test_derived_files_have_the_sd15_vocabulary(folder):
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == CLIP_VOCAB_SIZE
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert vocab["!"] == 0 and vocab["a</w>"] == 320 and vocab["cat</w>"] == 2368
    merges = (folder / "merges.txt").read_text(encoding="utf-8").split("\n")
    assert merges[0] == "#version: 0.2" and len([m for m in merges[1:] if m]) == 48_894


def test_a_photo_of_a_cat(folder):
    ids = CLIPTokenizer.from_folder(folder)("a photo of a cat")
    assert ids.dtype == np.int32 and ids.shape == (1, 77)
    assert ids[0].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407] + [49407] * 70


def test_ids_equal_transformers(folder):
    transformers = pytest.importorskip("transformers")
    ours = CLIPTokenizer.from_folder(folder)(PROMPTS)
    reference_tokenizer = transformers.CLIPTokenizer.from_pretrained(folder)
    reference = reference_tokenizer(PROMPTS, padding="max_length", max_length=reference_tokenizer.model_max_length,
                                    truncation=True, return_tensors="np").input_ids
    assert ours.shape == reference.shape == (len(PROMPTS), 77)
    for prompt, a, b in zip(PROMPTS, ours, reference):
        assert a.tolist() == b.tolist(), prompt
    long_ids = ours[PROMPTS.index(PROMPTS[5])]
    assert long_ids[0] == 49406 and long_ids[-1] == 49407 and 49407 not in long_ids[1:-1]  # 75 text tokens kept
    assert ours[6].tolist() == [49406] + [49407] * 76  # the empty prompt


def test_pad_token_and_length_from_config_files(folder, tmp_path):
    transformers = pytest.importorskip("transformers")
    shutil.copy(folder / "vocab.json", tmp_path)
    shutil.copy(folder / "merges.txt", tmp_path)
    # SD 2.x's tokenizer pads with "!" (id 0)
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": {"content": "!"}}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}))
    ours = CLIPTokenizer.from_folder(tmp_path)
    assert ours.pad_token_id == 0
    reference = transformers.CLIPTokenizer.from_pretrained(tmp_path)("a cat", padding="max_length", max_length=77,
                                                                     truncation=True).input_ids
    assert ours("a cat")[0].tolist() == reference == [49406, 320, 2368, 49407] + [0] * 73
    assert CLIPTokenizer.from_folder(tmp_path, model_max_length=16)("a cat").shape == (1, 16)


def test_decode_round_trip(folder):
    tok = CLIPTokenizer.from_folder(folder)
    assert tok.decode(tok("A Photo of a Café, 2 dogs!")[0]) == "a photo of a café , 2 dogs !"


def test_missing_files_raise_a_clear_error(tmp_path):
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(TokenizerFilesError, match=r"needs vocab.json and merges.txt \(or a tokenizer.json\); missing \['merges.txt'\]"):
        CLIPTokenizer.from_folder(tmp_path)
    with pytest.raises(TokenizerFilesError, match="does not exist"):
        CLIPTokenizer.from_folder(tmp_path / "nowhere")


def test_default_tokenizer_builds_and_caches(folder, tmp_path, monkeypatch):
    monkeypatch.setenv("JAXVC_CACHE", str(tmp_path / "cache"))
    default_tokenizer.cache_clear()
    try:
        tok = default_tokenizer()
        assert (tmp_path / "cache" / "clip_tokenizer" / "vocab.json").is_file()
        np.testing.assert_array_equal(tok(PROMPTS), CLIPTokenizer.from_folder(folder)(PROMPTS))
        assert default_tokenizer() is tok
    finally:
        default_tokenizer.cache_clear()


def test_bpe_path_env_override(tmp_path, monkeypatch):
    monkeypatch.setenv(tokenizer_module.BPE_PATH_ENV, str(tmp_path / "missing.txt.gz"))
    with pytest.raises(TokenizerFilesError, match="missing.txt.gz: file does not exist"):
        find_open_clip_bpe()


def test_transformers5_tokenizer_json_folder_gives_the_same_ids(tmp_path):
    """transformers 5 saves a CLIP tokenizer as tokenizer.json only (no vocab.json/merges.txt); it must load the same."""
    transformers = pytest.importorskip("transformers")
    try:
        source = build_clip_tokenizer_files(tmp_path / "derived")
    except TokenizerFilesError as error:
        pytest.skip(str(error))
    transformers.CLIPTokenizer.from_pretrained(str(source)).save_pretrained(str(tmp_path / "saved"))
    assert (tmp_path / "saved" / "tokenizer.json").is_file() and not (tmp_path / "saved" / "merges.txt").exists()
    prompts = ["a photo of a cat", "A Subject rotates clockwise, on a SKY background!", "émoji 🐱 and CJK 猫"]
    np.testing.assert_array_equal(CLIPTokenizer.from_folder(tmp_path / "saved")(prompts),
                                  CLIPTokenizer.from_folder(source)(prompts))
