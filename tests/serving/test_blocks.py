"""The block library (names, folders, symlinks) and the live composition (exact, unchanged on error, and a
readers-writer lock that makes a change wait for running generations and hold new ones)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from lorablocks.errors import CompositionError, ShapeMismatchError
from lorablocks.serving.blocks import BlockLibrary, check_block_name
from lorablocks.serving.errors import BlockNameError, UnknownBlockError
from lorablocks.serving.live import BASE_FINGERPRINT, RWLock, Runner
from lorablocks.serving.errors import ServerBusyError


@pytest.mark.parametrize("name", ["", " ", "..", ".", ".hidden", "a/b", "../math", "a\\b", "x\0y", "m" * 256])
def test_path_like_names_are_refused(name):
    with pytest.raises(BlockNameError):
        check_block_name(name)


def test_library_lists_adapters_inside_only(blocks_dir):
    lib = BlockLibrary(blocks_dir)
    names = lib.names()
    assert {"math", "words", "code", "corrupt", "wide"} <= set(names)
    assert "escape" not in names and "notanadapter" not in names and "linkedfile" not in names
    for bad in ("escape", "linkedfile"):
        with pytest.raises(BlockNameError, match="outside"):
            lib.path(bad)
    with pytest.raises(UnknownBlockError, match="available: "):
        lib.path("nope")
    with pytest.raises(UnknownBlockError):
        lib.path("notanadapter")
    assert lib.get("math") is lib.get("math")  # read once, then from memory


def test_library_rereads_a_changed_block(tmp_path):
    from tests.tiny_models import make_peft_adapter

    make_peft_adapter("llama", tmp_path / "b", seed=1)
    lib = BlockLibrary(tmp_path)
    first = lib.get("b").file.sha256
    make_peft_adapter("llama", tmp_path / "b", seed=2)
    assert lib.get("b").file.sha256 != first


def test_failed_changes_leave_the_composition_unchanged(live):
    live.set_active([("math", 1.0)])
    before = live.fingerprint
    weights = {k: v.clone() for k, v in live.composed.model.state_dict().items()}
    attempts = [
        (lambda: live.set_active([("math", 1.0), ("wide", 1.0)]), ShapeMismatchError),
        (lambda: live.set_active([("gpt2block", 1.0)]), ShapeMismatchError),
        (lambda: live.add("othermodel", 1.0), ShapeMismatchError),
        (lambda: live.set_active([("math", 1.0), ("math", 2.0)]), CompositionError),
        (lambda: live.set_active([("math", float("nan"))]), CompositionError),
        (lambda: live.remove("words"), UnknownBlockError),
        (lambda: live.add("../math", 1.0), BlockNameError),
    ]
    for attempt, error in attempts:
        with pytest.raises(error):
            attempt()
        assert live.fingerprint == before
    after = live.composed.model.state_dict()
    assert all(torch.equal(weights[k], after[k]) for k in weights)
    live.set_active([])
    assert live.fingerprint == BASE_FINGERPRINT


def test_writer_waits_for_readers_and_holds_new_ones():
    lock, events = RWLock(), []
    reading, release = threading.Event(), threading.Event()

    def reader(tag, hold=None):
        with lock.read():
            events.append(f"{tag} in")
            reading.set()
            if hold is not None:
                hold.wait(5)
        events.append(f"{tag} out")

    def writer():
        with lock.write():
            events.append("write")

    threads = [threading.Thread(target=reader, args=("r1", release))]
    threads[0].start()
    assert reading.wait(5)
    threads.append(threading.Thread(target=writer))
    threads[1].start()
    while lock._writers_waiting == 0:
        time.sleep(0.001)
    threads.append(threading.Thread(target=reader, args=("r2",)))
    threads[2].start()
    time.sleep(0.05)
    assert events == ["r1 in"]  # the writer waits for r1; r2 waits behind the writer
    release.set()
    for t in threads:
        t.join(5)
    assert events == ["r1 in", "r1 out", "write", "r2 in", "r2 out"]


def test_runner_refuses_beyond_its_queue():
    runner, gate = Runner(workers=1, queue=1), threading.Event()
    try:
        runner.submit(lambda: gate.wait(5))
        runner.submit(lambda: None)
        with pytest.raises(ServerBusyError, match="busy"):
            runner.submit(lambda: None)
    finally:
        gate.set()
        runner.shutdown()


def _config_variant(src, dst, **changes):
    """A copy of block ``src`` with the same weights file and ``changes`` in its adapter config."""
    import json
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


def test_the_fingerprint_covers_the_config_scales_and_the_base_model(model_dir, blocks_dir, tmp_path):
    """The same weights file under another lora_alpha, rank_pattern or rsLoRA is another delta, and so another
    fingerprint; a plain copy is the same; the same recipe on another base model is another fingerprint."""
    from lorablocks.model.merge import target_weight
    from lorablocks.model.session import ComposedModel
    from lorablocks.serving.live import LiveModel

    root = tmp_path / "lib"
    root.mkdir()
    _config_variant(blocks_dir / "math", root / "math")
    _config_variant(blocks_dir / "math", root / "copy")
    _config_variant(blocks_dir / "math", root / "alpha", lora_alpha=16)
    _config_variant(blocks_dir / "math", root / "rslora", use_rslora=True)
    _config_variant(blocks_dir / "math", root / "pattern", alpha_pattern={"q_proj": 2.0})
    live = LiveModel(ComposedModel.load(str(model_dir)), BlockLibrary(root))
    module = "model.layers.0.self_attn.q_proj"
    seen = {}
    for name in ("math", "copy", "alpha", "rslora", "pattern"):
        report = live.set_active([(name, 1.0)])
        seen[name] = (report.fingerprint, target_weight(live.composed.model, module)[0].detach().clone())
    assert seen["math"][0] == seen["copy"][0] and torch.equal(seen["math"][1], seen["copy"][1])
    for name in ("alpha", "rslora", "pattern"):  # same weights file, other weights: another fingerprint
        assert not torch.equal(seen[name][1], seen["math"][1]) and seen[name][0] != seen["math"][0], name
    assert len({fp for fp, _ in seen.values()}) == 4
    other = ComposedModel(live.composed.model, live.composed.tokenizer, model_id="another/base-model")
    other.recipe = live.composed.recipe
    assert other.fingerprint != live.composed.fingerprint == live.fingerprint
    assert live.composed.fingerprint == live.composed.recipe.fingerprint(base=live.composed.model_id)
