"""Domain QA data: reading, the prompt template, answer-only tokenization and length-bucketed batches.

**A domain** is one of

* a folder with ``train.jsonl``, ``validation.jsonl`` and ``test.jsonl``;
* one ``.jsonl`` file, which then serves every split that is asked for;
* (online only) a hub dataset with a named converter: ``gsm8k``, ``medquad``, ``financial-qa-10k``,
  ``mbpp``, ``pubmedqa`` (needs the optional ``datasets`` package and the network).

Each JSONL line is an object with ``id``, ``question``, ``answer`` and an optional ``context`` (strings).

**The prompt template** (the one place it is defined, :func:`format_prompt`)::

    Context: {context}        <- this line only when the example has a context
    Question: {question}
    Answer:

The answer follows as ``" " + answer`` and then the tokenizer's end-of-sequence token. Prompt and answer
are tokenized separately, without special tokens, so the boundary is exact; **only the answer tokens and
the EOS are counted** in the loss and in perplexity (label ``-100`` elsewhere).

**Truncation** is explicit: an example longer than ``max_length`` tokens keeps
``min(len(answer), max(max_length - len(prompt), max_length // 2))`` answer tokens from the start of the
answer (the EOS is lost if the answer is cut) and the last ``max_length - kept`` prompt tokens, so the
prompt still ends with ``Answer:``. Truncated examples are counted and reported.

**Batches** use length bucketing, not packing: examples are sorted by length and grouped, and each batch
is right-padded only to its own longest example. Padding is masked out of attention and never counted;
with right padding and causal attention the real tokens see exactly what they would see alone, so a
bucketed batch gives the same NLL as one example at a time (tested).

``limit`` takes the first ``N`` examples of a split in file order (the provided files are shuffled when
built; hub conversions are shuffled with seed 0), so a limited run is deterministic.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorablocks.errors import DataError
from lorablocks.files.outputs import note_input
from lorablocks.files.outputs import sha256_path

__all__ = [
    "SPLITS",
    "Example",
    "Domain",
    "TokenizedExample",
    "TokenizedSet",
    "Batch",
    "read_jsonl",
    "resolve_domain",
    "resolve_domains",
    "format_prompt",
    "format_answer",
    "tokenize_examples",
    "leading_special_ids",
    "collate",
    "bucket_by_tokens",
    "bucket_window",
]

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Example:
    """One question-answer pair (schema of ``../shared/data/README.md``)."""

    id: str
    question: str
    answer: str
    context: str | None = None


def format_prompt(example: Example) -> str:
    """The prompt: optional ``Context:`` line, ``Question:`` line, then ``Answer:``."""
    head = f"Context: {example.context}\n" if example.context else ""
    return f"{head}Question: {example.question}\nAnswer:"


def format_answer(example: Example) -> str:
    """The answer text that follows the prompt (the EOS token is appended at tokenization)."""
    return " " + example.answer


# --------------------------------------------------------------------------------------------- reading


def _parse_line(obj: Any, path: Path, lineno: int) -> Example:
    where = f"{path}:{lineno}"
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key in ("question", "answer"):
        if key not in obj:
            raise DataError(f"{where}: missing field {key!r} (each line needs id, question, answer)")
        if not isinstance(obj[key], str) or not obj[key].strip():
            raise DataError(f"{where}: field {key!r} must be a non-empty string")
    context = obj.get("context")
    if context is not None and not isinstance(context, str):
        raise DataError(f"{where}: field 'context' must be a string or absent")
    ex_id = obj.get("id", f"{path.stem}-{lineno}")
    if not isinstance(ex_id, (str, int)):
        raise DataError(f"{where}: field 'id' must be a string")
    return Example(id=str(ex_id), question=obj["question"], answer=obj["answer"], context=context or None)


def read_jsonl(path: str | os.PathLike, limit: int | None = None) -> list[Example]:
    """Read a JSONL file of examples; raise :class:`DataError` naming the file and line of any problem."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist" if not path.exists() else f"{path} is not a file")
    out: list[Example] = []
    with open(path, "rb") as fh:  # bytes, so that a bad UTF-8 sequence is named by its line
        for lineno, raw in enumerate(fh, start=1):
            if limit is not None and len(out) >= limit:
                break
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            out.append(_parse_line(obj, path, lineno))
    if not out:
        raise DataError(f"{path} holds no examples")
    note_input(path)  # an input of the running command: no output of it may replace it
    return out


