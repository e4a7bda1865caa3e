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

Timings are the best (throughput, loading) or the median (changes) of ``--repeats`` alternating runs; torch
uses ``--threads`` intra-op threads (default 1, as the other benchmarks on the 2 shared cores).
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


# --------------------------------------------------------------------------------------------- main


def _print(results: dict[str, Any]) -> None:
    c, g, lo = results.get("change"), results.get("throughput"), results.get("load")
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--load-seconds", type=float, default=10.0, help="duration of the load test (issue: 60)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--load-max-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 on 2 shared cores, as the other benchmarks)")
    parser.add_argument("--parts", default="change,throughput,load", help="comma-separated subset to run")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from lorablocks.compose.operations import combine_files
    from lorablocks.model.session import ComposedModel
    from lorablocks.serving.blocks import BlockLibrary
    from lorablocks.serving.live import LiveModel, Runner
    from lorablocks.serving.server import AppSettings, create_app

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        composed = ComposedModel.load("smollm2-135m")
        write_blocks(composed.model, root / "blocks", ["a", "b", "c"])
        t0 = time.perf_counter()
        combine_files([root / "blocks" / n for n in "abc"], root / "merged", merge_into="smollm2-135m")
        merge_seconds = time.perf_counter() - t0
        live = LiveModel(composed, BlockLibrary(root / "blocks"))
        runner = Runner(workers=4, queue=64)
        server = Server(create_app(live, runner, AppSettings(model_name="smollm2-135m", max_tokens_limit=512)))
        parts, results = args.parts.split(","), {"torch_threads": args.threads}
        try:
            if "change" in parts:
                results["change"] = bench_change(live, server.url, root / "merged", args.repeats)
                results["change"]["merge_into_ms"] = 1e3 * merge_seconds  # writing the folder (combine --merge-into)
            if "throughput" in parts:
                results["throughput"] = bench_throughput(live, root / "blocks", args.new_tokens, args.repeats)
            if "load" in parts:
                results["load"] = bench_load(live, server.url, args.clients, args.load_seconds, args.load_max_tokens)
        finally:
            server.stop()
    _print(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
