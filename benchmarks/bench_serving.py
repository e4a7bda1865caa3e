"""Live use of a combination: composition changes, generation throughput, and a served model under load.

    .venv/bin/python benchmarks/bench_serving.py [--load-seconds 10] [--clients 8] [--repeats 3] [--json FILE]

Measured side by side in one run on the default model (SmolLM2-135M-Instruct) with three blocks of the
paper's shape (rank 4 on q,k,v,o,down_proj, random non-zero factors, ``|dW| ~ 5 % |W|`` per module):

1. **composition change** on a running server (uvicorn on 127.0.0.1, HTTP round trip): add one block to two
   active ones (``POST /v1/blocks/c``) and remove it (``DELETE``), versus what a user does today to change
   the combination: load the merged model folder written by ``combine --merge-into`` (model + tokenizer,
   files already in the page cache), both in this process (``from_pretrained`` alone) and in a new Python
   process (what restarting a server on that folder costs at least). Floor: >= 20x, reported in ms.
2. **greedy throughput**, 128 new tokens (EOS ignored), three blocks active: lorablocks' generation loop on
   the composed model versus plain transformers ``generate`` on the same merged weights (the same tokens,
   checked) and versus PEFT with the three adapters attached unmerged. Floors: >= 0.95x of transformers,
   faster than PEFT.
3. **load**: ``--clients`` concurrent clients for ``--load-seconds`` (default 10; the issue's figure is 60)
   while the composition changes every second: requests/s, p50/p95 latency, errors, and responses whose
   text is not the greedy output of the composition whose fingerprint they report (must be 0).

4. **batching** (issue 16): today's path (a thread per generation, ``Runner(workers=4)``, the read lock held
   for a whole generation) and the scheduler (continuous batching, ``--max-batch 16``) side by side, each
   behind its own server on the same model (and the scheduler with 2 lanes: two decoding threads, one batch
   each, as many forwards at once as cores here), alternating: 1, 4, 8 and 16 clients each stream one chat answer
   of ``--batch-tokens`` (default 128; the two prompts run past it without EOS) at once: aggregate tokens/s
   (all tokens over the wall time) and time to first token (p50, max), the clients in a process of their own
   (``--clients-in-process``: threads of this one). Floors: >= 3x today's at 8 clients,
   1 client not lower. Then a composition change every 0.5 s for ``--change-seconds`` while
   ``--change-clients`` clients stream: the change's HTTP latency p50/p99 on each path (and how many answers
   a change cut: ``finish_reason`` ``composition_changed``, batched only).

Timings are the best (throughput, loading) or the median (changes) of ``--repeats`` alternating runs; torch
uses ``--threads`` intra-op threads (default 1, as the other benchmarks on the 2 shared cores); ``--dtype bfloat16``
serves every path from bfloat16 weights (``serve --dtype``).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj")
PROMPT = "Tell me a short story about a cat."


def write_blocks(model: torch.nn.Module, root: Path, names: list[str], rank: int = 4, rel: float = 0.05) -> None:
    """Blocks of the paper's shape with random non-zero factors, ``|dW| ~ rel * |W|`` per module."""
    from lorablocks.core.algebra import LowRank
    from lorablocks.files.writer import save_adapter

    for seed, name in enumerate(names, start=1):
        g, delta = torch.Generator().manual_seed(seed), {}
        for mod_name, module in model.named_modules():
            if mod_name.split(".")[-1] in TARGETS and isinstance(module, torch.nn.Linear):
                o, i = module.weight.shape
                a = torch.randn(rank, i, generator=g) / math.sqrt(i)
                b = torch.randn(o, rank, generator=g) * float(module.weight.detach().norm()) * rel / math.sqrt(o * rank)
                delta[mod_name] = LowRank(B=b, A=a)
        save_adapter(delta, root / name, base_model="smollm2-135m")


