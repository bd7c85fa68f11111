"""What changed between the config a checkpoint was saved with and a resumed run's, said in dotted keys.

A resume restores the train state (parameters, optimizer state, EMA, frozen weights) and the data iterator's position
from the checkpoint. A config that changes their layout (``model.features``, ``optim.name``, ``optim.ema_decay`` on
or off, ``batch_size``, the data streams) cannot continue that run: instead of Orbax's tree dump or the data
pipeline's own error, ``ResumeMismatchError`` says which part does not fit, which keys changed (old -> new) and what
to do. Changes that fit are listed in the resume notice, with what they do not change (``seed``, weight paths).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from jaxvc.train.cli import MODEL_PATH_KEYS


class ResumeMismatchError(ValueError):
    """A resumed run whose config does not fit its checkpoint's state or data position (the message names the config
    keys that changed since the checkpoint and what to do)."""


class _Unset:
    def __repr__(self):
        return "(unset)"


UNSET = _Unset()  # a key one of the two configs does not have
Change = tuple[str, Any, Any]  # (dotted key, value in the checkpoint's config, value in this run's)

# the state tree's parts (jaxvc/train/state.py state_to_tree) as the messages name them, and the config keys that
# shape each (listed first among the changes, being the likely cause)
PARTS = {"params": "parameters", "opt_state": "optimizer state", "ema": "EMA weights", "frozen": "frozen weights"}
CAUSES = {"params": ("method", "model"), "opt_state": ("optim",), "ema": ("optim.ema_decay",),
          "frozen": ("method", "model", "checkpoint.save_frozen"), "data": ("batch_size", "data", "model")}
# keys naming weights that, once a checkpoint holds the frozen weights, are not read again on resume (a tokenizer is
# not a weight: the method reads it each run)
WEIGHT_KEYS = tuple(f"model.{key}" for key in MODEL_PATH_KEYS if key != "tokenizer")
ADVICE = "resume with the checkpoint's values for these keys, or train with this config in a new --workdir"


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """{dotted key: value} of a nested dict (lists are values; an empty dict has no keys, so a section filled later
    shows as its new keys)."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def config_changes(saved: Mapping | None, current: Mapping) -> list[Change]:
    """The dotted keys whose values differ between the checkpoint's config and this run's (both as config_to_dict
    gives them), sorted."""
    old, new = flatten(saved or {}), flatten(current)
    return [(key, old.get(key, UNSET), new.get(key, UNSET)) for key in sorted(set(old) | set(new))
            if old.get(key, UNSET) != new.get(key, UNSET)]


def short(value: Any, limit: int = 40) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def describe(changes: Sequence[Change], first: Sequence[str] = (), limit: int = 12) -> str:
    """``key: old -> new, ...``, keys under the prefixes ``first`` before the others, at most ``limit`` of them."""
    def under(key):
        return any(key == p or key.startswith(p + ".") for p in first)

    ordered = sorted(changes, key=lambda change: not under(change[0]))  # stable: sorted by key within each group
    text = ", ".join(f"{key}: {short(old)} -> {short(new)}" for key, old, new in ordered[:limit])
    return text + (f" and {len(ordered) - limit} more" if len(ordered) > limit else "")


def _changes_and_advice(changes: Sequence[Change], causes: Sequence[str]) -> str:
    if not changes:
        return ("; no config key differs from the checkpoint's (the method's code, its weight files or the data "
                "may have changed): train in a new --workdir")
    return f"; config changed since that checkpoint: {describe(changes, causes)}. To continue, {ADVICE}"


