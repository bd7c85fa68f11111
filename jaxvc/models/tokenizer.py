"""The CLIP BPE tokenizer built with the ``tokenizers`` library alone (no transformers at run time).

``CLIPTokenizer.from_folder`` reads an SD 1.5-style ``tokenizer/`` folder (``vocab.json`` + ``merges.txt``, optionally
``tokenizer_config.json`` / ``special_tokens_map.json`` for ``model_max_length`` and the special tokens) and
reproduces transformers' ``CLIPTokenizer`` pipeline: NFC + whitespace collapse + lowercase, CLIP's split regex,
byte-level BPE with the ``</w>`` end-of-word suffix, ``<|startoftext|> ... <|endoftext|>``, truncation and padding
to 77 (SD 1.5 pads with ``<|endoftext|>`` = 49407).

``build_clip_tokenizer_files`` derives those two files offline from open_clip's ``bpe_simple_vocab_16e6.txt.gz`` (the
original OpenAI merges list); ``default_tokenizer()`` builds and caches them for the demo and tests. open_clip is
only *located* (its wheel ships the file), never imported: importing it needs torchvision.
"""
from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import os
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
DEFAULT_MAX_LENGTH = 77
BPE_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"
BPE_PATH_ENV = "JAXVC_CLIP_BPE"  # explicit path to bpe_simple_vocab_16e6.txt.gz, overrides the open_clip lookup
NUM_CLIP_MERGES = 49152 - 256 - 2  # OpenAI CLIP uses the first 48,894 merges of the file
CLIP_VOCAB_SIZE = 49408
# transformers' CLIPTokenizer pre-tokenizer: specials, English contractions, letter runs, single digits, symbol runs.
SPLIT_PATTERN = (r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
                 r"""[^\s\p{L}\p{N}]+""")


class TokenizerFilesError(FileNotFoundError):
    """The tokenizer folder or the BPE source file is missing or malformed; the message names the path."""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode character map (256 entries, printable bytes first)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    codes, chars = printable[:], printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            codes.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(codes, map(chr, chars)))


