"""Prompt sets for `jaxvc generate --prompts` (jaxvc/data/prompt_sets.py): UCF-101 class names, text and JSONL
files, repeats, seeds, names and errors."""
import json

import pytest

from jaxvc.data.prompt_sets import PromptSetError, class_name_prompt, read_prompt_set, ucf101_class_names


def test_ucf101_class_name_prompts():
    names = ucf101_class_names()
    assert len(names) == 101 and names[0] == "ApplyEyeMakeup" and names[-1] == "YoYo"  # classInd.txt order
    assert [class_name_prompt(n) for n in ("ApplyEyeMakeup", "YoYo", "CuttingInKitchen", "PlayingDaf")] == \
        ["apply eye makeup", "yo yo", "cutting in kitchen", "playing daf"]
    items = read_prompt_set("ucf101", repeats=3, seed=10)
    assert len(items) == 303
    assert [(i.name, i.prompt, i.seed) for i in items[:4]] == [
        ("ApplyEyeMakeup_000", "apply eye makeup", 10), ("ApplyEyeMakeup_001", "apply eye makeup", 11),
        ("ApplyEyeMakeup_002", "apply eye makeup", 12), ("ApplyLipstick_000", "apply lipstick", 10)]
    assert all(i.reference is None for i in items)


def test_text_and_jsonl_sets(tmp_path):
    (tmp_path / "prompts.txt").write_text("# a comment\na dog runs\n\na cat sits\n")
    items = read_prompt_set(str(tmp_path / "prompts.txt"), seed=7)
    assert [(i.name, i.prompt, i.seed) for i in items] == [("00000", "a dog runs", 7), ("00001", "a cat sits", 7)]
    lines = [{"prompt": "p0", "reference": "refs/a.png", "seed": 3, "negative_prompt": "blurry"},
             {"prompt": "p1", "video": "/data/clips/clip_12.mp4"},  # jaxvc motion-bins' records: named by the clip
             {"prompt": "p2", "name": "mine", "references": ["dog/1.png", "/abs/2.png"]}]
    (tmp_path / "set.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n\n")
    items = read_prompt_set(str(tmp_path / "set.jsonl"), seed=100)
    assert [(i.name, i.seed, i.negative_prompt) for i in items] == [("00000", 3, "blurry"), ("clip_12", 100, None),
                                                                    ("mine", 100, None)]
    assert items[0].reference == str(tmp_path / "refs" / "a.png")
    # where each came from, for errors that name the record (`jaxvc generate`'s unreadable reference)
    assert [i.source for i in items] == [f"{tmp_path / 'set.jsonl'}:{n}" for n in (1, 2, 3)]
    assert items[2].references == (str(tmp_path / "dog" / "1.png"), "/abs/2.png") and items[0].references == ()
    # a default prompt for records without one (motion-bins' records of uncaptioned clips)
    (tmp_path / "bins.jsonl").write_text(json.dumps({"video": "a/c1.mp4", "reference": "ff/c1.png"}))
    [item] = read_prompt_set(str(tmp_path / "bins.jsonl"), default_prompt="a dog")
    assert (item.name, item.prompt, item.reference) == ("c1", "a dog", str(tmp_path / "ff" / "c1.png"))
    (tmp_path / "set.json").write_text(json.dumps(lines))
    assert read_prompt_set(str(tmp_path / "set.json"))[2].source == f"{tmp_path / 'set.json'}[2]"
    assert read_prompt_set(str(tmp_path / "set.json")) == read_prompt_set(str(tmp_path / "set.jsonl"), seed=0)


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "a"}\n{"prompt": "b", "name": "00000"}', "items 0 and 1 would both be written as '00000'"),
    ('{"text": "a"}', r"set.jsonl:1: a record needs a \"prompt\" string"),
    ('{"prompt": "a", "seed": "3"}', r"\"seed\" must be an integer"),
    ('{"prompt": "a", "references": "x.png"}', r"\"references\" must be a list of image paths"),
    ('{"prompt": "a"', "set.jsonl:1: not valid JSON"),
    ('{"prompt": "a", "name": "../x"}', "not a plain file name"),
    ('', "no prompts"),
])
def test_bad_sets_are_named(tmp_path, content, message):
    (tmp_path / "set.jsonl").write_text(content)
    with pytest.raises(PromptSetError, match=message):
        read_prompt_set(str(tmp_path / "set.jsonl"))


def test_missing_and_unknown_files(tmp_path):
    with pytest.raises(PromptSetError, match="no such prompt file"):
        read_prompt_set(str(tmp_path / "missing.jsonl"))
    (tmp_path / "set.csv").write_text("a")
    with pytest.raises(PromptSetError, match="unknown prompt file type '.csv'"):
        read_prompt_set(str(tmp_path / "set.csv"))
    with pytest.raises(PromptSetError, match="repeats must be >= 1"):
        read_prompt_set("ucf101", repeats=0)
