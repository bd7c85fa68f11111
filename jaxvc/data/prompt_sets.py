"""Prompt sets for ``jaxvc generate --prompts``: the many videos an evaluation needs, from one loaded model.

A set is one of:

- ``ucf101``: the 101 UCF-101 action classes as prompts, the zero-shot protocol's class-name prompts (MicroCinema's
  UCF-101 FVD/IS, specs/METHODS.md): ``ApplyEyeMakeup`` -> "apply eye makeup". The class list is the one
  tensorflow-datasets ships (``tensorflow_datasets/video/ucf101_labels.txt``, UCF-101's ``classInd.txt`` order),
  read as a file without importing TensorFlow;
- a ``.txt`` file: one prompt per line (blank lines and lines starting with ``#`` are skipped);
- a ``.jsonl`` file (or a ``.json`` list): one object per item, ``{"prompt": TEXT}`` (or the default prompt) and
  optionally
  ``"reference"`` (an image, relative to the file's folder), ``"references"`` (images of the subject for
  evaluation only: ``jaxvc eval`` scores CLIP-I/DINO-I against them; what a text-to-video model's videos, whose
  subject is in the weights, are scored against), ``"name"``, ``"seed"``, ``"negative_prompt"``. A record
  with a ``"video"`` and no ``"name"`` is named after the video's stem: ``jaxvc motion-bins`` writes such records,
  each real clip's first frame as its reference, so that the generated video has the real clip's name.

Each item is generated ``repeats`` times, with seeds ``seed + k`` (k = 0 .. repeats - 1; ``seed`` is the item's own
or the command's), named ``<name>`` (one repeat) or ``<name>_<k:03d>``.
"""
from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass, field
from pathlib import Path


class PromptSetError(ValueError):
    """A prompt set that cannot be read, or whose items cannot be told apart."""


@dataclass(frozen=True)
class PromptItem:
    prompt: str
    name: str
    seed: int
    reference: str | None = None
    negative_prompt: str | None = None
    references: tuple[str, ...] = ()  # evaluation images of the subject (jaxvc eval's CLIP-I/DINO-I), not inputs
    # the record it came from ("set.jsonl:3", "set.json[2]"), for errors that name it; where an item came from does
    # not make it another item
    source: str | None = field(default=None, compare=False)


def ucf101_class_names() -> list[str]:
    """The 101 UCF-101 class names in ``classInd.txt`` order, from tensorflow-datasets' copy."""
    spec = importlib.util.find_spec("tensorflow_datasets")
    if spec is None or not spec.submodule_search_locations:
        raise PromptSetError("the ucf101 prompt set reads tensorflow-datasets' ucf101_labels.txt: install "
                             "tensorflow-datasets (launch/requirements-lock.txt pins it)")
    path = Path(list(spec.submodule_search_locations)[0]) / "video" / "ucf101_labels.txt"
    if not path.is_file():
        raise PromptSetError(f"{path}: missing from this tensorflow-datasets installation")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if len(names) != 101:
        raise PromptSetError(f"{path}: {len(names)} class names, expected UCF-101's 101")
    return names


def class_name_prompt(class_name: str) -> str:
    """``"ApplyEyeMakeup"`` -> ``"apply eye makeup"``: the CamelCase words, lower case."""
    return " ".join(re.findall(r"[A-Z][a-z]*|[a-z]+|\d+", class_name)).lower()


