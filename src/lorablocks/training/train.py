"""Train one LoRA adapter on one domain, or the merged-data adapter on several (domains balanced).

The loop reads top to bottom in :func:`train_adapter`:

1. validate the :class:`TrainConfig` (every problem at once), refuse an existing output unless ``force``;
2. load the base model, wrap it with PEFT LoRA (paper defaults: rank 4, alpha 64, the model's targets);
3. tokenize each domain's train split once; build the **batch schedule**, a pure function of the seed and
   the step: domains are interleaved example by example (domain ``j mod K`` supplies example ``j``, each
   domain cycling through its own seeded shuffles, so a small domain is repeated rather than drowned);
   a window of ``bucket_window`` batches is sorted by length and cut into batches (length bucketing),
   and the batches of a window are visited in a seeded random order;
4. each step: the global batch is split across processes, each process sums the NLL of its counted
   (answer + EOS) tokens, and the loss is normalised by the *global* token count, so the gradient is the
   token-weighted mean over the whole batch whatever the number of processes (Accelerate/DDP averages);
5. validation loss (token-weighted, per domain) at intervals, checkpoints at intervals, and at the end
   the PEFT adapter (safetensors) plus ``lorablocks_train.json``, written atomically.

Because the schedule depends only on ``(seed, step)`` and a checkpoint holds the LoRA weights, the
optimizer and scheduler states and the RNG states, ``resume`` continues bit-for-bit where an
uninterrupted run would be.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import time
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorablocks.training.data import Domain, TokenizedExample, bucket_by_tokens, bucket_window, collate, resolve_domains, tokenize_examples
from lorablocks.errors import ConfigError, DataError
from lorablocks.training.evaluate import AnswerNLL
from lorablocks.files.outputs import atomic_dir, check_output_free, sha256_path, utc_now, versions
from lorablocks.model.models import DEFAULT_MODEL, default_targets, load_model, model_id

__all__ = ["TrainConfig", "TrainResult", "train_adapter", "load_config", "RECORD_NAME", "batch_schedule"]

RECORD_NAME = "lorablocks_train.json"


@dataclass
class TrainConfig:
    """Every setting of a training run (each is also a ``lorablocks train`` flag and a config-file key).

    Defaults for the learning rate, batch, length and steps were chosen on validation loss of the
    default model (README, "Training defaults").
    """

    #: base model: ``smollm2-135m`` (built in), a local folder or a hub id
    model: str = DEFAULT_MODEL
    #: one domain (its adapter) or several (the merged-data adapter), each a folder, JSONL file or hub name
    data: list[str] = field(default_factory=list)
    #: output adapter folder
    out: str = ""
    #: LoRA target module names; None means the paper preset for the model type
    targets: list[str] | None = None
    #: LoRA rank
    r: int = 4
    #: LoRA alpha (scale alpha / r)
    alpha: float = 64.0
    #: dropout on the LoRA input (0 keeps runs identical across process counts)
    dropout: float = 0.0
    #: AdamW peak learning rate
    learning_rate: float = 1e-3
    #: linear warm-up steps, then linear decay to zero at ``max_steps``
    warmup_steps: int = 10
    #: AdamW weight decay on the LoRA factors
    weight_decay: float = 0.0
    #: gradient clipping (global L2 norm); 0 disables
    max_grad_norm: float = 1.0
    #: examples per optimizer step, over all processes
    batch_size: int = 8
    #: examples per forward/backward pass on each process (gradient accumulation); 0 means its whole share
    micro_batch_size: int = 0
    #: padded tokens per forward/backward pass (bounds activation memory; the result is the same); 0 = no bound
    micro_batch_tokens: int = 512
    #: maximum tokens per example (prompt + answer + EOS); longer ones are truncated and counted
    max_length: int = 256
    #: optimizer steps
    max_steps: int = 200
    #: batches per length-sorting window of the schedule
    bucket_window: int = 16
    #: seed of the LoRA initialisation, data order and dropout
    seed: int = 0
    #: train examples per domain: the first N (None = all)
    train_limit: int | None = None
    #: validation loss every N steps (and at the start and end); 0 = start and end only
    eval_every: int = 50
    #: validation examples per domain (the first N); 0 = no validation
    val_limit: int = 100
    #: checkpoint every N steps; 0 = none
    checkpoint_every: int = 50
    #: checkpoint folder (default: ``<out>.checkpoints`` beside the output)
    checkpoint_dir: str | None = None
    #: keep the last checkpoint after a successful run
    keep_checkpoints: bool = False
    #: continue from the latest checkpoint in the checkpoint folder (start afresh if there is none)
    resume: bool = False
    #: replace an existing output folder
    force: bool = False
    #: Accelerate mixed precision: ``no``, ``bf16`` or ``fp16``
    mixed_precision: str = "no"
    #: cache root for the built-in model (default ``$LORABLOCKS_CACHE`` or ``~/.cache/lorablocks``)
    cache_dir: str | None = None

    def problems(self) -> list[str]:
        """Every invalid setting, each named by its flag (empty when the config is valid)."""
        out: list[str] = []
        hints = typing.get_type_hints(TrainConfig)
        bad: set[str] = set()
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not _type_ok(value, hints[f.name]):
                bad.add(f.name)
                out.append(f"--{_flag(f.name)} must be {_type_name(hints[f.name])}, got {value!r}")

        def need(name: str, cond: Callable[[], bool], msg: str) -> None:
            if name not in bad and not cond():
                out.append(msg)

        need("data", lambda: bool(self.data), "--data: give at least one domain")
        need("out", lambda: bool(self.out), "--out: give an output folder")
        need("targets", lambda: self.targets is None or len(self.targets) > 0, "--targets: give at least one module name")
        need("r", lambda: self.r >= 1, f"--r must be >= 1, got {self.r}")
        need("alpha", lambda: self.alpha > 0, f"--alpha must be > 0, got {self.alpha}")
        need("dropout", lambda: 0.0 <= self.dropout < 1.0, f"--dropout must be in [0, 1), got {self.dropout}")
        need("learning_rate", lambda: self.learning_rate > 0 and math.isfinite(self.learning_rate), f"--learning-rate must be > 0, got {self.learning_rate}")
        need("warmup_steps", lambda: self.warmup_steps >= 0, f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        need("weight_decay", lambda: self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}")
        need("max_grad_norm", lambda: self.max_grad_norm >= 0, f"--max-grad-norm must be >= 0, got {self.max_grad_norm}")
        need("batch_size", lambda: self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        need("micro_batch_size", lambda: self.micro_batch_size >= 0, f"--micro-batch-size must be >= 0, got {self.micro_batch_size}")
        need("micro_batch_tokens", lambda: self.micro_batch_tokens >= 0, f"--micro-batch-tokens must be >= 0, got {self.micro_batch_tokens}")
        need("max_length", lambda: self.max_length >= 8, f"--max-length must be >= 8, got {self.max_length}")
        need("max_steps", lambda: self.max_steps >= 1, f"--max-steps must be >= 1, got {self.max_steps}")
        need("bucket_window", lambda: self.bucket_window >= 1, f"--bucket-window must be >= 1, got {self.bucket_window}")
        need("train_limit", lambda: self.train_limit is None or self.train_limit >= 1, f"--limit must be >= 1, got {self.train_limit}")
        need("eval_every", lambda: self.eval_every >= 0, f"--eval-every must be >= 0, got {self.eval_every}")
        need("val_limit", lambda: self.val_limit >= 0, f"--val-limit must be >= 0, got {self.val_limit}")
        need("checkpoint_every", lambda: self.checkpoint_every >= 0, f"--checkpoint-every must be >= 0, got {self.checkpoint_every}")
        need("mixed_precision", lambda: self.mixed_precision in ("no", "bf16", "fp16"), f"--mixed-precision must be no, bf16 or fp16, got {self.mixed_precision!r}")
        return out

    def validate(self) -> None:
        """Raise one :class:`ConfigError` listing every invalid setting."""
        problems = self.problems()
        if problems:
            raise ConfigError("invalid training config: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def checkpoint_path(self) -> Path:
        return Path(self.checkpoint_dir) if self.checkpoint_dir else Path(f"{self.out.rstrip('/')}.checkpoints")


#: Settings that do not change the trained weights (may differ between a run and its resumption).
_RUN_ONLY = {"out", "resume", "force", "checkpoint_dir", "keep_checkpoints", "cache_dir", "checkpoint_every", "eval_every"}


def _flag(name: str) -> str:
    return "limit" if name == "train_limit" else name.replace("_", "-")


def _type_name(tp: Any) -> str:
    args = typing.get_args(tp)
    if type(None) in args:
        return _type_name(next(a for a in args if a is not type(None))) + " or null"
    if typing.get_origin(tp) is list:
        return "a list of strings"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _type_ok(value: Any, tp: Any) -> bool:
    args = typing.get_args(tp)
    if type(None) in args:
        return value is None or _type_ok(value, next(a for a in args if a is not type(None)))
    if typing.get_origin(tp) is list:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, tp)


def _coerce(value: Any, tp: Any) -> Any:
    """Best-effort conversion of a config-file/flag value to the field type (strings from YAML/CLI)."""
    args = typing.get_args(tp)
    if type(None) in args:
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "")):
            return None
        return _coerce(value, next(a for a in args if a is not type(None)))
    if typing.get_origin(tp) is list:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, (list, tuple)):
            return [str(v) for v in value]
        return value
    if tp is bool and isinstance(value, str):
        return {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}.get(value.lower(), value)
    if tp is int and isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            return value
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def load_config(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """A validated :class:`TrainConfig` from a YAML/JSON file (optional) with ``overrides`` on top.

    Keys may use dashes or underscores (``learning-rate``); ``limit`` means ``train_limit``. ``None``
    overrides are ignored (a flag that was not given). Every problem is reported in one :class:`ConfigError`.
    """
    values: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        import yaml

        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p} is not valid YAML/JSON: {str(exc).splitlines()[0]}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping of setting: value")
        values.update({str(k): v for k, v in loaded.items()})
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    hints = typing.get_type_hints(TrainConfig)
    clean: dict[str, Any] = {}
    problems: list[str] = []
    for key, value in values.items():
        name = key.replace("-", "_")
        name = "train_limit" if name == "limit" else name
        if name not in hints:
            problems.append(f"unknown setting {key!r}")
            continue
        clean[name] = _coerce(value, hints[name])
    cfg = TrainConfig(**clean)
    problems += cfg.problems()
    if problems:
        raise ConfigError("invalid training config: " + "; ".join(problems))
    return cfg


@dataclass
class TrainResult:
    """What :func:`train_adapter` made: the adapter folder and its record."""

    adapter: Path
    record: dict[str, Any]

    @property
    def final_train_loss(self) -> float:
        return self.record["loss_curve"][-1]["loss"]

    @property
    def validation(self) -> list[dict[str, Any]]:
        return self.record["validation"]


# ------------------------------------------------------------------------------------------- schedule


def batch_schedule(
    sizes: Sequence[int], lengths: Sequence[Sequence[int]], batch_size: int, steps: int, seed: int, window: int
) -> list[list[tuple[int, int]]]:
    """The global batches ``[(domain, example index), ...]`` of steps ``0 .. steps-1``, a pure function.

    Example ``j`` of the stream comes from domain ``j mod K`` (balanced); each domain walks through
    seeded shuffles of its examples, one per epoch. Every ``window`` batches are sorted by length, cut
    into batches, and visited in a seeded order; each batch is sorted by length (shortest first).
    """
    K = len(sizes)
    streams: list[list[int]] = [[] for _ in range(K)]
    epochs = [0] * K
    taken = [0] * K

    def next_of(k: int) -> int:
        if taken[k] >= len(streams[k]):
            perm = list(range(sizes[k]))
            random.Random(f"{seed}:{k}:{epochs[k]}").shuffle(perm)
            streams[k].extend(perm)
            epochs[k] += 1
        taken[k] += 1
        return streams[k][taken[k] - 1]

    out: list[list[tuple[int, int]]] = []
    j = 0
    w = 0
    while len(out) < steps:
        n = batch_size * window
        items = []
        for _ in range(n):
            k = j % K
            items.append((k, next_of(k)))
            j += 1
        flat_len = [lengths[k][i] for k, i in items]
        batches = bucket_window(range(n), flat_len, batch_size)
        random.Random(f"{seed}:window:{w}").shuffle(batches)
        out.extend([[items[i] for i in b] for b in batches])
        w += 1
    return out[:steps]


def _micro_batches(exs: Sequence[TokenizedExample], size: int, tokens: int) -> list[list[TokenizedExample]]:
    """Consecutive chunks of a process's share of a batch: at most ``size`` examples and, if ``tokens``,
    at most ``tokens`` padded tokens each (always at least one example). The loss is normalised by the
    global token count, so the chunking changes memory, not the result."""
    chunks: list[list[TokenizedExample]] = []
    cur: list[TokenizedExample] = []
    width = 0
    for e in exs:
        w = max(width, len(e))
        if cur and (len(cur) >= size or (tokens and (len(cur) + 1) * w > tokens)):
            chunks.append(cur)
            cur, w = [], len(e)
        cur.append(e)
        width = w
    if cur:
        chunks.append(cur)
    return chunks


def _has_accelerator() -> bool:
    """Whether torch sees a GPU-like device; without one Accelerate must be told ``cpu=True`` so that
    ``torchrun`` processes form a gloo group (MULTI_CPU) instead of each training alone."""
    acc = getattr(torch, "accelerator", None)
    if acc is not None and hasattr(acc, "is_available"):
        return bool(acc.is_available())
    return torch.cuda.is_available()


def _lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return f


# ------------------------------------------------------------------------------------------ progress


class _Progress:
    """A rich progress bar on the main process: step, loss, answer tokens per second."""

    def __init__(self, enabled: bool, total: int, start: int) -> None:
        self.bar = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(), console=Console(stderr=True), transient=False,
            )
            self.task = self.bar.add_task("train", total=total, completed=start, info="")
            self.bar.start()

    def update(self, step: int, info: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)

    def log(self, text: str) -> None:
        if self.bar is not None:
            self.bar.console.print(text, highlight=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


# ----------------------------------------------------------------------------------------- checkpoint


def _latest_checkpoint(folder: Path) -> Path | None:
    if not folder.is_dir():
        return None
    steps = sorted(
        (int(p.name.split("-")[1]), p) for p in folder.glob("step-*") if p.is_dir() and (p / "state.pt").is_file()
    )
    return steps[-1][1] if steps else None


def _trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _save_checkpoint(folder: Path, step: int, model, optimizer, scheduler, state: dict[str, Any], accelerator) -> None:
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    target = folder / f"step-{step:07d}"
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    # each process keeps its own RNG state (dropout); the main process writes the shared state
    tmp_rng = folder / f".rng-{step:07d}-{accelerator.process_index}.pt"
    torch.save(rng, tmp_rng)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        from safetensors.torch import save_file

        with atomic_dir(target, force=True) as tmp:
            save_file({n: p.detach().cpu().contiguous() for n, p in _trainable(model).items()}, str(tmp / "lora.safetensors"))
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), **state}, tmp / "state.pt")
            for r in range(accelerator.num_processes):
                shutil.move(str(folder / f".rng-{step:07d}-{r}.pt"), tmp / f"rng-{r}.pt")
        for old in folder.glob("step-*"):
            if old != target and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _load_checkpoint(path: Path, model, optimizer, scheduler, accelerator) -> dict[str, Any]:
    from safetensors.torch import load_file

    tensors = load_file(str(path / "lora.safetensors"))
    params = _trainable(model)
    if set(tensors) != set(params):
        raise ConfigError(f"checkpoint {path} does not match this model/LoRA config (different trained tensors)")
    with torch.no_grad():
        for n, t in tensors.items():
            params[n].copy_(t)
    state = torch.load(path / "state.pt", weights_only=False)
    optimizer.load_state_dict(state.pop("optimizer"))
    scheduler.load_state_dict(state.pop("scheduler"))
    rng_file = path / f"rng-{accelerator.process_index}.pt"
    if not rng_file.is_file():
        raise ConfigError(f"checkpoint {path} was written by fewer processes; resume with the same process count")
    rng = torch.load(rng_file, weights_only=False)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    return state


# ---------------------------------------------------------------------------------------------- train


def _data_records(domains: Sequence[Domain], sets: Sequence[Any], limit: int | None) -> list[dict[str, Any]]:
    return [
        {
            "name": d.name,
            "source": d.source,
            "train_sha256": d.fingerprint("train"),
            "train_examples": len(ts),
            "train_truncated": ts.truncated,
            "train_answer_tokens": ts.answer_tokens,
            "limit": limit,
        }
        for d, ts in zip(domains, sets)
    ]


def _validation_loss(loss_mod: AnswerNLL, val: list[list[TokenizedExample]], pad: int, batch_tokens: int, accelerator) -> list[tuple[float, int]]:
    """Summed NLL and counted tokens per domain, sharded over processes and reduced."""
    model = loss_mod.model
    was = model.training
    model.eval()
    device = accelerator.device
    sums = torch.zeros(len(val), 2, dtype=torch.float64, device=device)
    with torch.no_grad():
        for k, exs in enumerate(val):
            plan = bucket_by_tokens([len(e) for e in exs], batch_tokens)
            for idx in plan[accelerator.process_index :: accelerator.num_processes]:
                b = collate([exs[i] for i in idx], pad).to(device)
                nll, cnt = loss_mod(b.input_ids, b.attention_mask, b.target_mask)
                sums[k, 0] += nll.double().sum()
                sums[k, 1] += cnt.sum()
    model.train(was)
    sums = accelerator.reduce(sums, reduction="sum")
    return [(float(s), int(c)) for s, c in sums.tolist()]


def train_adapter(
    config: TrainConfig,
    *,
    model: Any = None,
    tokenizer: Any = None,
    progress: bool = True,
) -> TrainResult:
    """Train a LoRA adapter as ``config`` says and write it to ``config.out``; return its record.

    ``model``/``tokenizer`` may be passed to reuse a loaded base model (it is wrapped for training and
    unwrapped again afterwards, its base weights untouched); otherwise ``config.model`` is loaded.
    Runs under ``accelerate launch``/``torchrun`` as well as in a plain process.
    """
    from accelerate import Accelerator
    from peft import LoraConfig, get_peft_model

    config.validate()
    out = Path(config.out)
    if out.exists() and not config.force:
        check_output_free(out, config.force)  # raises OutputExistsError
    ckpt_dir = config.checkpoint_path
    resume_from = _latest_checkpoint(ckpt_dir) if config.resume else None

    domains = resolve_domains(config.data)
    accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=not _has_accelerator())
    world, rank = accelerator.num_processes, accelerator.process_index
    if config.batch_size % world:
        raise ConfigError(f"--batch-size {config.batch_size} is not divisible by the {world} processes")

    # Data first, so that a bad file is reported before any model is loaded.
    train_raw = [d.load("train", config.train_limit) for d in domains]
    # Validation: the first val_limit examples of each domain's validation split (skipped if one lacks it).
    val_raw = []
    if config.val_limit and all(d.kind != "folder" or d.path("validation").is_file() for d in domains):
        val_raw = [d.load("validation", config.val_limit) for d in domains]

    if model is None:
        model, tokenizer = load_model(config.model, cache_dir=config.cache_dir)
    elif tokenizer is None:
        raise ConfigError("train_adapter: pass the tokenizer together with the model")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_sets = [tokenize_examples(tokenizer, exs, config.max_length) for exs in train_raw]
    val_sets = [tokenize_examples(tokenizer, exs, config.max_length) for exs in val_raw]
    schedule = batch_schedule(
        [len(ts) for ts in train_sets], [[len(e) for e in ts.examples] for ts in train_sets],
        config.batch_size, config.max_steps, config.seed, config.bucket_window,
    )

    # Model: LoRA with a seeded initialisation (identical on every process).
    targets = default_targets(model, config.targets)
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    is_conv1d = getattr(model.config, "model_type", None) == "gpt2"
    lora = LoraConfig(
        r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=targets,
        bias="none", task_type="CAUSAL_LM", fan_in_fan_out=is_conv1d,
    )
    try:
        peft_model = get_peft_model(model, lora)
    except ValueError as exc:
        raise ConfigError(f"--targets {','.join(targets)}: {str(exc).splitlines()[0]}") from None
    try:
        peft_model.peft_config["default"].base_model_name_or_path = model_id(config.model)
        loss_mod = AnswerNLL(peft_model)
        params = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config.warmup_steps, config.max_steps))
        wrapped, optimizer = accelerator.prepare(loss_mod, optimizer)
        device = accelerator.device

        state: dict[str, Any] = {"step": 0, "loss_curve": [], "validation": [], "config": config.to_dict(), "seconds": 0.0}
        if resume_from is not None:
            state = _load_checkpoint(resume_from, peft_model, optimizer, scheduler, accelerator)
            diffs = [
                k for k in state["config"]
                if k not in _RUN_ONLY and state["config"][k] != config.to_dict().get(k)
            ]
            if diffs:
                raise ConfigError(
                    f"--resume: checkpoint {resume_from} was made with different settings: "
                    + ", ".join(f"{k}={state['config'][k]!r} (now {config.to_dict()[k]!r})" for k in diffs)
                )
            state["config"] = config.to_dict()

        micro = config.micro_batch_size or config.batch_size // world
        val_batch_tokens = max(4096, config.max_length)

        def validate(step: int) -> None:
            if not val_sets:
                return
            t0 = time.perf_counter()
            res = _validation_loss(loss_mod, [v.examples for v in val_sets], pad, val_batch_tokens, accelerator)
            total_nll, total_tok = sum(s for s, _ in res), sum(c for _, c in res)
            entry = {
                "step": step,
                "loss": total_nll / max(total_tok, 1),
                "domains": {d.name: s / max(c, 1) for d, (s, c) in zip(domains, res)},
            }
            state["validation"].append(entry)
            state["validation_seconds"] = state.get("validation_seconds", 0.0) + time.perf_counter() - t0
            bar.log(f"step {step}: validation loss {entry['loss']:.4f}")

        bar = _Progress(progress and accelerator.is_main_process, config.max_steps, state["step"])
        wrapped.train()
        t_start = time.perf_counter()
        tokens_seen = 0
        try:
            if state["step"] == 0 and not state["validation"]:
                validate(0)
            for step in range(state["step"], config.max_steps):
                items = schedule[step][rank::world]
                exs = [train_sets[k].examples[i] for k, i in items]
                cnt_local = sum(e.n_answer for e in exs)
                counts = accelerator.reduce(torch.tensor([cnt_local], dtype=torch.float64, device=device), reduction="sum")
                global_count = float(counts[0])
                step_nll = torch.zeros((), dtype=torch.float64, device=device)
                chunks = _micro_batches(exs, micro, config.micro_batch_tokens)
                for c, chunk in enumerate(chunks):
                    b = collate(chunk, pad).to(device)
                    sync = c == len(chunks) - 1
                    ctx = accelerator.no_sync(wrapped) if not sync else contextlib.nullcontext()
                    with ctx:
                        nll, _ = wrapped(b.input_ids, b.attention_mask, b.target_mask)
                        loss = nll.sum() * world / max(global_count, 1.0)
                        accelerator.backward(loss)
                    step_nll += nll.detach().double().sum()
                if config.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, config.max_grad_norm)
                lr_used = optimizer.param_groups[0]["lr"]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step_nll = accelerator.reduce(step_nll, reduction="sum")
                step_loss = float(step_nll) / max(global_count, 1.0)
                tokens_seen += int(global_count)
                elapsed = time.perf_counter() - t_start
                state["loss_curve"].append(
                    {"step": step + 1, "loss": step_loss, "lr": lr_used, "answer_tokens": int(global_count)}
                )
                state["step"] = step + 1
                bar.update(step + 1, f"loss {step_loss:.4f}  {tokens_seen / max(elapsed, 1e-9):,.0f} answer tok/s")
                last = step + 1 == config.max_steps
                if config.eval_every and (step + 1) % config.eval_every == 0 and not last:
                    validate(step + 1)
                if last:
                    validate(step + 1)
                if config.checkpoint_every and (step + 1) % config.checkpoint_every == 0 and not last:
                    state["seconds"] = state.get("seconds", 0.0) + (time.perf_counter() - t_start)
                    t_start = time.perf_counter()
                    tokens_seen = 0
                    _save_checkpoint(ckpt_dir, step + 1, peft_model, optimizer, scheduler, state, accelerator)
        finally:
            bar.close()
        seconds = state.get("seconds", 0.0) + (time.perf_counter() - t_start)

        record = {
            "tool": "lorablocks",
            "kind": "train",
            "created": utc_now(),
            "base_model": model_id(config.model),
            "config": config.to_dict(),
            "targets": targets,
            "domains": _data_records(domains, train_sets, config.train_limit),
            "validation_examples": {d.name: len(v) for d, v in zip(domains, val_sets)},
            "processes": world,
            "steps": state["step"],
            "train_seconds": seconds,
            "validation_seconds": state.get("validation_seconds", 0.0),
            # training throughput excludes the time spent on validation
            "answer_tokens_per_second": sum(e["answer_tokens"] for e in state["loss_curve"])
            / max(seconds - state.get("validation_seconds", 0.0), 1e-9),
            "loss_curve": state["loss_curve"],
            "validation": state["validation"],
            "resumed_from": str(resume_from) if resume_from else None,
            "versions": versions(),
        }
        if accelerator.is_main_process:
            with atomic_dir(out, force=config.force) as tmp:
                peft_model.save_pretrained(tmp, safe_serialization=True, save_embedding_layers=False)
                (tmp / RECORD_NAME).write_text(json.dumps(record, indent=2, default=str) + "\n")
            if ckpt_dir.is_dir() and not config.keep_checkpoints:
                shutil.rmtree(ckpt_dir, ignore_errors=True)
        accelerator.wait_for_everyone()
    finally:
        peft_model.unload()  # give the caller its base model back, without LoRA layers
    return TrainResult(adapter=out, record=record)

