"""Atomic outputs: never replace without force, replace only lorablocks' own outputs with force, leave no
temporaries, name the user's path in errors, honour the umask."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lorablocks.errors import LoraBlocksError, OutputExistsError
from lorablocks.files import interrupts, outputs
from lorablocks.files.outputs import (
    OutputRefusedError,
    OutputWriteError,
    atomic_dir,
    atomic_file,
    check_output_free,
    check_replaceable,
    one_line,
    output_kind,
    write_json,
)


def _lorablocks_output(folder: Path, kind: str = "adapter") -> Path:
    folder.mkdir(parents=True)
    (folder / "lorablocks.json").write_text(json.dumps({"tool": "lorablocks", "kind": kind}))
    (folder / "payload.txt").write_text("old")
    return folder


def _leftovers(folder: Path) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.startswith("."))


@pytest.fixture(params=["renameat2", "fallback"])
def rename_mode(request, monkeypatch):
    """Every test runs with Linux renameat2 and with the portable fallback (lock file, rename aside)."""
    if request.param == "fallback":
        monkeypatch.setattr(outputs, "_renameat2", lambda src, dst, flags: False)
    return request.param


def test_folder_created_during_the_run_survives(tmp_path, rename_mode):
    out = tmp_path / "race"
    with pytest.raises(OutputExistsError) as info:
        with atomic_dir(out, kind="adapter") as tmp:
            (tmp / "result.txt").write_text("new")
            out.mkdir()  # the user creates the output folder while lorablocks works
            (out / "notes.txt").write_text("data")
    assert (out / "notes.txt").read_text() == "data"
    assert sorted(os.listdir(out)) == ["notes.txt"]
    assert info.value.path == out and str(out) in str(info.value) and ".tmp-" not in str(info.value)
    assert "\n" not in str(info.value) and "--force" not in str(info.value)
    assert _leftovers(tmp_path) == []


def test_file_created_during_the_run_survives(tmp_path, rename_mode):
    out = tmp_path / "r.json"
    with pytest.raises(OutputExistsError):
        with atomic_file(out) as fh:
            fh.write("new")
            out.write_text("user")
    assert out.read_text() == "user"
    assert _leftovers(tmp_path) == []


def test_force_replaces_own_output_by_exchange(tmp_path, rename_mode):
    out = _lorablocks_output(tmp_path / "a")
    with atomic_dir(out, force=True, kind="adapter") as tmp:
        (tmp / "lorablocks.json").write_text(json.dumps({"tool": "lorablocks", "kind": "adapter"}))
    assert sorted(os.listdir(out)) == ["lorablocks.json"]
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("make", ["user_folder", "other_kind", "fake_marker", "file"])
def test_force_refuses_what_lorablocks_did_not_make(tmp_path, make):
    out = tmp_path / "out"
    if make == "user_folder":
        out.mkdir()
        (out / "notes.txt").write_text("data")
    elif make == "other_kind":
        _lorablocks_output(out, kind="study")
    elif make == "fake_marker":  # a study.json of someone else's is no signature
        out.mkdir()
        (out / "study.json").write_text("{}")
        (out / "lorablocks.json").write_text(json.dumps({"tool": "other", "kind": "adapter"}))
    else:
        out.write_text("user file")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(OutputRefusedError) as info:
        with atomic_dir(out, force=True, kind="adapter") as tmp:
            (tmp / "x").write_text("x")
    assert str(out) in str(info.value) and "\n" not in str(info.value)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_force_refuses_folder_holding_inputs_and_cwd(tmp_path, monkeypatch):
    par = _lorablocks_output(tmp_path / "par")
    (par / "math").mkdir()
    with pytest.raises(OutputRefusedError, match="holds the input"):
        check_output_free(par, True, kind="adapter", inputs=[par / "math"])
    monkeypatch.chdir(par / "math")
    for target in (".", "..", str(tmp_path)):
        with pytest.raises(OutputRefusedError, match="current folder"):
            check_output_free(target, True)
    assert (par / "payload.txt").exists()


def test_file_output_never_replaces_a_folder(tmp_path):
    target = _lorablocks_output(tmp_path / "dir.json")
    with pytest.raises(OutputRefusedError, match="file output never replaces a folder"):
        write_json(target, {"a": 1}, force=True)
    with pytest.raises(OutputRefusedError):
        check_replaceable(target, "file")
    assert (target / "payload.txt").read_text() == "old"
    # an ordinary file is replaced with force
    (tmp_path / "x.json").write_text("old")
    write_json(tmp_path / "x.json", {"a": 1}, force=True)
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": 1}
    assert _leftovers(tmp_path) == []


def test_check_output_free_creates_nothing(tmp_path):
    out = tmp_path / "a" / "b" / "c"
    assert check_output_free(out) == out
    assert not (tmp_path / "a").exists()
    with atomic_dir(out) as tmp:
        (tmp / "f").write_text("x")
    assert (out / "f").read_text() == "x"


def test_outputs_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "f").write_text("x")
        write_json(tmp_path / "f.json", {})
    finally:
        os.umask(old)
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "f.json").stat().st_mode & 0o777 == 0o640


def test_stale_temporaries_are_swept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale = tmp_path / f".out.tmp-{pid}-abc123"
    stale.mkdir()
    (stale / "big").write_text("x")
    live = tmp_path / f".out.tmp-{os.getppid()}-abc123"  # a running process's output is left alone
    live.mkdir()
    unrelated = tmp_path / ".other.tmp-1-x"
    unrelated.mkdir()
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "f").write_text("x")
    assert not stale.exists() and live.exists() and unrelated.exists()


def test_write_errors_name_the_output(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(OutputWriteError) as info:
        with atomic_dir(out) as tmp:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp / "model.safetensors"))
    msg = str(info.value)
    assert msg == f"cannot write {out}: No space left on device"
    assert not out.exists() and _leftovers(tmp_path) == []


def test_unwritable_parent_names_the_output(tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    if os.geteuid() == 0:  # root writes anywhere: refuse the temporary file as the kernel would for a user

        def deny(prefix, dir):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.path.join(dir, prefix + "abc"))

        monkeypatch.setattr(outputs.tempfile, "mkstemp", deny)
    else:
        locked.chmod(0o500)
    try:
        with pytest.raises(OutputWriteError, match="Permission denied") as info:
            write_json(locked / "x.json", {})
        assert str(info.value) == f"cannot write {locked / 'x.json'}: Permission denied"
    finally:
        locked.chmod(0o700)


def test_other_errors_pass_through_and_clean_up(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "f").write_text("x")
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


def test_output_kind_reads_records(tmp_path):
    assert output_kind(_lorablocks_output(tmp_path / "a", "merged-model")) == "merged-model"
    train = tmp_path / "t"
    train.mkdir()
    (train / "lorablocks_train.json").write_text(json.dumps({"tool": "lorablocks", "kind": "train"}))
    assert output_kind(train) == "adapter"
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "adapter_config.json").write_text("{}")
    (legacy / "lorablocks.json").write_text(json.dumps({"tool": "lorablocks"}))
    assert output_kind(legacy) == "adapter"
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "lorablocks.json").write_text("not json")
    assert output_kind(tmp_path / "junk") is None


def test_one_line():
    assert one_line(ValueError("")) == "ValueError"
    assert one_line(ValueError("\n  first\nsecond")) == "first"
    assert issubclass(OutputWriteError, LoraBlocksError)


def test_safetensors_write_failure_names_the_output(tmp_path):
    from safetensors import SafetensorError

    out = tmp_path / "merged"
    with pytest.raises(OutputWriteError) as info:
        with atomic_dir(out, kind="merged-model"):
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                  'message: "No space left on device" })')
    assert str(info.value) == f"cannot write {out}: No space left on device"
    assert os.listdir(tmp_path) == []


def test_real_safetensors_failure_in_a_removed_folder(tmp_path):
    """A genuine safetensors write error (its folder vanished) is reported against the output path."""
    import shutil

    import torch
    from safetensors.torch import save_file

    out = tmp_path / "m"
    with pytest.raises(OutputWriteError) as info:
        with atomic_dir(out) as tmp:
            shutil.rmtree(tmp)
            save_file({"x": torch.zeros(2)}, str(tmp / "model.safetensors"))
    assert str(info.value) == f"cannot write {out}: No such file or directory"


def test_force_replacement_leaves_no_moment_without_output(tmp_path, monkeypatch):
    out = _lorablocks_output(tmp_path / "a")
    seen = []
    remove = outputs._remove
    monkeypatch.setattr(outputs, "_remove", lambda p: (seen.append((out / "new.txt").exists()), remove(p)))
    with atomic_dir(out, force=True, kind="adapter") as tmp:
        (tmp / "lorablocks.json").write_text(json.dumps({"tool": "lorablocks", "kind": "adapter"}))
        (tmp / "new.txt").write_text("new")
    assert seen == [True]  # the old output is removed only once the new one is in place
    assert not (out / "payload.txt").exists()


def test_files_and_folders_are_fsynced_before_the_move(tmp_path, monkeypatch):
    synced = []
    fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), fsync(fd)))
    out = tmp_path / "d"
    with atomic_dir(out) as tmp:
        (tmp / "f").write_text("x")
    assert str(tmp / "f") in synced and str(tmp) in synced and str(tmp_path) in synced
    synced.clear()
    write_json(tmp_path / "x.json", {})
    assert any(".x.json.tmp-" in s for s in synced) and synced[-1] == str(tmp_path)


# --- inputs the running command has read (issue 14) ------------------------------------------------------


def test_no_output_is_holds_or_lies_inside_an_input_read(tmp_path):
    from lorablocks.files.outputs import check_not_input, note_input, reading_inputs

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "w.safetensors").write_bytes(b"weights")
    data = tmp_path / "x.jsonl"
    data.write_text("{}\n")
    note_input(adapter)  # outside a command: nothing is recorded
    with atomic_file(tmp_path / "free.json") as fh:
        fh.write("{}")
    with reading_inputs():
        note_input(adapter)
        note_input(data)
        for path, why in ((adapter / "w.safetensors", "inside the input"), (data, "is the input"),
                          (adapter / "new.json", "inside the input")):
            with pytest.raises(OutputRefusedError, match=why):
                with atomic_file(path, force=True) as fh:
                    fh.write("replaced")
        with pytest.raises(OutputRefusedError, match="holds the input"):
            check_not_input(tmp_path)
        with pytest.raises(OutputRefusedError, match="is the input"):
            check_output_free(adapter, force=True, kind="adapter")
        write_json(tmp_path / "elsewhere.json", {"ok": 1})  # not an input: written
    assert (adapter / "w.safetensors").read_bytes() == b"weights" and data.read_text() == "{}\n"
    assert sorted(os.listdir(adapter)) == ["w.safetensors"]
    with atomic_file(adapter / "new.json") as fh:  # the command is over: its inputs are forgotten
        fh.write("{}")


def test_nothing_is_moved_into_place_after_an_interrupt(tmp_path, monkeypatch):
    monkeypatch.setattr(interrupts, "_INTERRUPTED", False)
    assert not outputs.writing()
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(tmp_path / "out") as tmp:
            assert outputs.writing()
            (tmp / "f").write_text("x")
            outputs.note_interrupt()  # Ctrl-C, and the KeyboardInterrupt swallowed by a library
    assert os.listdir(tmp_path) == [] and not outputs.writing()