def _base_items(spec: str, default_prompt: str | None) -> list[dict]:
    """(prompt, name, optional fields) of each item before repeats."""
    if spec == "ucf101":
        return [{"prompt": class_name_prompt(name), "name": name} for name in ucf101_class_names()]
    path = Path(spec)
    if not path.is_file():
        raise PromptSetError(f"{spec}: no such prompt file (expected 'ucf101', a .txt file with one prompt per line, "
                             "or a .jsonl/.json file of {\"prompt\": ...} records)")
    if path.suffix == ".txt":
        lines = [line.strip() for line in path.read_text().splitlines()]
        return [{"prompt": line} for line in lines if line and not line.startswith("#")]
    if path.suffix == ".jsonl":
        records = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                records.append((f"{path}:{number}", _parse(line, f"{path}:{number}")))
    elif path.suffix == ".json":
        loaded = _parse(path.read_text(), str(path))
        if not isinstance(loaded, list):
            raise PromptSetError(f"{path}: a .json prompt set is a list of records, got {type(loaded).__name__}")
        records = [(f"{path}[{index}]", record) for index, record in enumerate(loaded)]
    else:
        raise PromptSetError(f"{path}: unknown prompt file type '{path.suffix}' (expected .txt, .jsonl or .json)")
    return [_item_fields(record, source, path.parent, default_prompt) for source, record in records]


def _parse(text: str, source: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise PromptSetError(f"{source}: not valid JSON ({error})") from error


def _item_fields(record, source: str, folder: Path, default_prompt: str | None) -> dict:
    if isinstance(record, dict) and record.get("prompt") is None and default_prompt is not None:
        record = {**record, "prompt": default_prompt}
    if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
        raise PromptSetError(f"{source}: a record needs a \"prompt\" string (or give a default prompt), got "
                             f"{str(record)[:120]}")
    fields = {"prompt": record["prompt"], "source": source}
    if record.get("name") is not None:
        fields["name"] = str(record["name"])
    elif isinstance(record.get("video"), str):
        fields["name"] = Path(record["video"]).stem
    if record.get("reference") is not None:
        fields["reference"] = str(folder / record["reference"])
    if record.get("references") is not None:
        references = record["references"]
        if isinstance(references, str) or not isinstance(references, list) or \
                not all(isinstance(r, str) for r in references):
            raise PromptSetError(f"{source}: \"references\" must be a list of image paths, got {references!r}")
        fields["references"] = tuple(str(folder / r) for r in references)
    if record.get("seed") is not None:
        if not isinstance(record["seed"], int) or isinstance(record["seed"], bool):
            raise PromptSetError(f"{source}: \"seed\" must be an integer, got {record['seed']!r}")
        fields["seed"] = record["seed"]
    if record.get("negative_prompt") is not None:
        fields["negative_prompt"] = str(record["negative_prompt"])
    return fields


def read_prompt_set(spec: str, repeats: int = 1, seed: int = 0, default_prompt: str | None = None) -> list[PromptItem]:
    """Every video to generate, in order; ``default_prompt`` is the prompt of records without one (e.g. motion-bins'
    records of uncaptioned clips). Raises PromptSetError for an unreadable set, no items, or two items that would
    write the same file."""
    if repeats < 1:
        raise PromptSetError(f"repeats must be >= 1, got {repeats}")
    base = _base_items(spec, default_prompt)
    if not base:
        raise PromptSetError(f"{spec}: no prompts")
    width = max(5, len(str(len(base) - 1)))
    items = []
    for index, fields in enumerate(base):
        name = fields.get("name", f"{index:0{width}d}")
        if not name or "/" in name or name.startswith("."):
            raise PromptSetError(f"{spec}: item {index} has the name {name!r}, which is not a plain file name")
        for repeat in range(repeats):
            items.append(PromptItem(prompt=fields["prompt"], name=name if repeats == 1 else f"{name}_{repeat:03d}",
                                    seed=fields.get("seed", seed) + repeat, reference=fields.get("reference"),
                                    negative_prompt=fields.get("negative_prompt"),
                                    references=fields.get("references", ()), source=fields.get("source")))
    seen: dict[str, int] = {}
    for index, item in enumerate(items):
        if item.name in seen:
            raise PromptSetError(f"{spec}: items {seen[item.name]} and {index} would both be written as "
                                 f"'{item.name}'; give them distinct \"name\"s")
        seen[item.name] = index
    return items
