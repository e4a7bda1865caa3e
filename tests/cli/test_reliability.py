"""Reliability at the command line (issue 7): no user data lost with or without --force, Ctrl-C exits 130
with one line (also during imports), and nothing ever prints a traceback."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lorablocks.cli import run_app
from lorablocks.files import writer as adapter_files
from lorablocks.files.adapters import load_adapter
from tests.tiny_models import make_peft_adapter

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def blocks(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("blocks")
    return [make_peft_adapter("llama", root / f"d{i}", seed=30 + i, r=2) for i in range(2)]


def run(argv, capsys) -> tuple[int, str]:
    code = run_app([str(a) for a in argv])
    err = capsys.readouterr().err
    return code, err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def temporaries(*folders: Path) -> list[str]:
    return [n for f in folders for n in os.listdir(f) if ".tmp-" in n or ".old-" in n]


# --- user data is never deleted ---------------------------------------------------------------------------


def test_folder_created_during_combine_survives(tmp_path, blocks, capsys, monkeypatch):
    out = tmp_path / "race"
    finish = adapter_files.AdapterWriter._finish

    def user_creates_the_folder(self):
        out.mkdir()
        (out / "notes.txt").write_text("data")
        finish(self)

    monkeypatch.setattr(adapter_files.AdapterWriter, "_finish", user_creates_the_folder)
    code, err = run(["combine", *blocks, "--out", out], capsys)
    line = one_error_line(err)
    assert code == 2 and str(out) in line and ".tmp-" not in line and "--force" not in line
    assert snapshot(out) == {"notes.txt": b"data"}
    assert temporaries(tmp_path) == []


def test_force_onto_folder_holding_the_inputs_is_refused(tmp_path, capsys):
    par = tmp_path / "par"
    inputs = [make_peft_adapter("llama", par / name, seed=40 + i, r=2) for i, name in enumerate(["math", "med"])]
    (par / "notes.txt").write_text("mine")
    before = snapshot(par)
    code, err = run(["combine", *inputs, "--out", par, "--force"], capsys)
    assert code == 2 and str(par) in one_error_line(err)
    assert snapshot(par) == before
    # even when the folder carries a lorablocks record of its own
    (par / "lorablocks.json").write_text(json.dumps({"tool": "lorablocks", "kind": "adapter"}))
    before = snapshot(par)
    code, err = run(["combine", *inputs, "--out", par, "--force"], capsys)
    assert code == 2 and str(par) in one_error_line(err)
    assert snapshot(par) == before
    assert temporaries(tmp_path, par) == []


def test_force_onto_an_arbitrary_folder_is_refused(tmp_path, blocks, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.md").write_text("my report")
    (mine / "study.json").write_text("{}")  # a file of this name is no lorablocks signature
    code, err = run(["combine", *blocks, "--out", mine, "--force"], capsys)
    assert code == 2 and "lorablocks did not make" in one_error_line(err)
    assert snapshot(mine) == {"report.md": b"my report", "study.json": b"{}"}


def test_force_replaces_a_previous_output(tmp_path, blocks, capsys):
    out = tmp_path / "sum"
    assert run(["combine", *blocks, "--out", out], capsys)[0] == 0
    code, err = run(["combine", *blocks, "--out", out], capsys)
    assert code == 2 and "--force replaces it" in one_error_line(err)
    assert run(["combine", *blocks, "--weights", "1,-1", "--out", out, "--force"], capsys)[0] == 0
    assert load_adapter(out).delta and temporaries(tmp_path) == []


def test_similarity_json_onto_a_folder_is_refused(tmp_path, blocks, capsys):
    user_dir = tmp_path / "dir"
    user_dir.mkdir()
    (user_dir / "keep.txt").write_text("x")
    code, err = run(["similarity", *blocks, "--json", user_dir, "--force"], capsys)
    assert code == 2 and str(user_dir) in one_error_line(err)
    assert snapshot(user_dir) == {"keep.txt": b"x"}
    # nor is a previous lorablocks output folder replaced by a file
    made = tmp_path / "made"
    assert run(["combine", *blocks, "--out", made], capsys)[0] == 0
    before = snapshot(made)
    code, err = run(["similarity", *blocks, "--json", made, "--force"], capsys)
    last = err.strip().splitlines()[-1]  # refused when writing, after the table (see the issue 7 report)
    assert code == 2 and "never replaces a folder" in last and "Traceback" not in err
    assert snapshot(made) == before and temporaries(tmp_path) == []


def test_out_dot_force_is_refused_without_leftovers(tmp_path, blocks, capsys, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "lorablocks.json").write_text(json.dumps({"tool": "lorablocks", "kind": "adapter"}))
    monkeypatch.chdir(work)
    for target in (".", ".."):
        code, err = run(["combine", *blocks, "--out", target, "--force"], capsys)
        assert code == 2 and "current folder" in one_error_line(err)
    assert temporaries(tmp_path, work) == [] and sorted(os.listdir(work)) == ["lorablocks.json"]


# --- Ctrl-C -----------------------------------------------------------------------------------------------


def test_interrupted_combine_exits_130_in_one_line(tmp_path, blocks, capsys, monkeypatch):
    def interrupt(self, name, x):
        raise KeyboardInterrupt

    monkeypatch.setattr(adapter_files.AdapterWriter, "add", interrupt)
    code, err = run(["combine", *blocks, "--out", tmp_path / "out"], capsys)
    assert code == 130 and "interrupted" in one_error_line(err)
    assert os.listdir(tmp_path) == []


_BLOCKED = """
import sys, time
from pathlib import Path
from lorablocks.files import writer
READY = Path(sys.argv[1])
def block(self, name, x):
    READY.write_text("ready")
    time.sleep(60)
