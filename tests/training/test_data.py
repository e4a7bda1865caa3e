"""Data: JSONL reading and its errors, domains, the prompt template, answer-only tokenization, batches."""

from __future__ import annotations

import json

import pytest
import torch

from lorablocks.training.hub_data import HUB_CONVERTERS
from lorablocks.training.data import (
    Example,
    TokenizedExample,
    bucket_by_tokens,
    collate,
    format_answer,
    format_prompt,
    leading_special_ids,
    read_jsonl,
    resolve_domain,
    resolve_domains,
    tokenize_examples,
)
from lorablocks.errors import DataError


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


# ------------------------------------------------------------------------------------------- reading


def test_read_jsonl_reads_schema_and_limit(tmp_path):
    p = _write(tmp_path / "a.jsonl", [
        json.dumps({"id": "1", "question": "q1", "answer": "a1"}),
        "",
        json.dumps({"id": "2", "question": "q2", "answer": "a2", "context": "c2"}),
        json.dumps({"id": "3", "question": "q3", "answer": "a3"}),
    ])
    rows = read_jsonl(p)
    assert [r.id for r in rows] == ["1", "2", "3"]
    assert rows[1].context == "c2" and rows[0].context is None
    assert [r.id for r in read_jsonl(p, limit=2)] == ["1", "2"]


@pytest.mark.parametrize(
    "lines, message",
    [
        ([], "holds no examples"),
        (['{"id": "1", "question": "q", "answer": "a"}', "{not json"], ":2: not valid JSON"),
        (['{"id": "1", "question": "q"}'], ":1: missing field 'answer'"),
        (['{"id": "1", "question": "q", "answer": 3}'], ":1: field 'answer' must be a non-empty string"),
        (['{"id": "1", "question": "  ", "answer": "a"}'], ":1: field 'question' must be a non-empty string"),
        (['["a", "b"]'], ":1: expected a JSON object"),
        (['{"id": "1", "question": "q", "answer": "a", "context": 5}'], ":1: field 'context'"),
    ],
)
def test_read_jsonl_errors_name_file_and_line(tmp_path, lines, message):
    p = _write(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError) as exc:
        read_jsonl(p)
    assert str(p) in str(exc.value) and message in str(exc.value)


def test_read_jsonl_missing_and_binary(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_jsonl(tmp_path / "nope.jsonl")
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DataError, match="bin.jsonl"):
        read_jsonl(tmp_path / "bin.jsonl")


# ------------------------------------------------------------------------------------------- domains


def test_resolve_domain_folder_file_and_errors(domains, tmp_path):
    d = resolve_domain(domains["math"])
    assert d.kind == "folder" and d.name == "math"
    assert len(d.load("train")) == 48 and len(d.load("test", limit=5)) == 5
    assert d.load("test", limit=5) == d.load("test")[:5]  # the first N: deterministic
    f = resolve_domain(domains["words"] / "test.jsonl")
    assert f.kind == "file" and f.name == "test" and len(f.load("train")) == 12
    assert len(d.fingerprint("train")) == 64 and d.fingerprint("train") != d.fingerprint("test")
    with pytest.raises(DataError, match="does not exist"):
        resolve_domain(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="not a domain folder"):
        resolve_domain(tmp_path / "empty")
    with pytest.raises(DataError, match="unknown split"):
        d.load("dev")
    with pytest.raises(DataError, match="positive"):
        d.load("test", limit=0)


def test_resolve_domains_unique_names(domains):
    ds = resolve_domains([domains["math"], domains["math"] / "train.jsonl", domains["math"]])
    assert [d.name for d in ds] == ["math", "train", "math-2"]
    with pytest.raises(DataError, match="no data"):
        resolve_domains([])


def test_hub_domain_is_clear_offline(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *a, **k):
        if name == "datasets":
            raise ImportError("no datasets")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    d = resolve_domain("gsm8k")
    assert d.kind == "hub"
    with pytest.raises(DataError, match="network"):
        d.load("train")


def test_gsm8k_converter_matches_local_schema():
    row = {"question": "A  has\n2 apples?", "answer": "He has 1+1=<<1+1=2>>2 apples.\n#### 2"}
    ex = HUB_CONVERTERS["gsm8k"].convert(row, 7)
    assert ex.question == "A has 2 apples?"
    assert ex.answer == "He has 1+1=2 apples.\nThe answer is 2."


# ------------------------------------------------------------------------------------------ template


def test_prompt_template_with_and_without_context():
    assert format_prompt(Example("1", "Why?", "Because.")) == "Question: Why?\nAnswer:"
    assert format_prompt(Example("1", "Why?", "Because.", "Some text.")) == (
        "Context: Some text.\nQuestion: Why?\nAnswer:"
    )
    assert format_answer(Example("1", "Why?", "Because.")) == " Because."