def _leaf_shapes(tree) -> dict[str, tuple]:
    """{path "a/b/0/c": shape} of a state tree, or of Orbax's metadata tree of one (same paths)."""
    import jax

    def name(path):
        return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)

    return {name(path): tuple(getattr(leaf, "shape", ()) or ())
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _part_order(part: str) -> tuple:
    return (list(PARTS).index(part) if part in PARTS else len(PARTS), part)


def state_mismatches(target: Mapping, saved: Mapping, by_path: bool = True) -> tuple[list[str], str]:
    """(parts that do not match, what does not fit) between the state tree ``target`` (what this run restores into)
    and the checkpoint's (``saved``: Orbax's metadata tree, shapes without data); ``([], "")`` when they match.
    ``by_path=False`` compares each part's leaf shapes only, not their paths (a check that cannot be fooled by how a
    tree's paths are spelled in the metadata)."""
    parts, reasons, differing, example = [], [], [], ""
    for part in sorted(set(target) | set(saved), key=_part_order):
        label = PARTS.get(part, f"train state's {part}")
        if part not in saved:
            parts.append(part)
            reasons.append(f"this run keeps {label} the checkpoint does not hold")
        elif part not in target:
            parts.append(part)
            reasons.append(f"the checkpoint holds {label} this run does not keep")
        else:
            want, have = _leaf_shapes(target[part]), _leaf_shapes(saved[part])
            if want == have or (not by_path and sorted(want.values()) == sorted(have.values())):
                continue
            parts.append(part)
            differing.append(label)
            path = next((p for p in sorted(set(want) | set(have)) if want.get(p) != have.get(p)), None)
            if not example and path is not None:
                old = f"shape {have[path]}" if path in have else "absent"
                new = f"shape {want[path]}" if path in want else "absent"
                example = f" ({part}/{path}: {old} in the checkpoint, {new} in this run)"
    if differing:
        labels = ", ".join(differing[:-1]) + " and " + differing[-1] if len(differing) > 1 else differing[0]
        reasons.append(f"this run's state is laid out differently from the checkpoint's in the {labels}{example}")
    return parts, "; ".join(reasons)


def state_mismatch_error(directory, step: int, target: Mapping, saved_tree: Mapping | None,
                         saved_config: Callable[[], Mapping], current: Mapping,
                         error: Exception | None = None) -> ResumeMismatchError | None:
    """The error to raise for restoring the checkpoint at ``step`` into ``target``, or None.

    Before restoring (``error`` None): an error where a part of the state is missing on one side or its shapes differ
    (Orbax would fail reading it, with a tree dump). After restoring failed with ``error``: an error where the trees
    differ, or the config changed and Orbax refused the tree (ValueError); None otherwise, for the caller to let
    ``error`` stand. ``saved_config()`` reads the checkpoint's config (only when an error is made)."""
    parts, what = (state_mismatches(target, saved_tree, by_path=error is not None)
                   if isinstance(saved_tree, Mapping) else ([], ""))
    if not parts and error is None:
        return None
    changes = config_changes(saved_config(), current)
    if not parts and not (changes and isinstance(error, ValueError)):
        return None
    what = what or "the saved train state does not fit this run's"
    causes = [key for part in parts for key in CAUSES.get(part, ())]
    return ResumeMismatchError(f"cannot resume from the checkpoint at step {step} in {directory}: {what}"
                               f"{_changes_and_advice(changes, causes)}")


def data_mismatch_error(directory, step: int, error: Exception, changes: Sequence[Change]) -> ResumeMismatchError:
    """The error to raise when the data iterator refused the position saved at ``step`` (``error``: its reason)."""
    reason = short(" ".join(str(error).split()), 200)
    return ResumeMismatchError(f"cannot resume from the checkpoint at step {step} in {directory}: the data "
                               f"iterator's saved position does not fit this run's data ({reason})"
                               f"{_changes_and_advice(changes, CAUSES['data'])}")


def resume_notice(step: int, changes: Sequence[Change], frozen_in_checkpoint: bool) -> list[str]:
    """Lines saying what a resume with config ``changes`` (that fit the checkpoint) continues with."""
    if not changes:
        return []
    lines = [f"resuming from step {step} with config changes: {describe(changes, limit=20)}"]
    keys = {key for key, _, _ in changes}
    if "seed" in keys:
        # the step's key is fold_in(state.rng, step), state.rng restored; the seed still seeds the sample videos
        rebuilt = "" if frozen_in_checkpoint else ", and frozen weights the method initializes at random"
        lines.append("seed changed: training randomness does not (the train key comes from the checkpoint); it "
                     f"changes the sample videos' noise{rebuilt}")
    paths = sorted(keys & set(WEIGHT_KEYS))
    if paths and frozen_in_checkpoint:
        lines.append(f"{', '.join(paths)} changed, but no weights are loaded from it: the checkpoint holds the frozen "
                     "and the trained weights")
    elif paths:
        lines.append(f"{', '.join(paths)} changed: the frozen weights are read from the new value (the checkpoint "
                     "does not hold them); the trained weights come from the checkpoint")
    return lines
