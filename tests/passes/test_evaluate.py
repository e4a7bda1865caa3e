"""Evaluation: answer-only NLL, bucketing invariance, merged == adapter == PEFT, joint perplexity, CLI."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from tests.conftest import make_examples, tiny_gpt2, tiny_llama
from lorablocks.cli import run_app
from lorablocks.training.data import Example, collate, tokenize_examples
from lorablocks.passes.evaluate import AnswerNLL, DomainScore, answer_nll, evaluate_perplexity, prepare_eval_set
from tests.tiny_models import make_peft_adapter


def _examples(n=8, domain="words", seed=0):
    return [Example(**r) for r in make_examples(domain, n, seed, context=True)]


def _masked_ce_from_logits(model, batch):
    """Reference: full logits, shift, CE over labels != -100 (what transformers' loss does), summed."""
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    labels = batch.labels[:, 1:]
    lp = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), reduction="sum", ignore_index=-100
    )
    return float(lp), int((labels != -100).sum())


def test_answer_nll_equals_transformers_masked_loss(tiny_model, tok):
    _, model = tiny_model
    ts = tokenize_examples(tok, _examples(), 128)
    batch = collate(ts.examples, tok.pad_token_id)
    nll, cnt = answer_nll(model, batch)
    ref_sum, ref_cnt = _masked_ce_from_logits(model, batch)
    assert int(cnt.sum()) == ref_cnt == ts.answer_tokens
    assert float(nll.sum()) == pytest.approx(ref_sum, rel=1e-5)
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels)
    assert float(nll.sum() / cnt.sum()) == pytest.approx(float(out.loss.detach()), rel=1e-5)
    # the fast path (head on counted positions only) equals the full-logits path
    full = AnswerNLL(model)
    full.fast = False
    with torch.no_grad():
        nll_full, _ = full(batch.input_ids, batch.attention_mask, batch.target_mask)
    assert torch.allclose(nll, nll_full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_prompt_targets_do_not_count_answer_does(kind, tok):
    """On a 0-layer model the logits at position t depend only on token t (and t's position), so changing
    a prompt token other than the last changes only prompt targets: the loss must not move. Changing an
    answer token must move it."""
    model = (tiny_gpt2 if kind == "gpt2" else tiny_llama)(len(tok))
    if kind == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=32, n_layer=0, n_head=2)).eval()
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=0, num_attention_heads=4)).eval()
    ex = tokenize_examples(tok, _examples(1), 128).examples[0]
    assert ex.n_prompt > 3
    base, _ = answer_nll(model, collate([ex], 0))

    ids = list(ex.input_ids)
    ids[1] = (ids[1] + 17) % len(tok)  # a prompt token: it is the target of position 0 and input of 1
    changed_prompt = type(ex)(tuple(ids), ex.n_prompt)
    nll_p, _ = answer_nll(model, collate([changed_prompt], 0))
    assert torch.equal(nll_p, base)
    # sanity: an unmasked loss would have seen the change
    full_a = _masked_ce_from_logits(model, collate([type(ex)(ex.input_ids, 1)], 0))[0]
    full_b = _masked_ce_from_logits(model, collate([type(ex)(tuple(ids), 1)], 0))[0]
    assert full_a != pytest.approx(full_b, rel=1e-6)

    ids = list(ex.input_ids)
    ids[ex.n_prompt + 1] = (ids[ex.n_prompt + 1] + 17) % len(tok)  # an answer token
    nll_a, _ = answer_nll(model, collate([type(ex)(tuple(ids), ex.n_prompt)], 0))
    assert not torch.allclose(nll_a, base)


def test_bucketed_batches_equal_one_by_one(tiny_model, tok):
    _, model = tiny_model
    exs = _examples(10) + [Example(**r) for r in make_examples("math", 6)]
    es = prepare_eval_set(tok, {"mixed": exs}, max_length=128, batch_tokens=256)
    assert max(len(b) for b in es.plans["mixed"]) > 1  # really batched
    res = evaluate_perplexity(model, es)
    for (v, c), e in zip(res.per_example["mixed"], es.sets["mixed"].examples):
        nll, cnt = answer_nll(model, collate([e], tok.pad_token_id))
        assert int(cnt) == c
        assert float(nll) == pytest.approx(v, rel=1e-5, abs=1e-5)


def _random_adapter(model, kind, path, seed):
    """Save a PEFT LoRA adapter on a copy of ``model`` with random non-zero A and B (model left untouched)."""
    return make_peft_adapter(kind, path, seed, r=4, alpha=64, model=copy.deepcopy(model), std=0.05)