class Server:
    """uvicorn on 127.0.0.1 (a free port) in a background thread."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


# ------------------------------------------------------------------------------------------ 1. changes


def bench_change(live: Any, url: str, merged: Path, repeats: int) -> dict[str, Any]:
    import httpx
    from transformers import AutoModelForCausalLM, AutoTokenizer

    live.set_active([("a", 1.0), ("b", 1.0)])
    add, remove, add_srv, locked, load = [], [], [], [], []
    with httpx.Client(timeout=60) as client:
        for _ in range(repeats):
            t0 = time.perf_counter()
            r = client.post(url + "/v1/blocks/c", json={"weight": 1.0})
            add.append(time.perf_counter() - t0)
            assert r.status_code == 200 and len(r.json()["active"]) == 3, r.text
            add_srv.append(r.json()["seconds"])
            locked.append(r.json()["locked_seconds"])
            t0 = time.perf_counter()
            r = client.delete(url + "/v1/blocks/c")
            remove.append(time.perf_counter() - t0)
            assert r.status_code == 200 and len(r.json()["active"]) == 2, r.text
            t0 = time.perf_counter()
            model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32, local_files_only=True)
            AutoTokenizer.from_pretrained(merged, local_files_only=True)
            load.append(time.perf_counter() - t0)
            del model
    process = [_load_in_new_process(merged) for _ in range(repeats)]
    change = max(statistics.median(add), statistics.median(remove))
    return {"add_ms": 1e3 * statistics.median(add), "remove_ms": 1e3 * statistics.median(remove),
            "add_server_ms": 1e3 * statistics.median(add_srv), "add_locked_ms": 1e3 * statistics.median(locked),
            "load_merged_folder_ms": 1e3 * min(load), "ratio": min(load) / change,
            "new_process_ms": 1e3 * min(process), "ratio_new_process": min(process) / change, "floor": 20.0}


_LOAD = ("import sys, torch; torch.set_num_threads(int(sys.argv[2])); "
         "from transformers import AutoModelForCausalLM, AutoTokenizer; "
         "AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32, local_files_only=True); "
         "AutoTokenizer.from_pretrained(sys.argv[1], local_files_only=True)")


def _load_in_new_process(merged: Path) -> float:
    """What restarting a server on the merged folder costs at least: a new Python process until the model and
    tokenizer are loaded (no server, no generation)."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", _LOAD, str(merged), str(torch.get_num_threads())], check=True,
                   capture_output=True)
    return time.perf_counter() - t0


# --------------------------------------------------------------------------------------- 2. throughput


def _ours(model: Any, tok: Any, ids: list[int], n: int) -> tuple[float, int, str]:
    """lorablocks' generation loop, greedy, exactly ``n`` tokens (EOS does not stop it)."""
    from lorablocks.serving.generation import SamplingParams, generate_stream

    t0 = time.perf_counter()
    chunks = list(generate_stream(model, tok, ids, SamplingParams(max_new_tokens=n), eos_ids=set()))
    return time.perf_counter() - t0, chunks[-1].tokens, "".join(c.text for c in chunks)


def _hf(model: Any, tok: Any, ids: list[int], n: int) -> tuple[float, int, str]:
    """transformers' ``generate``, greedy, exactly ``n`` tokens (no EOS stop, as in ``_ours``)."""
    config = copy.deepcopy(model.generation_config)
    config.eos_token_id, config.pad_token_id, config.do_sample = [], tok.pad_token_id, False  # [] : never stop
    config.max_new_tokens, config.max_length = n, None
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             generation_config=config)
    seconds, new = time.perf_counter() - t0, out[0, len(ids):]
    return seconds, len(new), tok.decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def _peft_model(blocks: Path) -> Any:
    from peft import PeftModel

    from lorablocks.model.models import load_model

    base, _ = load_model("smollm2-135m")
    peft_model = PeftModel.from_pretrained(base, str(blocks / "a"), adapter_name="a")
    for name in ("b", "c"):
        peft_model.load_adapter(str(blocks / name), adapter_name=name)
    peft_model.base_model.set_adapter(["a", "b", "c"])
    return peft_model.eval()


