"""Label tasks: the run's label set, the prompt of a classification example, and concept shift.

A label task is data whose field map names a ``label`` (:mod:`fedmoe.data.sources`): the model
reads a text and answers with one of a fixed set of labels, scored by ``eval.task: choice``. Dolly
with ``data.field_map: {label: category}`` is one, shipped: predict which of the 8 kinds of request
(brainstorming, classification, closed_qa, ...) an instruction and its context are.

* :func:`label_set`: the labels of the data, sorted (``data.labels: null``), or the given list,
  checked against the data;
* :func:`as_choice`: the prompt of a labelled example: the instruction ``data.label_instruction``
  with the label set in it, and the example's text (its instruction, then its input) as the input,
  cut to ``data.label_text_chars`` characters at a word boundary; the output is the label and the
  options are the label set;
* :func:`concept_shift`: which group each client is in and the label map of each group (group 0
  keeps every label; every other group maps a subset of the labels by a derangement of it, drawn
  from the seed), and :func:`relabel`, which applies a map to a client's examples.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from ..seeds import NumpyStream, numpy_rng
from .sources import DataError, Example

__all__ = ["as_choice", "concept_shift", "label_set", "relabel"]


def label_set(examples: Sequence[Example], given: Sequence[str] | None = None) -> list[str]:
    """The labels of a label task: ``given`` (checked: every example's label must be in it), else the
    distinct labels of ``examples``, sorted."""
    seen = sorted({ex.label for ex in examples if ex.label is not None})
    if len(seen) < 1:
        raise DataError("a label task needs labelled examples (data.field_map.label names the field), found none")
    if given is None:
        if len(seen) < 2:
            raise DataError(f"the data has a single label ({seen[0]!r}): a label task needs at least two")
        return seen
    unknown = [lab for lab in seen if lab not in given]
    if unknown:
        raise DataError(f"the data has labels that data.labels does not list: {unknown[:10]} (data.labels = "
                        f"{list(given)}); add them to data.labels, or set data.labels: null to read the set from "
                        "the data")
    return list(given)


def _cut(text: str, limit: int | None) -> str:
    if limit is None or len(text) <= limit:
        return text
    head = text[:limit]
    space = head.rfind(" ")
    return (head[:space] if space > limit // 2 else head).rstrip() + " ..."


def as_choice(examples: Sequence[Example], labels: Sequence[str], instruction: str,
              max_chars: int | None) -> list[Example]:
    """Labelled examples in their prompt form (see the module docstring); other examples unchanged."""
    prompt = instruction.format(labels=", ".join(labels))
    options = tuple(labels)
    out = []
    for ex in examples:
        if ex.label is None:
            out.append(ex)
            continue
        text = ex.instruction.strip() + ("\n\n" + ex.input.strip() if ex.input.strip() else "")
        out.append(dataclasses.replace(ex, instruction=prompt, input=_cut(text, max_chars), output=ex.label,
                                       category=ex.label, options=options))
    return out


def concept_shift(cfg, labels: Sequence[str], num_clients: int, seed: int) -> tuple[list[int], list[dict[str, str]]]:
    """(group of each client, label map of each group) for ``cfg`` (a ``ConceptShiftConfig``).

    Group 0's map is the identity. The shifted labels are ``cfg.labels`` or ``cfg.num_labels`` labels
    drawn from the seed; each other group g maps them by a derangement (no label keeps its own
    meaning) drawn from (seed, g). With two shifted labels every other group swaps them."""
    if isinstance(cfg.groups, int):
        groups = [c % cfg.groups for c in range(num_clients)]
        n_groups = cfg.groups
    else:
        if sum(cfg.groups) != num_clients:
            raise DataError(f"data.concept_shift.groups sizes {cfg.groups} do not sum to the {num_clients} clients")
        groups = [g for g, size in enumerate(cfg.groups) for _ in range(size)]
        n_groups = len(cfg.groups)
    if cfg.labels is not None:
        unknown = [lab for lab in cfg.labels if lab not in labels]
        if unknown:
            raise DataError(f"data.concept_shift.labels names labels that are not in the label set: {unknown}; "
                            f"labels: {list(labels)}")
        if len(set(cfg.labels)) < 2:
            raise DataError("data.concept_shift.labels must name at least two distinct labels")
        shifted = list(dict.fromkeys(cfg.labels))
    else:
        if cfg.num_labels > len(labels):
            raise DataError(f"data.concept_shift.num_labels = {cfg.num_labels}, but the label set has {len(labels)}")
        rng = numpy_rng(seed, NumpyStream.CONCEPT_SHIFT)
        shifted = sorted(labels[int(i)] for i in rng.choice(len(labels), size=cfg.num_labels, replace=False))
    maps = [{lab: lab for lab in labels}]
    for g in range(1, n_groups):
        rng = numpy_rng(seed, NumpyStream.CONCEPT_SHIFT, g)
        while True:
            perm = [shifted[int(i)] for i in rng.permutation(len(shifted))]
            if all(a != b for a, b in zip(shifted, perm)):
                break
        maps.append({lab: lab for lab in labels} | dict(zip(shifted, perm)))
    return groups, maps


def relabel(examples: Sequence[Example], mapping: dict[str, str]) -> list[Example]:
    """The examples with their label (output, category and label) mapped; the input is unchanged."""
    out = []
    for ex in examples:
        if ex.label is None or mapping.get(ex.label, ex.label) == ex.label:
            out.append(ex)
            continue
        new = mapping[ex.label]
        out.append(dataclasses.replace(ex, output=new, category=new, label=new))
    return out
