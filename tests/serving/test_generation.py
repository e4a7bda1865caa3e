"""Streamed generation: greedy equals transformers' greedy ``generate``, seeded sampling repeats, stop strings
end the text without sending any part of them, prompts follow the templates."""

from __future__ import annotations

import pytest
import torch

from lorablocks.serving.errors import RequestError
from lorablocks.serving.generation import (SamplingParams, _StopDecoder, check_length, encode_chat, encode_prompt,
                                           generate_stream, generate_text)
from tests.conftest import tiny_gpt2, tiny_llama


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def tiny(request, tok):
    build = tiny_gpt2 if request.param == "gpt2" else tiny_llama
    return build(len(tok)), tok


def test_greedy_equals_transformers_generate(tiny):
    model, tok = tiny
    ids = encode_prompt(tok, "Question: What is two plus three?\nAnswer:", "raw")
    ours = [c for c in generate_stream(model, tok, ids, SamplingParams(max_new_tokens=12), eos_ids=set())]
    assert ours[-1].finish_reason == "length" and ours[-1].tokens == 12
    expected = model.generate(torch.tensor([ids]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                              pad_token_id=tok.eos_token_id)[0, len(ids):]
    text = "".join(c.text for c in ours)
    assert text == tok.decode(expected, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def test_sampling_repeats_under_a_seed_and_differs_across_seeds(tiny):
    model, tok = tiny
    ids = encode_prompt(tok, "The quick brown fox", "raw")

    def run(seed: int, **kw) -> str:
        return generate_text(model, tok, ids, SamplingParams(max_new_tokens=16, seed=seed, **kw))[0]

    assert run(3, temperature=1.5) == run(3, temperature=1.5)
    assert len({run(s, temperature=1.5) for s in range(4)}) > 1
    assert run(0) == run(1, top_p=1e-6, temperature=1.0)  # a nucleus of one token is greedy


class _CharTokenizer:
    """One token per character: enough to test stop strings exactly."""

    def decode(self, ids, **_):
        return "".join(chr(i) for i in ids)


@pytest.mark.parametrize("text, stop, sent, reason", [
    ("hello world", ["wor"], "hello ", "stop"),
    ("hello world", ["xyz"], "hello world", None),
    ("abcabd", ["abd"], "abc", "stop"),
    ("hello", ["lo", "ell"], "h", "stop"),
])
def test_stop_strings_cut_the_text_and_are_never_half_sent(text, stop, sent, reason):
    dec = _StopDecoder(_CharTokenizer(), stop)
    out, stopped = [], False
    for ch in text:
        piece, stopped = dec.push(ord(ch))
        out.append(piece)
        if stopped:
            break
        assert not any(s in "".join(out) for s in stop)
    if not stopped:
        out.append(dec.finish())
    assert "".join(out) == sent
    assert (reason == "stop") == stopped


def test_prompt_templates(tok):
    assert tok.decode(encode_prompt(tok, "Why?", "qa")) == "Question: Why?\nAnswer:"
    assert tok.decode(encode_prompt(tok, "Why?", "raw")) == "Why?"
    # the tiny tokenizer has no chat template: role lines, then the assistant's turn
    assert tok.decode(encode_chat(tok, [{"role": "user", "content": "Hi"}])) == "user: Hi\nassistant:"
    assert encode_prompt(tok, "Hi", "auto") == encode_prompt(tok, "Hi", "raw")
    assert encode_prompt(tok, "", "raw") == [tok.eos_token_id]  # an empty prompt starts a document


def test_bad_sampling_settings_and_context_length(tiny):
    model, _ = tiny
    for bad in ({"max_new_tokens": 0}, {"temperature": -1.0}, {"top_p": 0.0}, {"top_p": 1.5}):
        with pytest.raises(RequestError):
            SamplingParams(**bad)
    with pytest.raises(RequestError, match="context of 512"):
        check_length(model, 500, 13)
    check_length(model, 500, 12)


def test_should_stop_ends_generation_early(tiny):
    model, tok = tiny
    chunks = list(generate_stream(model, tok, [1, 2, 3], SamplingParams(max_new_tokens=50), should_stop=lambda: True))
    assert chunks[-1].finish_reason == "length" and chunks[-1].tokens == 0


@pytest.mark.parametrize("temperature", [1e-300, 5e-324, 1e-45])
def test_a_tiny_temperature_is_the_greedy_limit_never_nan(tiny, temperature):
    from lorablocks.serving.generation import _next_token

    model, tok = tiny
    ids = encode_prompt(tok, "The quick brown fox", "raw")
    greedy = generate_text(model, tok, ids, SamplingParams(max_new_tokens=8))[0]
    for top_p in (1.0, 0.9):
        params = SamplingParams(max_new_tokens=8, temperature=temperature, top_p=top_p, seed=1)
        assert generate_text(model, tok, ids, params)[0] == greedy
    tied = torch.tensor([0.5, 3.0, -1.0, 3.0])  # a tie at the top: one of the two, each about half the time
    picks = {_next_token(tied, SamplingParams(temperature=temperature), torch.Generator().manual_seed(s))
             for s in range(32)}
    assert picks == {1, 3}


def test_the_context_blames_the_prompt_when_it_alone_fills_it(tiny):
    model, _ = tiny
    with pytest.raises(RequestError, match="the prompt is 512 tokens, too long for the model's context of 512") as e:
        check_length(model, 512, 1)
    assert e.value.setting is None
    with pytest.raises(RequestError, match="max_new_tokens 20 does not fit.*leaves room for 12") as e:
        check_length(model, 500, 20)
    assert e.value.setting == "max_new_tokens"
    check_length(model, 500, 12)