def bench_throughput(live: Any, blocks: Path, n: int, repeats: int) -> dict[str, Any]:
    from lorablocks.serving.generation import encode_chat

    live.set_active([("a", 1.0), ("b", 1.0), ("c", 1.0)])
    model, tok = live.composed.model, live.composed.tokenizer
    ids = encode_chat(tok, [{"role": "user", "content": PROMPT}])
    peft_model = _peft_model(blocks)
    runs: dict[str, list[float]] = {"ours": [], "transformers": [], "peft": []}
    texts: dict[str, str] = {}
    for _ in range(repeats):  # alternate, keep the best of each
        for key, fn, m in (("ours", _ours, model), ("transformers", _hf, model), ("peft", _hf, peft_model)):
            seconds, count, texts[key] = fn(m, tok, ids, n)
            assert count == n, (key, count)
            runs[key].append(seconds)
    tps = {k: n / min(v) for k, v in runs.items()}
    return {"new_tokens": n, "ours_tokens_per_s": tps["ours"], "transformers_tokens_per_s": tps["transformers"],
            "peft_unmerged_tokens_per_s": tps["peft"], "ratio_vs_transformers": tps["ours"] / tps["transformers"],
            "ratio_vs_peft": tps["ours"] / tps["peft"], "same_text_as_transformers": texts["ours"] == texts["transformers"],
            "same_text_as_peft": texts["ours"] == texts["peft"], "floor_vs_transformers": 0.95, "floor_vs_peft": 1.0}


# --------------------------------------------------------------------------------------------- 3. load


COMPOSITIONS = [[], [("a", 1.0)], [("a", 1.0), ("b", 1.0)], [("a", 1.0), ("b", 1.0), ("c", 1.0)], [("c", -1.0)],
                [("b", 0.5), ("c", 1.0)]]


def _expected(live: Any, max_tokens: int) -> dict[str, str]:
    """The greedy answer of every composition, computed alone in this process, by fingerprint."""
    from lorablocks.serving.generation import SamplingParams, encode_prompt, generate_text

    ids = encode_prompt(live.composed.tokenizer, PROMPT, "raw")
    out = {}
    for entries in COMPOSITIONS:
        live.set_active(entries)
        out[live.fingerprint] = generate_text(live.composed.model, live.composed.tokenizer, ids,
                                              SamplingParams(max_new_tokens=max_tokens))[0]
    return out


def _client_loop(url: str, stop: threading.Event, max_tokens: int, results: list, streaming: bool) -> None:
    import httpx

    body = {"model": "smollm2-135m", "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}
    with httpx.Client(timeout=120) as client:
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                if streaming:
                    text, fps, status = [], set(), 0
                    with client.stream("POST", url + "/v1/completions", json={**body, "stream": True}) as r:
                        status = r.status_code
                        for line in r.iter_lines():
                            if line.startswith("data: {"):
                                event = json.loads(line[6:])
                                fps.add(event.get("system_fingerprint"))
                                text.append(event["choices"][0]["text"] if event.get("choices") else "")
                    fp = fps.pop() if len(fps) == 1 else None
                    results.append((status, fp, "".join(text), time.perf_counter() - t0))
                else:
                    r = client.post(url + "/v1/completions", json=body)
                    data = r.json()
                    text = data["choices"][0]["text"] if r.status_code == 200 else data["error"]["message"]
                    results.append((r.status_code, data.get("system_fingerprint"), text, time.perf_counter() - t0))
            except Exception as exc:  # noqa: BLE001 - counted as an error
                results.append((0, None, repr(exc), time.perf_counter() - t0))


def bench_load(live: Any, url: str, clients: int, seconds: float, max_tokens: int) -> dict[str, Any]:
    import httpx

    expected = _expected(live, max_tokens)
    stop, results, changes = threading.Event(), [], []
    threads = [threading.Thread(target=_client_loop, args=(url, stop, max_tokens, results, i % 2 == 1))
               for i in range(clients)]
    t_start = time.perf_counter()
    for t in threads:
        t.start()
    with httpx.Client(timeout=120) as client:
        k = 0
        while time.perf_counter() - t_start < seconds:
            entries = COMPOSITIONS[k % len(COMPOSITIONS)]
            t0 = time.perf_counter()
            r = client.put(url + "/v1/blocks", json={"active": [{"name": n, "weight": w} for n, w in entries]})
            changes.append((r.status_code, time.perf_counter() - t0))
            k += 1
            time.sleep(max(0.0, 1.0 - (time.perf_counter() - t0)))
    stop.set()
    for t in threads:
        t.join(300)
    elapsed = time.perf_counter() - t_start
    ok = [r for r in results if r[0] == 200]
    latencies = sorted(r[3] for r in ok)
    bad = [r for r in ok if expected.get(r[1]) != r[2]]
    return {"clients": clients, "seconds": elapsed, "requests": len(results), "requests_per_s": len(ok) / elapsed,
            "p50_ms": 1e3 * latencies[len(latencies) // 2] if latencies else None,
            "p95_ms": 1e3 * latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))] if latencies else None,
            "errors": len(results) - len(ok), "inconsistent": len(bad),
            "fingerprints_seen": len({r[1] for r in ok}), "changes": len(changes),
            "change_errors": sum(1 for s, _ in changes if s != 200),
            "change_p50_ms": 1e3 * statistics.median(c for _, c in changes) if changes else None}