def test_tokenize_counts_answer_and_eos_only(tok):
    ex = Example("1", "What is two plus three?", "The answer is five.")
    ts = tokenize_examples(tok, [ex], max_length=256)
    e = ts.examples[0]
    prompt = tok(format_prompt(ex), add_special_tokens=False)["input_ids"]
    answer = tok(format_answer(ex), add_special_tokens=False)["input_ids"]
    assert list(e.input_ids) == prompt + answer + [tok.eos_token_id]
    assert e.n_prompt == len(prompt) and e.n_answer == len(answer) + 1
    assert ts.truncated == 0 and ts.answer_tokens == e.n_answer


def test_truncation_is_explicit_and_keeps_prompt_end(tok):
    long_ctx = Example("1", "What?", "short answer here", context="word " * 200)
    long_ans = Example("2", "What?", "many words " * 100)
    ts = tokenize_examples(tok, [long_ctx, long_ans, Example("3", "q", "a")], max_length=40)
    assert ts.truncated == 2
    a, b, c = ts.examples
    assert a.truncated and b.truncated and not c.truncated
    assert len(a) == 40 and len(b) == 40
    # the prompt keeps its end ("Answer:") and the short answer is kept whole with its EOS
    assert tok.decode(a.input_ids[: a.n_prompt]).endswith("Answer:")
    assert a.input_ids[-1] == tok.eos_token_id
    # a long answer keeps its start; its EOS is cut
    assert b.n_answer >= 19 and b.input_ids[-1] != tok.eos_token_id
    with pytest.raises(DataError):
        tokenize_examples(tok, [c], max_length=1)


def _bos_tokenizer():
    """The tiny tokenizer with a ``<bos>`` that it puts before every text, as Gemma's and Llama's do."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    from tests.conftest import tiny_tokenizer

    backend = tiny_tokenizer().backend_tokenizer
    backend.add_special_tokens(["<bos>"])
    bos = backend.token_to_id("<bos>")
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


def test_examples_start_with_the_tokenizers_bos_which_survives_truncation(tok):
    assert leading_special_ids(tok) == []  # GPT-2-like: nothing before a text, examples unchanged (test above)
    btok = _bos_tokenizer()
    bos = btok.bos_token_id
    assert leading_special_ids(btok) == [bos] and btok("Hi")["input_ids"][0] == bos
    ex = Example("1", "What is two plus three?", "The answer is five.")
    e = tokenize_examples(btok, [ex], max_length=256).examples[0]
    prompt = btok(format_prompt(ex), add_special_tokens=False)["input_ids"]
    answer = btok(format_answer(ex), add_special_tokens=False)["input_ids"]
    assert list(e.input_ids) == [bos] + prompt + answer + [btok.eos_token_id]
    assert e.n_prompt == len(prompt) + 1 and e.n_answer == len(answer) + 1  # BOS is prompt: never counted
    cut = tokenize_examples(btok, [Example("2", "What?", "short", context="word " * 200)], max_length=40).examples[0]
    assert cut.truncated and len(cut) == 40 and cut.input_ids[0] == bos and list(cut.input_ids).count(bos) == 1
    assert btok.decode(cut.input_ids[: cut.n_prompt]).endswith("Answer:")
    with pytest.raises(DataError, match="at least 3 tokens"):
        tokenize_examples(btok, [ex], max_length=2)


# ------------------------------------------------------------------------------------------- batches


def test_collate_masks_prompt_and_padding():
    a = TokenizedExample((5, 6, 7, 8), n_prompt=2)
    b = TokenizedExample((9, 10, 11), n_prompt=1)
    batch = collate([a, b], pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8], [9, 10, 11, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert batch.labels.tolist() == [[-100, -100, 7, 8], [-100, 10, 11, -100]]
    # position t predicts token t + 1: the same tokens as the labels, shifted
    assert batch.target_mask.tolist() == [[False, True, True, False], [True, True, False, False]]
    shifted = batch.labels[:, 1:] != -100
    assert torch.equal(batch.target_mask[:, :-1], shifted)
    assert batch.answer_tokens == a.n_answer + b.n_answer == 4


def test_bucket_by_tokens_covers_each_index_once_within_budget():
    lengths = [5, 50, 7, 30, 31, 2, 64, 8, 9, 10]
    batches = bucket_by_tokens(lengths, max_tokens=64)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(len(lengths)))
    for b in batches:
        assert len(b) * max(lengths[i] for i in b) <= 64
    # longest first: [64] [50] [31, 30] [10, 9, 8, 7, 5, 2] -> padding 1 + 19 tokens
    assert [[lengths[i] for i in b] for b in batches] == [[64], [50], [31, 30], [10, 9, 8, 7, 5, 2]]
    assert all(len(b) <= 2 for b in bucket_by_tokens(lengths, max_tokens=1000, max_batch=2))


def test_bad_utf8_is_named_by_its_line(tmp_path):
    from lorablocks.errors import DataError
    from lorablocks.training.data import read_jsonl

    f = tmp_path / "d.jsonl"
    f.write_bytes(b'{"id": "1", "question": "q", "answer": "a"}\n{"id": "2", "question": "\xff", "answer": "a"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: not UTF-8"):
        read_jsonl(f)