class CLIPTokenizer:
    """Text -> CLIP token ids, ``np.int32`` of shape (batch, model_max_length), padded and truncated."""

    def __init__(self, vocab: dict[str, int], merges: Sequence[tuple[str, str]], *,
                 model_max_length: int = DEFAULT_MAX_LENGTH, bos_token: str = BOS_TOKEN, eos_token: str = EOS_TOKEN,
                 unk_token: str = EOS_TOKEN, pad_token: str = EOS_TOKEN, source: str = "CLIP tokenizer"):
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
        from tokenizers.models import BPE

        for role, token in (("bos", bos_token), ("eos", eos_token), ("unk", unk_token), ("pad", pad_token)):
            if token not in vocab:
                raise TokenizerFilesError(f"{source}: the {role} token {token!r} is not in the vocabulary")
        if model_max_length < 2:
            raise ValueError(f"{source}: model_max_length must leave room for <bos> and <eos>, got {model_max_length}")
        self.model_max_length = int(model_max_length)
        self.bos_token_id, self.eos_token_id = vocab[bos_token], vocab[eos_token]
        self.pad_token_id, self.unk_token_id = vocab[pad_token], vocab[unk_token]
        self.vocab_size = len(vocab)
        tokenizer = Tokenizer(BPE(vocab=dict(vocab), merges=[tuple(m) for m in merges], dropout=None,
                                  continuing_subword_prefix="", end_of_word_suffix="</w>", fuse_unk=False,
                                  unk_token=unk_token))
        tokenizer.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="removed", invert=True),
             pre_tokenizers.ByteLevel(add_prefix_space=False)])
        tokenizer.decoder = decoders.ByteLevel()
        # Special tokens typed in a prompt map to their ids instead of being split into characters.
        tokenizer.add_special_tokens([AddedToken(t, special=True) for t in dict.fromkeys(
            (bos_token, eos_token, unk_token, pad_token))])
        tokenizer.post_processor = processors.RobertaProcessing(
            (eos_token, self.eos_token_id), (bos_token, self.bos_token_id), trim_offsets=False, add_prefix_space=False)
        tokenizer.enable_truncation(max_length=self.model_max_length)  # counts <bos>/<eos>: 75 text tokens at most
        tokenizer.enable_padding(length=self.model_max_length, pad_id=self.pad_token_id, pad_token=pad_token)
        self._tokenizer = tokenizer

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, model_max_length: int | None = None) -> "CLIPTokenizer":
        """From a folder with ``vocab.json`` and ``merges.txt`` (SD 1.5's ``tokenizer/`` layout)."""
        folder = Path(folder)
        vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
        missing = [p.name for p in (vocab_path, merges_path) if not p.is_file()]
        if missing and (folder / "tokenizer.json").is_file():
            # transformers 5 saves only tokenizer.json: read the same BPE vocabulary and merges from its model
            vocab, merges = read_tokenizer_json(folder / "tokenizer.json")
        elif missing:
            found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else "folder does not exist"
            raise TokenizerFilesError(f"{folder}: a CLIP tokenizer folder needs vocab.json and merges.txt (or a "
                                      f"tokenizer.json); missing {missing} (found: {found})")
        else:
            try:
                vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as error:
                raise TokenizerFilesError(f"{vocab_path}: not valid JSON ({error})") from error
            merges = read_merges(merges_path)
        settings = _special_token_settings(folder)
        if model_max_length is not None:
            settings["model_max_length"] = model_max_length
        return cls(vocab, merges, source=str(folder), **settings)

    def __call__(self, prompts: str | Iterable[str]) -> np.ndarray:
        """One prompt or a list -> ids (batch, model_max_length) int32: <bos> text <eos> <pad>..."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"CLIPTokenizer: expected strings, got {[type(p).__name__ for p in prompts]}")
        encodings = self._tokenizer.encode_batch(prompts, add_special_tokens=True)
        return np.asarray([e.ids for e in encodings], dtype=np.int32).reshape(len(prompts), self.model_max_length)

    encode = __call__

    def with_added_tokens(self, tokens: Sequence[str]) -> "CLIPTokenizer":
        """A copy that also knows ``tokens`` (textual inversion's placeholders, e.g. ``"<new1>"``), each one id from
        ``vocab_size`` on, in order, as transformers' ``add_tokens`` gives them. ``self`` is left unchanged (the
        default tokenizer is shared)."""
        import copy

        from tokenizers import AddedToken, Tokenizer

        known = {t for t in tokens if self._tokenizer.token_to_id(t) is not None}
        if known:
            raise ValueError(f"CLIPTokenizer: {sorted(known)} already in the vocabulary; pick another placeholder")
        new = copy.copy(self)
        new._tokenizer = Tokenizer.from_str(self._tokenizer.to_str())
        new._tokenizer.add_tokens([AddedToken(t, normalized=True) for t in tokens])
        new.added_tokens = {**getattr(self, "added_tokens", {}),
                            **{t: new._tokenizer.token_to_id(t) for t in tokens}}
        return new

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text without special tokens (``</w>`` becomes a space)."""
        text = self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)
        return text.replace("</w>", " ").strip()