# ------------------------------------------------------------------------------------------ 4. batching


LONG_PROMPTS = ("Write a long, detailed essay about the history of the Roman Empire.",
                "Explain in detail how a car engine works, step by step.")


def _stream_chat(client: Any, url: str, prompt: str, max_tokens: int) -> tuple[float | None, int, str | None]:
    """One streamed chat answer: (seconds to its first token, completion tokens, finish reason)."""
    body = {"model": "smollm2-135m", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    t0, first, tokens, finish = time.perf_counter(), None, 0, None
    with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            tokens = (event.get("usage") or {}).get("completion_tokens", tokens)
            for choice in event.get("choices", []):
                if choice["delta"].get("content") and first is None:
                    first = time.perf_counter() - t0
                finish = choice["finish_reason"] or finish
    return first, tokens, finish


def _burst(url: str, clients: int, max_tokens: int, own_process: bool = True) -> dict[str, Any]:
    """``clients`` answers at once: aggregate tokens/s over the wall time, time to first token. The clients run
    in a process of their own (``own_process``), so that they do not hold the server's GIL, as real clients on
    other machines or processes do not."""
    if own_process:
        done = subprocess.run([sys.executable, __file__, "--burst", url, str(clients), str(max_tokens)],
                              capture_output=True, text=True, timeout=1800, check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])
    return _burst_here(url, clients, max_tokens)


def _burst_here(url: str, clients: int, max_tokens: int) -> dict[str, Any]:
    """:func:`_burst`'s clients as threads of this process."""
    import httpx

    out: list[tuple[float | None, int, str | None]] = []

    def one(i: int) -> None:
        with httpx.Client(timeout=600) as client:
            out.append(_stream_chat(client, url, LONG_PROMPTS[i % 2], max_tokens))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(900)
    wall, ttft = time.perf_counter() - t0, sorted(r[0] for r in out if r[0] is not None)
    return {"clients": clients, "seconds": wall, "tokens": sum(r[1] for r in out),
            "tokens_per_s": sum(r[1] for r in out) / wall, "ttft_p50_ms": 1e3 * statistics.median(ttft),
            "ttft_max_ms": 1e3 * ttft[-1], "finished": sorted({str(r[2]) for r in out}), "answers": len(out)}


def _changes_under_load(live: Any, url: str, clients: int, seconds: float, max_tokens: int) -> dict[str, Any]:
    """Streaming clients in a loop while the composition changes every 0.5 s: the changes' HTTP latency."""
    import httpx

    stop, answers, latencies = threading.Event(), [], []

    def loop(i: int) -> None:
        with httpx.Client(timeout=600) as client:
            while not stop.is_set():
                answers.append(_stream_chat(client, url, LONG_PROMPTS[i % 2], max_tokens))

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    time.sleep(2.0)  # the clients are generating
    t_end, k = time.perf_counter() + seconds, 0
    with httpx.Client(timeout=600) as client:
        while time.perf_counter() < t_end:
            entries = COMPOSITIONS[1 + k % 3]
            t0 = time.perf_counter()
            r = client.put(url + "/v1/blocks", json={"active": [{"name": n, "weight": w} for n, w in entries]})
            assert r.status_code == 200, r.text
            latencies.append(time.perf_counter() - t0)
            k += 1
            time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join(900)
    latencies.sort()
    return {"changes": len(latencies), "p50_ms": 1e3 * statistics.median(latencies),
            "p99_ms": 1e3 * latencies[min(len(latencies) - 1, math.ceil(0.99 * len(latencies)) - 1)],
            "max_ms": 1e3 * latencies[-1], "answers": len(answers),
            "cut": sum(1 for a in answers if a[2] == "composition_changed")}