writer.AdapterWriter.add = block
from lorablocks.cli import main
sys.argv = ["lorablocks", "combine", *sys.argv[2:]]
main()
"""


def _interrupt_when_ready(script: str, ready: Path, args: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.Popen([sys.executable, "-c", script, str(ready), *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert ready.exists(), proc.communicate(timeout=60)[1]
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_sigint_to_a_running_combine_exits_130(tmp_path, blocks):
    out = tmp_path / "out"
    proc = _interrupt_when_ready(_BLOCKED, tmp_path / "ready", [*map(str, blocks), "--out", str(out)])
    assert proc.returncode == 130, proc.stderr
    assert "interrupted" in one_error_line(proc.stderr)
    assert not out.exists() and temporaries(tmp_path) == []


_INTERRUPTED_IMPORT = """
import sys
class Interrupt:
    def find_spec(self, name, path=None, target=None):
        if name == "lorablocks.cli.adapters":
            raise KeyboardInterrupt
sys.meta_path.insert(0, Interrupt())
from lorablocks.cli import main
sys.argv = ["lorablocks", "--help"]
main()
"""


def test_ctrl_c_during_imports_prints_no_traceback():
    proc = subprocess.run([sys.executable, "-c", _INTERRUPTED_IMPORT], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 130
    assert "interrupted" in one_error_line(proc.stderr)


_SWALLOWED = """
import sys, time
from pathlib import Path
READY = Path(sys.argv[1])
class Swallow:  # a library imported at start-up whose ``except BaseException`` swallows KeyboardInterrupt
    def find_spec(self, name, path=None, target=None):
        if name == "lorablocks.cli.adapters":
            READY.write_text("ready")
            try:
                time.sleep(30)
            except BaseException:
                pass
        return None
sys.meta_path.insert(0, Swallow())
from lorablocks.cli import main
sys.argv = ["lorablocks", "combine", *sys.argv[2:]]
main()
"""


def test_ctrl_c_swallowed_by_a_library_still_exits_130_and_writes_nothing(tmp_path, blocks):
    out = tmp_path / "out"
    proc = _interrupt_when_ready(_SWALLOWED, tmp_path / "ready", [*map(str, blocks), "--out", str(out)])
    assert proc.returncode == 130, proc.stderr
    assert "interrupted" in one_error_line(proc.stderr)
    assert not out.exists() and temporaries(tmp_path) == []


def test_ctrl_c_at_random_moments_of_combine_is_130_or_done(tmp_path, blocks):
    """SIGINT at seeded moments of start-up and work: every run either exits 130 with one line and no output,
    or (it finished first) exits 0 with the whole output; never ignored, aborted or with a traceback."""
    import random

    def start(out: Path) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "lorablocks", "combine", *map(str, blocks), "--out", str(out)],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})

    t0 = time.monotonic()
    whole = start(tmp_path / "uninterrupted")
    assert whole.wait(120) == 0 and load_adapter(tmp_path / "uninterrupted").delta
    seconds = time.monotonic() - t0  # the moments are drawn within this machine's own run time, now
    rng, interrupted = random.Random(14), 0
    for i, delay in enumerate(sorted(rng.uniform(0.05, 0.9) * seconds for _ in range(8))):
        out = tmp_path / f"out{i}"
        proc = start(out)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        if proc.returncode == 0:
            assert load_adapter(out).delta, err
            continue
        assert proc.returncode == 130, (delay, proc.returncode, err)
        assert "interrupted" in one_error_line(err), (delay, err)
        assert not out.exists() and temporaries(tmp_path) == []
        interrupted += 1
    assert interrupted >= 6  # every moment falls inside a run as long as the uninterrupted one (a few may finish)


_BLOCKED_LOAD = """
import sys, time
from pathlib import Path
from lorablocks.model import session
READY = Path(sys.argv[1])
def load(*args, **kwargs):
    READY.write_text("ready")
    time.sleep(60)