def read_tokenizer_json(path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of the BPE model inside a ``tokenizers`` tokenizer.json (merges as "a b" or [a, b])."""
    try:
        model = json.loads(path.read_text(encoding="utf-8"))["model"]
    except (json.JSONDecodeError, KeyError) as error:
        raise TokenizerFilesError(f"{path}: not a tokenizers JSON file with a 'model' section ({error})") from error
    if model.get("type") != "BPE" or "vocab" not in model or "merges" not in model:
        raise TokenizerFilesError(f"{path}: expected a BPE model with vocab and merges, got type {model.get('type')}")
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return dict(model["vocab"]), merges


def read_merges(path: Path) -> list[tuple[str, str]]:
    merges = []
    for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        if not line or (number == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise TokenizerFilesError(f"{path}:{number}: expected a merge 'a b', got {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


def _token_content(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _special_token_settings(folder: Path) -> dict:
    """model_max_length and special tokens from tokenizer_config.json, then special_tokens_map.json (if present)."""
    settings: dict = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = folder / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise TokenizerFilesError(f"{path}: not valid JSON ({error})") from error
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            content = _token_content(data.get(key))
            if content is not None:
                settings[key] = content
        max_length = data.get("model_max_length")
        # transformers writes a huge sentinel (1e30) when the length is unset; CLIP's context is 77 then.
        if isinstance(max_length, (int, float)) and 0 < max_length < 1_000_000:
            settings["model_max_length"] = int(max_length)
    return settings


def find_open_clip_bpe() -> Path:
    """Path of ``bpe_simple_vocab_16e6.txt.gz``: ``$JAXVC_CLIP_BPE``, else inside the installed open_clip package."""
    explicit = os.environ.get(BPE_PATH_ENV)
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise TokenizerFilesError(f"${BPE_PATH_ENV}={explicit}: file does not exist")
        return path
    spec = importlib.util.find_spec("open_clip")  # locates the package without importing it (no torchvision)
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / BPE_FILE_NAME
        if path.is_file():
            return path
    raise TokenizerFilesError(
        f"{BPE_FILE_NAME} not found: install the open_clip_torch wheel without dependencies "
        f"(pip install --no-deps open_clip_torch==3.3.0; launch/setup_env.sh does), set ${BPE_PATH_ENV} to the file, "
        "or pass a tokenizer folder with vocab.json and merges.txt (e.g. SD 1.5's tokenizer/)")


def build_clip_tokenizer_files(out_dir: str | os.PathLike, bpe_path: str | os.PathLike | None = None) -> Path:
    """Write vocab.json, merges.txt and tokenizer_config.json (SD 1.5 tokenizer layout) derived from the BPE file.

    Vocabulary order as OpenAI CLIP: 256 byte characters, the same with ``</w>``, one token per merge, then
    ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407).
    """
    bpe_path = Path(bpe_path) if bpe_path is not None else find_open_clip_bpe()
    try:
        lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as error:
        raise TokenizerFilesError(f"{bpe_path}: not a gzip'd UTF-8 BPE merges file ({error})") from error
    merges = lines[1:1 + NUM_CLIP_MERGES]  # line 0 is a version header
    if len(merges) != NUM_CLIP_MERGES or any(len(m.split(" ")) != 2 for m in merges):
        raise TokenizerFilesError(f"{bpe_path}: expected {NUM_CLIP_MERGES} merges 'a b' after the header line")
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split(" ")) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != CLIP_VOCAB_SIZE:
        raise TokenizerFilesError(f"{bpe_path}: derived {len(vocab)} distinct tokens, expected {CLIP_VOCAB_SIZE}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": DEFAULT_MAX_LENGTH, "bos_token": BOS_TOKEN,
              "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": EOS_TOKEN, "do_lower_case": True}
    files = {"vocab.json": json.dumps(vocab, ensure_ascii=False),
             "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
             "tokenizer_config.json": json.dumps(config, indent=2)}
    for name, text in files.items():  # write-then-rename so a concurrent reader never sees half a file
        handle, temporary = tempfile.mkstemp(dir=out_dir, prefix=f".{name}.")
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.replace(temporary, out_dir / name)
    return out_dir


def _cache_dir() -> Path:
    root = os.environ.get("JAXVC_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "jaxvc")
    return Path(root) / "clip_tokenizer"


@functools.lru_cache(maxsize=1)
def default_tokenizer() -> CLIPTokenizer:
    """SD 1.5's tokenizer, derived once from open_clip's BPE file and cached (``~/.cache/jaxvc/clip_tokenizer``)."""
    folder = _cache_dir()
    if not ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()):
        try:
            build_clip_tokenizer_files(folder)
        except TokenizerFilesError:
            raise
        except OSError:  # read-only or unwritable cache: build into a private temporary folder instead
            folder = build_clip_tokenizer_files(tempfile.mkdtemp(prefix="jaxvc_clip_tokenizer_"))
    return CLIPTokenizer.from_folder(folder)


def load_tokenizer(folder: str | os.PathLike | None = None) -> CLIPTokenizer:
    """The tokenizer in ``folder`` (vocab.json + merges.txt, or tokenizer.json), or jaxvc's default when None/""."""
    return CLIPTokenizer.from_folder(folder) if folder else default_tokenizer()