def bench_batching(live: Any, urls: dict[str, str], counts: list[int], max_tokens: int, change_seconds: float,
                   change_clients: int, own_process: bool = True) -> dict[str, Any]:
    import httpx

    live.set_active([("a", 1.0), ("b", 1.0)])
    for url in urls.values():  # warm up each path
        with httpx.Client(timeout=600) as client:
            _stream_chat(client, url, LONG_PROMPTS[0], 8)
    table: dict[str, dict[int, Any]] = {engine: {} for engine in urls}
    for n in counts:
        for engine, url in urls.items():
            table[engine][n] = _burst(url, n, max_tokens, own_process)
    changes = {engine: _changes_under_load(live, url, change_clients, change_seconds, max_tokens)
               for engine, url in urls.items()}
    ratios = {engine: {n: table[engine][n]["tokens_per_s"] / table["today"][n]["tokens_per_s"] for n in counts}
              for engine in urls if engine != "today"}
    return {"max_tokens": max_tokens, "table": table, "ratios": ratios, "changes": changes,
            "change_clients": change_clients, "floor_at_8": 3.0}


def _print_batching(b: dict[str, Any]) -> None:
    engines = list(b["table"])
    print(f"4. batching, {b['max_tokens']} new tokens per answer, all clients at once; today: a thread per generation "
          "(4 workers); batched: the scheduler (max batch 16), 1 lane or 2; tokens/s (ratio to today), TTFT p50/max ms")
    print("   clients" + "".join(f" {e:>34}" for e in engines))
    for n in b["table"]["today"]:
        cells = []
        for e in engines:
            r = b["table"][e][n]
            ratio = f" ({b['ratios'][e][n]:.2f}x)" if e != "today" else ""
            cells.append(f"{r['tokens_per_s']:.1f}{ratio} {r['ttft_p50_ms']:.0f}/{r['ttft_max_ms']:.0f}")
        print(f"   {n:>7}" + "".join(f" {c:>34}" for c in cells))
    for e, ratios in b["ratios"].items():
        print(f"   {e}: {ratios.get(8, 0):.2f}x at 8 clients (floor {b['floor_at_8']:.0f}x), {ratios.get(1, 0):.2f}x "
              "at 1 client (floor: not lower)")
    for engine, c in b["changes"].items():
        print(f"   change under load ({b['change_clients']} clients streaming), {engine}: p50 {c['p50_ms']:.0f} ms, "
              f"p99 {c['p99_ms']:.0f} ms, max {c['max_ms']:.0f} ms over {c['changes']} changes; {c['answers']} "
              f"answers, {c['cut']} cut by a change")


# --------------------------------------------------------------------------------------------- main