# --------------------------------------------------------------------------------------------- domains


@dataclass
class Domain:
    """A named source of examples for each split: a folder, one JSONL file, or a hub converter."""

    name: str
    source: str
    kind: str  # "folder" | "file" | "hub"
    _hub_cache: dict[str, list[Example]] = field(default_factory=dict, repr=False)

    def path(self, split: str) -> Path | None:
        """The file that holds ``split`` (``None`` for hub domains)."""
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; splits are {', '.join(SPLITS)}")
        if self.kind == "folder":
            return Path(self.source) / f"{split}.jsonl"
        if self.kind == "file":
            return Path(self.source)
        return None

    def load(self, split: str, limit: int | None = None) -> list[Example]:
        """The examples of ``split`` (the first ``limit`` of them if given)."""
        if limit is not None and limit < 1:
            raise DataError(f"limit must be a positive integer, got {limit}", setting="limit")
        path = self.path(split)
        if path is not None:
            return read_jsonl(path, limit)
        rows = self._hub_split(split)
        return rows[:limit] if limit is not None else rows

    def fingerprint(self, split: str) -> str:
        """SHA-256 of the split's file (hub domains: of the converter's dataset name and split)."""
        path = self.path(split)
        if path is not None:
            if not path.is_file():
                raise DataError(f"{path} does not exist")
            return sha256_path(path)
        import hashlib

        from lorablocks.training.hub_data import HUB_CONVERTERS

        return hashlib.sha256(f"hub:{HUB_CONVERTERS[self.source].dataset}:{split}".encode()).hexdigest()

    def _hub_split(self, split: str) -> list[Example]:
        if split not in self._hub_cache:
            from lorablocks.training.hub_data import load_hub

            self._hub_cache.update(load_hub(self.source))
        return self._hub_cache[split]


def resolve_domain(spec: str | os.PathLike) -> Domain:
    """Turn ``--data SPEC`` into a :class:`Domain` (folder, JSONL file or hub converter name)."""
    text = str(spec)
    path = Path(text).expanduser()
    if path.is_dir():
        missing = [s for s in SPLITS if not (path / f"{s}.jsonl").is_file()]
        if len(missing) == len(SPLITS):
            raise DataError(f"{path} is not a domain folder: it has none of train.jsonl, validation.jsonl, test.jsonl")
        return Domain(name=path.resolve().name, source=str(path), kind="folder")
    if path.is_file():
        return Domain(name=path.stem, source=str(path), kind="file")
    from lorablocks.training.hub_data import HUB_CONVERTERS

    name = text.removeprefix("hub:")
    if name in HUB_CONVERTERS:
        return Domain(name=name, source=name, kind="hub")
    raise DataError(
        f"{text} does not exist; a domain is a folder with train/validation/test.jsonl, one .jsonl file, "
        f"or a hub dataset ({', '.join(HUB_CONVERTERS)}; online only)"
    )


def resolve_domains(specs: Sequence[str | os.PathLike]) -> list[Domain]:
    """Resolve several domains; names are made unique (``name``, ``name-2``, ...) in the given order."""
    if not specs:
        raise DataError("no data given: name at least one domain (a folder with train/validation/test.jsonl)", setting="data")
    out: list[Domain] = []
    seen: dict[str, int] = {}
    for spec in specs:
        d = resolve_domain(spec)
        if d.name in seen:
            seen[d.name] += 1
            d.name = f"{d.name}-{seen[d.name]}"
        else:
            seen[d.name] = 1
        out.append(d)
    return out


# ---------------------------------------------------------------------------------------- tokenization


@dataclass(frozen=True)
class TokenizedExample:
    """Token ids of prompt + answer + EOS; the last ``len - n_prompt`` tokens are counted."""

    input_ids: tuple[int, ...]
    n_prompt: int
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_answer(self) -> int:
        """Counted (answer + EOS) tokens; a first token has no context, so it is never predicted."""
        return len(self.input_ids) - max(self.n_prompt, 1)


@dataclass
class TokenizedSet:
    """A tokenized split and how many of its examples were truncated."""

    examples: list[TokenizedExample]
    truncated: int
    max_length: int

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def answer_tokens(self) -> int:
        return sum(e.n_answer for e in self.examples)


