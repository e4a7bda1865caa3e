"""The ``generate`` and ``serve`` verbs: flags, one-line refusals, and a real ``serve`` process stopped by
Ctrl-C (SIGINT) cleanly."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from lorablocks.cli import run_app
from lorablocks.errors import LoraBlocksError


def test_parse_active():
    from lorablocks.cli.serving import parse_active

    assert parse_active("math,medicine:0.5, finance:-1") == (("math", 1.0), ("medicine", 0.5), ("finance", -1.0))
    assert parse_active(None) == () and parse_active("") == ()
    assert parse_active("v2:final:1,math") == (("v2:final", 1.0), ("math", 1.0))  # a name holding ':'
    with pytest.raises(LoraBlocksError, match="NAME:1"):
        parse_active("v2:final")
    for bad in ("math:lots", "math:nan", "math:inf"):
        with pytest.raises(LoraBlocksError, match="--active"):
            parse_active(bad)


def test_generate_streams_the_answer(model_dir, blocks_dir, capsys):
    from lorablocks.model.session import ComposedModel
    from lorablocks.serving.generation import SamplingParams, encode_prompt, generate_text

    composed = ComposedModel.load(str(model_dir))
    ids = encode_prompt(composed.tokenizer, "What is two plus three?", "qa")
    expected = generate_text(composed.model, composed.tokenizer, ids, SamplingParams(max_new_tokens=6))[0]
    assert run_app(["generate", "--model", str(model_dir), "--template", "qa", "--max-new-tokens", "6",
                    "What is two plus three?"]) == 0
    out = capsys.readouterr()
    assert out.out == expected + "\n" and "composition base" in out.err
    argv = ["generate", "--model", str(model_dir), "--max-new-tokens", "6", "--temperature", "0.8", "--seed", "5"]
    assert run_app(argv + ["hi"]) == 0
    first = capsys.readouterr().out
    assert run_app(argv + ["hi"]) == 0
    assert capsys.readouterr().out == first


@pytest.mark.parametrize("args, message", [
    (["--weights", "1"], "1 values for 0 adapters"),
    (["--template", "story"], "--template takes qa"),
    (["--temperature", "-1"], "temperature"),
    (["--top-p", "0"], "top_p"),
    (["--max-new-tokens", "0"], "max_new_tokens"),
    (["--max-new-tokens", "600"], "context of 512"),
    (["--adapter", "MISSING"], "does not exist"),
    (["--adapter", "BLOCKS/wide"], "another base model"),
    (["--adapter", "BLOCKS/math", "--weights", "1,2"], "2 values for 1 adapters"),
])
def test_generate_refuses_bad_input_in_one_line(model_dir, blocks_dir, capsys, args, message):
    args = [a.replace("BLOCKS", str(blocks_dir)).replace("MISSING", str(blocks_dir / "missing")) for a in args]
    assert run_app(["generate", "--model", str(model_dir), *args, "hi"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if "error" in line]) == 1


def test_serve_refuses_bad_input_before_loading(model_dir, blocks_dir, tmp_path, capsys):
    cases = [
        (["--blocks", str(tmp_path / "none")], "does not exist"),
        (["--blocks", str(blocks_dir), "--active", "nope"], "no block named 'nope'"),
        (["--blocks", str(blocks_dir), "--active", "../math"], "not a plain folder name"),
        (["--blocks", str(blocks_dir), "--port", "70000"], "--port"),
        (["--blocks", str(blocks_dir), "--dtype", "float16"], "must be one of float32, bfloat16"),
    ]
    for args, message in cases:
        assert run_app(["serve", "--model", str(model_dir), *args]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err


def test_serve_refuses_a_port_in_use(model_dir, blocks_dir, capsys):
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        assert run_app(["serve", "--model", str(model_dir), "--blocks", str(blocks_dir), "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def test_serve_process_answers_and_stops_cleanly_on_ctrl_c(model_dir, blocks_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "lorablocks", "serve", "--model", str(model_dir), "--blocks",
                             str(blocks_dir), "--port", "0", "--active", "math:0.5"],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    try:
        line, deadline = "", time.monotonic() + 120
        while "serving" not in line and time.monotonic() < deadline and proc.poll() is None:
            line = proc.stderr.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
        assert match, line
        url = match.group(0)
        state = httpx.get(url + "/blocks", timeout=30).json()
        assert state["active"] == [{"name": "math", "weight": 0.5}]
        r = httpx.post(url + "/completions", json={"prompt": "x", "max_tokens": 4, "temperature": 0}, timeout=30)
        assert r.status_code == 200 and r.json()["system_fingerprint"] == state["fingerprint"]
        refused = [  # each one line in the server's log, none a traceback
            httpx.post(url + "/completions", content=b'{"prompt": "\\ud800"}', timeout=30,
                       headers={"content-type": "application/json"}),
            httpx.post(url + "/blocks/math", headers={"host": "evil.example"}, timeout=30),
            httpx.post(url + "/blocks/math", content=b"", headers={"content-type": "text/plain"}, timeout=30),
            httpx.put(url + "/blocks", json={"active": [{"name": "corrupt"}]}, timeout=30),
        ]
        assert [r.status_code for r in refused] == [422, 421, 415, 422]
        assert httpx.get(url + "/blocks", timeout=30).json()["active"] == state["active"]
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=60)
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert rc == 0, err
    assert "stopped" in err and "Traceback" not in err and "Exception in ASGI" not in err
    logged = [line for line in err.splitlines() if re.search(r" (WARNING|ERROR) \d{3} ", line)]
    assert [re.search(r" (\d{3}) (POST|PUT) ", line).group(1) for line in logged] == ["422", "421", "415", "422"], err