def _print(results: dict[str, Any]) -> None:
    c, g, lo = results.get("change"), results.get("throughput"), results.get("load")
    print(f"weights {results['dtype']}, {results['torch_threads']} torch thread(s)")
    if c:
        print(f"1. change on a running server: add {c['add_ms']:.1f} ms (server {c['add_server_ms']:.1f} ms, "
              f"generations held {c['add_locked_ms']:.1f} ms), remove {c['remove_ms']:.1f} ms; load the merged folder "
              f"in this process {c['load_merged_folder_ms']:.0f} ms -> {c['ratio']:.1f}x, in a new process "
              f"{c['new_process_ms']:.0f} ms -> {c['ratio_new_process']:.1f}x (floor {c['floor']:.0f}x); writing that "
              f"folder first (combine --merge-into, in process) took {c['merge_into_ms']:.0f} ms")
    if g:
        print(f"2. greedy, {g['new_tokens']} new tokens, 3 blocks: lorablocks {g['ours_tokens_per_s']:.1f} tok/s, "
              f"transformers generate (same merged weights) {g['transformers_tokens_per_s']:.1f} tok/s -> "
              f"{g['ratio_vs_transformers']:.2f}x (floor 0.95x, same text: {g['same_text_as_transformers']}); PEFT unmerged "
              f"{g['peft_unmerged_tokens_per_s']:.1f} tok/s -> {g['ratio_vs_peft']:.2f}x (same text: {g['same_text_as_peft']})")
    if lo:
        print(f"3. load: {lo['clients']} clients, {lo['seconds']:.1f} s, composition changed {lo['changes']} times "
              f"(median {lo['change_p50_ms']:.0f} ms under load): {lo['requests_per_s']:.2f} requests/s, p50 "
              f"{lo['p50_ms']:.0f} ms, p95 {lo['p95_ms']:.0f} ms, {lo['errors']} errors, {lo['inconsistent']} inconsistent "
              f"with their fingerprint ({lo['fingerprints_seen']} compositions seen, {lo['requests']} requests)")
    if results.get("batching"):
        _print_batching(results["batching"])


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--burst":  # the load generator's own process (see _burst)
        print(json.dumps(_burst_here(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--load-seconds", type=float, default=10.0, help="duration of the load test (issue: 60)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--load-max-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 on 2 shared cores, as the other benchmarks)")
    parser.add_argument("--parts", default="change,throughput,load,batching", help="comma-separated subset to run")
    parser.add_argument("--batch-clients", default="1,4,8,16", help="client counts of the batching part")
    parser.add_argument("--batch-tokens", type=int, default=128, help="new tokens per answer in the batching part")
    parser.add_argument("--change-seconds", type=float, default=30.0, help="changes under load, per path")
    parser.add_argument("--change-clients", type=int, default=8)
    parser.add_argument("--clients-in-process", action="store_true",
                        help="batching: run the clients as threads of this process (they then share its GIL)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="the served weights' dtype, for every path alike (serve --dtype)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from lorablocks.compose.operations import combine_files
    from lorablocks.model.session import ComposedModel
    from lorablocks.serving.blocks import BlockLibrary
    from lorablocks.serving.live import LiveModel, Runner
    from lorablocks.serving.scheduler import Scheduler
    from lorablocks.serving.server import AppSettings, create_app

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        composed = ComposedModel.load("smollm2-135m", dtype=getattr(torch, args.dtype))
        write_blocks(composed.model, root / "blocks", ["a", "b", "c"])
        t0 = time.perf_counter()
        combine_files([root / "blocks" / n for n in "abc"], root / "merged", merge_into="smollm2-135m")
        merge_seconds = time.perf_counter() - t0
        live = LiveModel(composed, BlockLibrary(root / "blocks"))
        settings = AppSettings(model_name="smollm2-135m", max_tokens_limit=512)
        server = Server(create_app(live, Runner(workers=4, queue=64), settings))  # today's path
        batched = Server(create_app(live, Scheduler(live, max_batch=16, queue=64), settings))
        laned = Server(create_app(live, Scheduler(live, max_batch=16, queue=64, lanes=2), settings))
        parts, results = args.parts.split(","), {"torch_threads": args.threads, "dtype": args.dtype}
        try:
            if "change" in parts:
                results["change"] = bench_change(live, server.url, root / "merged", args.repeats)
                results["change"]["merge_into_ms"] = 1e3 * merge_seconds  # writing the folder (combine --merge-into)
            if "throughput" in parts:
                results["throughput"] = bench_throughput(live, root / "blocks", args.new_tokens, args.repeats)
            if "load" in parts:
                results["load"] = bench_load(live, server.url, args.clients, args.load_seconds, args.load_max_tokens)
            if "batching" in parts:
                results["batching"] = bench_batching(live, {"today": server.url, "batched": batched.url,
                                                                "batched, 2 lanes": laned.url},
                                                     [int(n) for n in args.batch_clients.split(",")], args.batch_tokens,
                                                     args.change_seconds, args.change_clients,
                                                     own_process=not args.clients_in_process)
        finally:
            for s in (server, batched, laned):
                s.stop()
    _print(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