def _truncate(prompt: list[int], answer: list[int], max_length: int) -> tuple[list[int], list[int], bool]:
    if len(prompt) + len(answer) <= max_length:
        return prompt, answer, False
    keep_a = min(len(answer), max(max_length - len(prompt), max_length // 2))
    keep_p = max_length - keep_a
    return (prompt[len(prompt) - keep_p :] if keep_p > 0 else []), answer[:keep_a], True


def leading_special_ids(tokenizer: Any) -> list[int]:
    """The tokens the tokenizer itself puts before any text: Gemma's and Llama's BOS; none for GPT-2 or
    SmolLM2. Gemma needs it: without ``<bos>`` Gemma 3 270M's math perplexity is 8.56 instead of 4.04."""
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    full = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start]
    return []


def tokenize_examples(tokenizer: Any, examples: Sequence[Example], max_length: int) -> TokenizedSet:
    """Tokenize prompts and answers separately, append EOS, truncate to ``max_length``.

    The only special tokens are the EOS and those the tokenizer puts before a text
    (:func:`leading_special_ids`, e.g. BOS), which start the prompt and survive truncation."""
    lead = leading_special_ids(tokenizer)
    if max_length < 2 + len(lead):
        raise DataError(f"max length must be at least {2 + len(lead)} tokens, got {max_length}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no end-of-sequence token")
    prompts = tokenizer([format_prompt(e) for e in examples], add_special_tokens=False)["input_ids"]
    answers = tokenizer([format_answer(e) for e in examples], add_special_tokens=False)["input_ids"]
    out: list[TokenizedExample] = []
    n_trunc = 0
    for p, a in zip(prompts, answers):
        p2, a2, cut = _truncate(list(p), list(a) + [eos], max_length - len(lead))
        n_trunc += cut
        p2 = lead + p2
        out.append(TokenizedExample(input_ids=tuple(p2 + a2), n_prompt=len(p2), truncated=cut))
    return TokenizedSet(examples=out, truncated=n_trunc, max_length=max_length)


# --------------------------------------------------------------------------------------------- batches


@dataclass
class Batch:
    """Right-padded tensors for a group of examples.

    ``target_mask[b, t]`` is true where position ``t`` predicts a counted token ``input_ids[b, t + 1]``;
    ``labels`` is the transformers-style equivalent (``-100`` on prompt and padding).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    target_mask: torch.Tensor
    labels: torch.Tensor

    @property
    def answer_tokens(self) -> int:
        return int(self.target_mask.sum())

    def to(self, device: Any) -> Batch:
        return Batch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.target_mask, self.labels)))


def collate(examples: Sequence[TokenizedExample], pad_id: int) -> Batch:
    """Right-pad ``examples`` to the longest of them."""
    if not examples:
        raise ValueError("cannot collate an empty batch")
    T = max(len(e) for e in examples)
    B = len(examples)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    attn = torch.zeros((B, T), dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    target = torch.zeros((B, T), dtype=torch.bool)
    for b, e in enumerate(examples):
        n = len(e)
        ids[b, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        attn[b, :n] = 1
        labels[b, e.n_prompt : n] = ids[b, e.n_prompt : n]
        # position t predicts token t+1; counted tokens are n_prompt..n-1 (a first token is never predicted)
        target[b, max(e.n_prompt, 1) - 1 : n - 1] = True
    if (labels[:, 0] != -100).any():
        labels[:, 0] = -100  # nothing predicts the first token
    return Batch(input_ids=ids, attention_mask=attn, target_mask=target, labels=labels)


def bucket_by_tokens(lengths: Sequence[int], max_tokens: int, max_batch: int | None = None) -> list[list[int]]:
    """Group indices by length (longest first) so each padded batch holds at most ``max_tokens`` tokens."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        width = lengths[cur[0]] if cur else lengths[i]  # sorted descending: the first is the longest
        if cur and ((len(cur) + 1) * width > max_tokens or (max_batch is not None and len(cur) >= max_batch)):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


def bucket_window(indices: Sequence[int], lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Split a window of indices into batches of ``batch_size`` by length (each batch pads to its own max)."""
    order = sorted(indices, key=lambda i: (lengths[i], i))
    return [list(order[k : k + batch_size]) for k in range(0, len(order), batch_size)]
