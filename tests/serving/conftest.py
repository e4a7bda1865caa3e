"""A tiny Llama model folder, a blocks folder (good blocks and every kind of bad one), and a real uvicorn
server on 127.0.0.1 (port 0) in a background thread, stopped by the fixture."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.tiny_models import make_peft_adapter

GOOD = ("math", "words", "code")


class RunningServer:
    """uvicorn serving ``app`` on 127.0.0.1 at a free port, in a daemon thread."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)
        self.sock.close()


def start_server(live: Any, **settings: Any) -> tuple[RunningServer, Any]:
    """A server for ``live`` with its own engine: the scheduler with ``max_batch`` in ``settings``, else a
    runner (``workers``); ``queue`` for either."""
    from lorablocks.serving.live import Runner
    from lorablocks.serving.scheduler import Scheduler
    from lorablocks.serving.server import Access, AppSettings, create_app

    batch, queue = settings.pop("max_batch", 0), settings.pop("queue", 8)
    runner = Scheduler(live, batch, queue) if batch else Runner(settings.pop("workers", 2), queue)
    access = Access(**{k: settings.pop(k) for k in ("api_key", "admin_key", "hosts", "any_ip_host", "max_body_bytes")
                       if k in settings})
    app = create_app(live, runner, AppSettings(model_name="tiny", access=access, **settings))
    return RunningServer(app), runner


def _bad_blocks(root: Path, outside: Path) -> None:
    """Blocks that must be refused: other model type, other shapes, corrupt, other base model, escaping."""
    from transformers import LlamaConfig, LlamaForCausalLM

    make_peft_adapter("gpt2", root / "gpt2block", seed=7)
    torch.manual_seed(0)
    wide = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()
    make_peft_adapter("llama", root / "wide", seed=8, model=wide)
    make_peft_adapter("llama", root / "corrupt", seed=9)
    (root / "corrupt" / "adapter_model.safetensors").write_bytes(b"not a safetensors file at all")
    make_peft_adapter("llama", root / "othermodel", seed=10)
    cfg_path = root / "othermodel" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = "openai-community/gpt2"
    cfg_path.write_text(json.dumps(cfg))
    (root / "notanadapter").mkdir()
    make_peft_adapter("llama", outside / "secret", seed=11)
    os.symlink(outside / "secret", root / "escape")
    make_peft_adapter("llama", root / "linkedfile", seed=12)
    (root / "linkedfile" / "adapter_model.safetensors").unlink()
    os.symlink(outside / "secret" / "adapter_model.safetensors", root / "linkedfile" / "adapter_model.safetensors")


@pytest.fixture(scope="session")
def model_dir(tiny_model_dirs: dict[str, Path]) -> Path:
    return tiny_model_dirs["llama"]


@pytest.fixture(scope="session")
def blocks_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("blocks")
    outside = tmp_path_factory.mktemp("outside")
    for i, name in enumerate(GOOD):
        make_peft_adapter("llama", root / name, seed=i + 1)
    _bad_blocks(root, outside)
    return root


@pytest.fixture(scope="module")
def live(model_dir: Path, blocks_dir: Path) -> Any:
    from lorablocks.model.session import ComposedModel
    from lorablocks.serving.blocks import BlockLibrary
    from lorablocks.serving.live import LiveModel

    return LiveModel(ComposedModel.load(str(model_dir)), BlockLibrary(blocks_dir))


@pytest.fixture(scope="module")
def running(live: Any) -> Iterator[RunningServer]:
    server, _ = start_server(live, max_tokens_limit=64, max_batch=4)  # the default engine: batching
    yield server
    server.stop()


@pytest.fixture
def server(running: RunningServer, live: Any) -> RunningServer:
    """The module's server, back on the base model."""
    live.set_active([])
    return running
