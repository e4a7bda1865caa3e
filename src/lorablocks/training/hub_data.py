"""Public hub datasets converted to the domain schema (online only; the offline default is ../shared/data).

Each converter names the dataset, its subset and splits, and turns one row into an
:class:`~lorablocks.training.data.Example`; splits the hub lacks are carved deterministically (seed 0).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from lorablocks.errors import DataError
from lorablocks.training.data import Example

__all__ = ["HubConverter", "HUB_CONVERTERS", "load_hub"]


def _key(row: Mapping[str, Any], *names: str) -> Any:
    lower = {k.lower(): v for k, v in row.items()}
    for n in names:
        if n.lower() in lower:
            return lower[n.lower()]
    raise DataError(f"hub row has none of the fields {names}; fields: {sorted(row)}")


def _gsm8k(row: Mapping[str, Any], i: int) -> Example:
    answer = re.sub(r"<<[^>]*>>", "", str(row["answer"]))
    answer = re.sub(r"\n?####\s*(.+)\s*$", lambda m: f"\nThe answer is {m.group(1).strip()}.", answer)
    return Example(id=f"gsm8k-{i}", question=" ".join(str(row["question"]).split()), answer=answer.strip())


def _medquad(row: Mapping[str, Any], i: int) -> Example:
    return Example(
        id=f"medquad-{i}", question=" ".join(str(_key(row, "Question")).split()), answer=str(_key(row, "Answer"))
    )


def _finqa(row: Mapping[str, Any], i: int) -> Example:
    context = row.get("context") or row.get("Context")
    return Example(
        id=f"finqa10k-{i}",
        question=" ".join(str(_key(row, "question")).split()),
        answer=str(_key(row, "answer")),
        context=str(context) if context else None,
    )


def _mbpp(row: Mapping[str, Any], i: int) -> Example:
    return Example(id=f"mbpp-{row.get('task_id', i)}", question=str(_key(row, "text", "prompt")), answer=str(row["code"]))


def _pubmedqa(row: Mapping[str, Any], i: int) -> Example:
    ctx = row.get("context")
    if isinstance(ctx, Mapping):
        ctx = " ".join(ctx.get("contexts", []))
    return Example(
        id=f"pubmedqa-{row.get('pubid', i)}", question=str(row["question"]), answer=str(row["long_answer"]),
        context=str(ctx) if ctx else None,
    )


@dataclass(frozen=True)
class HubConverter:
    """How to turn one public hub dataset into the domain schema."""

    dataset: str
    subset: str | None
    convert: Callable[[Mapping[str, Any], int], Example]
    #: hub split names that exist; missing ones are carved deterministically (seed 0) from the first
    hub_splits: tuple[str, ...] = ("train",)
    #: fractions (validation, test) carved from the first split when the hub has only one
    carve: tuple[float, float] = (0.1, 0.1)


HUB_CONVERTERS: dict[str, HubConverter] = {
    "gsm8k": HubConverter("openai/gsm8k", "main", _gsm8k, ("train", "test"), (0.067, 0.0)),
    "medquad": HubConverter("keivalya/MedQuad-MedicalQnADataset", None, _medquad),
    "financial-qa-10k": HubConverter("virattt/financial-qa-10K", None, _finqa),
    "mbpp": HubConverter("google-research-datasets/mbpp", "full", _mbpp, ("train", "validation", "test")),
    "pubmedqa": HubConverter("qiaojin/PubMedQA", "pqa_labeled", _pubmedqa, ("train",), (0.05, 0.5)),
}


def load_hub(name: str) -> dict[str, list[Example]]:
    conv = HUB_CONVERTERS[name]
    try:
        import datasets  # optional dependency
    except ImportError:
        raise DataError(
            f"hub dataset {name!r} needs the optional 'datasets' package and the network "
            "(pip install datasets); offline, use a local domain folder such as ../shared/data/math"
        ) from None
    try:
        raw = datasets.load_dataset(conv.dataset, conv.subset)
    except Exception as exc:
        raise DataError(
            f"could not download hub dataset {conv.dataset} ({type(exc).__name__}); it needs the network. "
            "Offline, use a local domain folder such as ../shared/data/math"
        ) from None
    out: dict[str, list[Example]] = {}
    for split in conv.hub_splits:
        rows = [conv.convert(row, i) for i, row in enumerate(raw[split])]
        random.Random(0).shuffle(rows)
        out[split] = rows
    first = out[conv.hub_splits[0]]
    n = len(first)
    n_val = int(round(conv.carve[0] * n)) if "validation" not in out else 0
    n_test = int(round(conv.carve[1] * n)) if "test" not in out else 0
    if n_val:
        out["validation"] = first[n - n_val - n_test : n - n_test]
    if n_test:
        out["test"] = first[n - n_test :]
    out["train"] = first[: n - n_val - n_test]
    return out