session.ComposedModel.load = load
from lorablocks.cli import main
sys.argv = ["lorablocks", "serve", *sys.argv[2:]]
main()
"""


def test_serve_interrupted_while_loading_exits_130(tmp_path, blocks):
    shelf = tmp_path / "blocks"
    shelf.mkdir()
    shutil.copytree(blocks[0], shelf / "b")
    proc = _interrupt_when_ready(_BLOCKED_LOAD, tmp_path / "ready", ["--blocks", str(shelf), "--port", "0"])
    assert proc.returncode == 130, proc.stderr
    assert "interrupted" in one_error_line(proc.stderr) and "stopped" not in proc.stderr


# --- no tracebacks ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("exc", [torch.linalg.LinAlgError("singular"), ValueError(""), json.JSONDecodeError("x", "", 0),
                                 RuntimeError("two\nlines [/bold] markup")])
def test_unexpected_errors_are_one_internal_error_line(tmp_path, blocks, capsys, monkeypatch, exc):
    def fail(self, name, x):
        raise exc

    monkeypatch.setattr(adapter_files.AdapterWriter, "add", fail)
    monkeypatch.delenv("LORABLOCKS_DEBUG", raising=False)
    code, err = run(["combine", *blocks, "--out", tmp_path / "out"], capsys)
    line = one_error_line(err)
    assert code == 1 and line.startswith("error: internal error: " + type(exc).__name__) and "please report" in line
    assert os.listdir(tmp_path) == []


def test_library_error_with_empty_message(tmp_path, blocks, capsys, monkeypatch):
    from lorablocks.errors import AdapterFormatError

    def fail(self, name, x):
        raise AdapterFormatError("")

    monkeypatch.setattr(adapter_files.AdapterWriter, "add", fail)
    code, err = run(["combine", *blocks, "--out", tmp_path / "out"], capsys)
    assert code == 2 and one_error_line(err) == "error: AdapterFormatError"


def test_force_hint_only_where_force_would_replace(tmp_path, blocks, capsys, monkeypatch):
    from lorablocks.errors import OutputExistsError

    def refuse(self, name, x):
        raise OutputExistsError("somewhere is not a lorablocks study folder")

    monkeypatch.setattr(adapter_files.AdapterWriter, "add", refuse)
    code, err = run(["combine", *blocks, "--out", tmp_path / "out"], capsys)
    assert code == 2 and one_error_line(err) == "error: somewhere is not a lorablocks study folder"


def test_disk_full_names_the_output(tmp_path, blocks, capsys, monkeypatch):
    import errno

    def full(self, name, x):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self._tmp / "adapter_model.safetensors"))

    monkeypatch.setattr(adapter_files.AdapterWriter, "add", full)
    out = tmp_path / "out"
    code, err = run(["combine", *blocks, "--out", out], capsys)
    assert code == 2 and one_error_line(err) == f"error: cannot write {out}: No space left on device"


def test_bad_adapter_configs_through_the_cli(tmp_path, blocks, capsys):
    import shutil

    for i, change in enumerate([{"rank_pattern": [1]}, {"alpha_pattern": {"q_proj": [2]}}, {"r": 2.5},
                                {"lora_alpha": float("nan")}]):
        path = tmp_path / f"bad{i}"
        shutil.copytree(blocks[0], path)
        cfg = json.loads((path / "adapter_config.json").read_text())
        cfg.update(change)
        (path / "adapter_config.json").write_text(json.dumps(cfg))
        code, err = run(["combine", path, blocks[1], "--out", tmp_path / "out"], capsys)
        assert code == 2 and next(iter(change)) in one_error_line(err)


def test_merge_into_never_replaces_the_base_model_folder(tmp_path, tiny_model_dirs, capsys):
    import shutil

    from tests.tiny_models import make_peft_adapter

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dirs["llama"], base)
    before = sorted(p.name for p in base.iterdir())
    a = make_peft_adapter("llama", tmp_path / "a", seed=1)
    code = run_app(["combine", str(a), "--merge-into", str(base), "--out", str(base), "--force"])
    err = capsys.readouterr().err
    assert code == 2 and "input" in err and "Traceback" not in err
    assert sorted(p.name for p in base.iterdir()) == before


def test_errors_name_the_flag_of_the_setting(tmp_path, capsys):
    from tests.tiny_models import make_peft_adapter

    a = make_peft_adapter("llama", tmp_path / "a", seed=1)
    assert run_app(["combine", str(a), "--weights", "1e39", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "--weights:" in err and "overflows" in err and not (tmp_path / "o").exists()
