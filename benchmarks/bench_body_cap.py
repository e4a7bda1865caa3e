"""A large request body against ``lorablocks serve`` (issue 14, item 7): how long the refusal takes, how long
``/health`` waits meanwhile, and the server's peak memory.

    .venv/bin/python benchmarks/bench_body_cap.py [--mb 50] [--model smollm2-135m] [--src OTHER_CHECKOUT/src]

Starts ``lorablocks serve`` on 127.0.0.1 (an empty blocks folder) in a new process, then, for a body of
``--mb`` MiB sent with ``Content-Length`` and then chunked (no length), asks ``/health`` every 0.2 s until the
upload is answered, and reports the slowest answer. ``--src`` runs the server from another source tree (for
example an older commit unpacked with ``git archive COMMIT src | tar -x -C DIR``), so two versions can be
measured side by side.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator

import httpx


def _peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        line = next(ln for ln in fh if ln.startswith("VmHWM"))
    return int(line.split()[1]) / 1024


def _upload(url: str, body: bytes, chunked: bool, out: dict) -> None:
    def chunks() -> Iterator[bytes]:
        for i in range(0, len(body), 1 << 16):
            yield body[i:i + (1 << 16)]

    t0 = time.perf_counter()
    try:
        r = httpx.post(url + "/v1/completions", content=chunks() if chunked else body, timeout=300,
                       headers={"content-type": "application/json"})
        out["status"] = str(r.status_code)
    except httpx.HTTPError as exc:
        out["status"] = type(exc).__name__
    out["seconds"] = time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=50)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--src", default=None, help="run the server from this source folder instead")
    args = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if args.src:
        env["PYTHONPATH"] = os.path.abspath(args.src)
    with tempfile.TemporaryDirectory() as blocks:
        proc = subprocess.Popen([sys.executable, "-m", "lorablocks", "serve", "--model", args.model, "--blocks", blocks,
                                 "--port", "0"], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env,
                                cwd=tempfile.gettempdir())
        try:
            line = ""
            while "serving" not in line:
                line = proc.stderr.readline()
                if not line and proc.poll() is not None:
                    raise SystemExit("the server did not start")
            url = re.search(r"http://127\.0\.0\.1:\d+", line).group(0)
            t0 = time.perf_counter()
            httpx.get(url + "/health", timeout=60)
            print(f"/health alone: {1000 * (time.perf_counter() - t0):.1f} ms; server peak RSS "
                  f"{_peak_rss_mb(proc.pid):.0f} MB")
            body = b'{"prompt": "' + b"a" * (args.mb << 20) + b'", "max_tokens": 1}'
            for chunked in (False, True):
                out: dict = {}
                upload = threading.Thread(target=_upload, args=(url, body, chunked, out))
                upload.start()
                waits = []
                while upload.is_alive() or not waits:  # /health every 0.2 s while the body is handled
                    time.sleep(0.2)
                    t0 = time.perf_counter()
                    httpx.get(url + "/health", timeout=600).raise_for_status()
                    waits.append(time.perf_counter() - t0)
                upload.join()
                print(f"{args.mb} MiB body ({'chunked' if chunked else 'Content-Length'}): {out['status']} after "
                      f"{out['seconds']:.2f} s; /health meanwhile: {len(waits)} probes, slowest "
                      f"{1000 * max(waits):.0f} ms; server peak RSS {_peak_rss_mb(proc.pid):.0f} MB")
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    main()