def test_adapter_equals_merged_model_equals_peft(tiny_model, tok, tmp_path):
    from peft import PeftModel

    from lorablocks.core import algebra
    from lorablocks.files.adapters import load_adapter
    from lorablocks.model.merge import apply_delta

    kind, model = tiny_model
    es = prepare_eval_set(tok, {"a": _examples(6), "b": [Example(**r) for r in make_examples("math", 5)]}, max_length=128)
    p1 = _random_adapter(model, kind, tmp_path / "a1", 1)
    p2 = _random_adapter(model, kind, tmp_path / "a2", 2)
    d1, d2 = load_adapter(p1).delta, load_adapter(p2).delta
    before = {k: v.clone() for k, v in model.state_dict().items()}

    base = evaluate_perplexity(model, es)
    via_delta = evaluate_perplexity(model, es, algebra.add([d1, d2], [1.0, -0.5]))
    for k, v in model.state_dict().items():  # weights restored exactly
        assert torch.equal(v, before[k]), k

    merged = copy.deepcopy(model)
    apply_delta(merged, d1)
    apply_delta(merged, d2, weight=-0.5)
    via_merged = evaluate_perplexity(merged, es)

    single = evaluate_perplexity(model, es, d1)
    peft = PeftModel.from_pretrained(copy.deepcopy(model), str(p1)).eval()
    via_peft = evaluate_perplexity(peft, es)

    for name in ("a", "b"):
        assert via_delta.domains[name].nll == pytest.approx(via_merged.domains[name].nll, rel=1e-5)
        assert single.domains[name].nll == pytest.approx(via_peft.domains[name].nll, rel=1e-5)
        assert via_delta.domains[name].nll != pytest.approx(base.domains[name].nll, rel=1e-3)  # not vacuous
        assert single.domains[name].nll != pytest.approx(base.domains[name].nll, rel=1e-3)


def test_joint_uses_equal_examples_per_domain_and_is_token_weighted(tiny_model, tok):
    _, model = tiny_model
    es = prepare_eval_set(tok, {"a": _examples(7), "b": [Example(**r) for r in make_examples("math", 3)]}, max_length=128)
    res = evaluate_perplexity(model, es)
    rows = res.per_example["a"][:3] + res.per_example["b"][:3]
    nll, tokens = math.fsum(v for v, _ in rows), sum(c for _, c in rows)
    assert res.joint.examples == 6 and res.joint.tokens == tokens
    assert res.joint.perplexity == pytest.approx(math.exp(nll / tokens), rel=1e-12)
    a = res.domains["a"]
    assert a.examples == 7 and a.perplexity == pytest.approx(math.exp(a.nll / a.tokens))
    d = res.to_dict()
    assert set(d["domains"]["a"]) >= {"perplexity", "nll", "tokens", "examples"}
    assert d["joint"]["examples_per_domain"] == 3
    again = evaluate_perplexity(model, es)
    assert again.to_dict() == d  # deterministic


def test_domain_score_hand_computed():
    s = DomainScore(nll=2 * math.log(3.0), tokens=2, examples=1)
    assert s.perplexity == pytest.approx(3.0)
    assert math.isnan(DomainScore(0.0, 0, 0).perplexity)


# ----------------------------------------------------------------------------------------------- CLI


def test_cli_eval_writes_json(tiny_model_dirs, domains, tmp_path):
    out = tmp_path / "e.json"
    rc = run_app(["eval", "--model", str(tiny_model_dirs["llama"]), "--data", str(domains["math"]),
                  str(domains["words"]), "--limit", "5", "--json", str(out)])
    assert rc == 0
    rec = json.loads(out.read_text())
    assert set(rec["domains"]) == {"math", "words"}
    assert rec["domains"]["math"]["examples"] == 5 and rec["joint"]["examples"] == 10
    assert math.isfinite(rec["joint"]["perplexity"])
    # an existing JSON is refused without --force
    assert run_app(["eval", "--model", str(tiny_model_dirs["llama"]), "--data", str(domains["math"]),
                    "--json", str(out)]) == 2
    assert run_app(["eval", "--model", str(tiny_model_dirs["llama"]), "--data", str(domains["math"]),
                    "--json", str(out), "--force"]) == 0


def _err(capsys):
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return " ".join(err.split())


def test_cli_eval_bad_inputs(tiny_model_dirs, domains, tmp_path, capsys, tok):
    llama, gpt2 = str(tiny_model_dirs["llama"]), str(tiny_model_dirs["gpt2"])
    from transformers import AutoModelForCausalLM

    g_adapter = _random_adapter(AutoModelForCausalLM.from_pretrained(gpt2), "gpt2", tmp_path / "g", 0)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "test.jsonl").write_text('{"id": "1", "question": "q", "answer": "a"}\n{oops\n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cases = [
        (["--model", llama, "--data", str(tmp_path / "nope")], "does not exist"),
        (["--model", llama, "--data", str(bad)], "test.jsonl:2: not valid JSON"),
        (["--model", llama, "--data", str(empty)], "holds no examples"),
        (["--model", str(tmp_path / "nomodel"), "--data", str(domains["math"])], "smollm2-135m"),
        (["--model", llama, "--adapter", str(g_adapter), "--data", str(domains["math"])], "was trained on"),
        (["--model", llama, "--adapter", str(g_adapter), "--ignore-base-model", "--data", str(domains["math"])],
         "no module"),
        (["--model", gpt2, "--adapter", str(g_adapter), "--weights", "1,2", "--data", str(domains["math"])],
         "2 values for 1 adapters"),
        (["--model", gpt2, "--adapter", str(tmp_path / "noadapter"), "--data", str(domains["math"])], "does not exist"),
        (["--model", gpt2, "--data", str(domains["math"]), "--limit", "0"], "--limit"),
    ]
    for args, message in cases:
        assert run_app(["eval", *args]) == 2, args
        assert message in _err(capsys), (args, message)
    # and the matching adapter works
    assert run_app(["eval", "--model", gpt2, "--adapter", str(g_adapter), "--data", str(domains["math"])]) == 0
