"""The T5 / UMT5 tokenizer of a local folder (a Wan pipeline's ``tokenizer/``), as transformers runs it.

transformers rebuilds a T5 tokenizer's pre-tokenization when it loads one (whitespace split, then sentencepiece's
metaspace), so a ``tokenizers``-only reader of ``tokenizer.json`` would split some texts differently from what Wan's
own pipeline feeds its encoder. jaxvc therefore calls transformers' tokenizer (from local files only) and only fixes
the shape: ``padding="max_length"``, ``truncation=True``, ``max_length=512`` (Wan's), ``</s>`` last, ``<pad>`` = 0,
no BOS. Wan's pipelines zero the text states past each prompt's ``</s>`` (``attention_mask``).
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from jaxvc.models.tokenizer import TokenizerFilesError


class T5Tokenizer:
    """Text -> ids ``np.int32`` (batch, max_length); ``attention_mask(ids)`` marks the tokens (not padding)."""
    bos_token_id = None

    def __init__(self, tokenizer, *, max_length: int = 512):
        self._tokenizer = tokenizer
        self.model_max_length = int(max_length)
        self.pad_token_id, self.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
        self.vocab_size = tokenizer.vocab_size
        self.added_tokens: dict[str, int] = {}

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, *, max_length: int = 512) -> "T5Tokenizer":
        """A transformers T5/UMT5 tokenizer folder (``tokenizer.json`` or ``spiece.model`` + its configs)."""
        from transformers import AutoTokenizer

        if not Path(folder).is_dir():
            raise TokenizerFilesError(f"{folder}: no such tokenizer folder")
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError) as error:
            raise TokenizerFilesError(f"{folder}: not a transformers tokenizer folder ({error})") from error
        if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
            raise TokenizerFilesError(f"{folder}: the tokenizer has no pad or eos token (not a T5 tokenizer?)")
        return cls(tokenizer, max_length=max_length)

    def __call__(self, texts: Sequence[str] | str) -> np.ndarray:
        texts = [texts] if isinstance(texts, str) else list(texts)
        encoded = self._tokenizer(texts, padding="max_length", truncation=True, max_length=self.model_max_length,
                                  add_special_tokens=True, return_attention_mask=False)
        return np.asarray(encoded["input_ids"], np.int32)

    def attention_mask(self, ids):
        """1 for tokens (up to and including ``</s>``), 0 for padding."""
        return ids != self.pad_token_id

    def with_added_tokens(self, tokens: Sequence[str]) -> "T5Tokenizer":
        """A copy that also knows ``tokens`` as special tokens (never split), each one id after the last: the
        disentangled S2V method's ``<cls>`` (``add_special_tokens({"additional_special_tokens": [...]})``)."""
        known = {t for t in tokens if t in self._tokenizer.get_vocab()}
        if known:
            raise ValueError(f"T5Tokenizer: {sorted(known)} already in the vocabulary; pick another token")
        new = copy.copy(self)
        new._tokenizer = copy.deepcopy(self._tokenizer)
        new._tokenizer.add_special_tokens({"additional_special_tokens": list(tokens)})
        new.added_tokens = {**self.added_tokens, **{t: new._tokenizer.convert_tokens_to_ids(t) for t in tokens}}
        return new
