"""Train one LoRA adapter on one domain, or the merged-data adapter on several (domains balanced).

:func:`train_adapter` reads top to bottom as named steps:

1. check the :class:`TrainConfig` is complete, refuse an existing output unless ``force``;
2. :func:`_load_examples`: read each domain's train (and validation) split, before any model is loaded;
3. :func:`_prepare_data`: tokenize once and build the **batch schedule**, a pure function of the seed and
   the step: domains are interleaved example by example (domain ``j mod K`` supplies example ``j``, each
   domain cycling through its own seeded shuffles, so a small domain is repeated rather than drowned);
   a window of ``bucket_window`` batches is sorted by length and cut into batches (length bucketing),
   and the batches of a window are visited in a seeded random order;
4. :func:`_wrap_lora` / :func:`_prepare_optimizer`: PEFT LoRA with a seeded initialisation, AdamW with
   warm-up and linear decay, prepared by Accelerate; the precision resolved once
   (:func:`~lorablocks.training.precision.resolve_precision`): under bf16 the forward passes run in
   ``torch.autocast(bfloat16)`` (cross-entropy and, on a CPU, attention in float32; validation with float32
   logits) while the LoRA factors, gradients and optimizer state stay float32;
5. :func:`_run_steps`: each :func:`_train_step` splits the global batch across processes, each process sums
   the NLL of its counted (answer + EOS) tokens, and the loss is normalised by the *global* token count, so
   the gradient is the token-weighted mean over the whole batch whatever the number of processes;
   validation loss (token-weighted, per domain) and checkpoints at intervals;
6. :func:`_write_output`: the PEFT adapter (safetensors) plus ``lorablocks_train.json``, written atomically.

Because the schedule depends only on ``(seed, step)`` and a checkpoint holds the LoRA weights, the
optimizer and scheduler states and the RNG states, ``resume`` continues bit-for-bit where an
uninterrupted run would be. Checkpoints are safetensors + JSON only: nothing is ever unpickled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorablocks.errors import ConfigError
from lorablocks.files.outputs import atomic_dir, check_output_free, input_refusal, utc_now, versions
from lorablocks.model.models import default_targets, load_model, model_id
from lorablocks.training.checkpoint import check_checkpoint_folder, latest_checkpoint, remove_checkpoints
from lorablocks.training.checkpoint import load_checkpoint as _load_checkpoint
from lorablocks.training.checkpoint import save_checkpoint as _save_checkpoint  # a module global: tests interrupt it
from lorablocks.training.config import RUN_ONLY, TrainConfig, load_config
from lorablocks.training.data import (
    Domain, Example, TokenizedSet, collate, resolve_domains,
    tokenize_examples,
)
from lorablocks.training.loss import AnswerNLL
from lorablocks.training.precision import ResolvedPrecision, resolve_precision
from lorablocks.training.progress import TrainProgress as _Progress
from lorablocks.training.schedule import _micro_batches, batch_schedule
from lorablocks.training.statistics import write_training_statistics
from lorablocks.passes.evaluate import validation_loss as _validation_loss

__all__ = ["TrainConfig", "TrainResult", "TrainState", "train_adapter", "load_config", "RECORD_NAME", "batch_schedule"]

RECORD_NAME = "lorablocks_train.json"

log = logging.getLogger("lorablocks.train")


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


@dataclass
class TrainState:
    """Where a run is: what a checkpoint stores besides the weights, optimizer and RNG states."""

    config: dict[str, Any]
    step: int = 0
    loss_curve: list[dict[str, Any]] = field(default_factory=list)
    validation: list[dict[str, Any]] = field(default_factory=list)
    #: training seconds before the last checkpoint (the current stretch is added at the end)
    seconds: float = 0.0
    validation_seconds: float = 0.0


@dataclass
class TrainData:
    """The tokenized domains and the batch schedule of a run."""

    domains: list[Domain]
    train: list[TokenizedSet]
    val: list[TokenizedSet]
    schedule: list[list[tuple[int, int]]]
    pad: int
    val_batch_tokens: int


@dataclass
class LoraRun:
    """The model being trained and what updates it."""

    peft_model: Any
    loss: AnswerNLL
    wrapped: Any  # ``loss`` as prepared by Accelerate (DDP-wrapped under several processes)
    params: list[torch.nn.Parameter]
    optimizer: Any
    scheduler: Any
    accelerator: Any
    targets: list[str]
    precision: ResolvedPrecision


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


# ---------------------------------------------------------------------------------------------- steps


def _load_examples(config: TrainConfig, domains: Sequence[Domain]) -> tuple[list[list[Example]], list[list[Example]]]:
    """Each domain's first ``train_limit`` train examples, and first ``val_limit`` validation examples
    (none if ``val_limit`` is 0 or a domain folder lacks a validation split)."""
    train = [d.load("train", config.train_limit) for d in domains]
    val: list[list[Example]] = []
    if config.val_limit and all(d.kind != "folder" or d.path("validation").is_file() for d in domains):
        val = [d.load("validation", config.val_limit) for d in domains]
    return train, val


def _prepare_data(config: TrainConfig, tokenizer: Any, domains: Sequence[Domain],
                  train_raw: Sequence[list[Example]], val_raw: Sequence[list[Example]]) -> TrainData:
    """Tokenize once and build the batch schedule of every step."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train = [tokenize_examples(tokenizer, exs, config.max_length) for exs in train_raw]
    val = [tokenize_examples(tokenizer, exs, config.max_length) for exs in val_raw]
    schedule = batch_schedule(
        [len(ts) for ts in train], [[len(e) for e in ts.examples] for ts in train],
        config.batch_size, config.max_steps, config.seed, config.bucket_window,
    )
    return TrainData(list(domains), train, val, schedule, pad, val_batch_tokens=max(4096, config.max_length))


def _wrap_lora(config: TrainConfig, model: Any) -> tuple[Any, list[str]]:
    """The PEFT LoRA model around ``model``, initialised from ``config.seed`` (identical on every process)."""
    from peft import LoraConfig, get_peft_model

    targets = default_targets(model, config.targets)
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    lora = LoraConfig(
        r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=targets,
        bias="none", task_type="CAUSAL_LM", fan_in_fan_out=getattr(model.config, "model_type", None) == "gpt2",
    )
    try:
        peft_model = get_peft_model(model, lora)
    except ValueError as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"targets {','.join(targets)}: {first}") from None
    peft_model.peft_config["default"].base_model_name_or_path = model_id(config.model)
    return peft_model, targets


def _prepare_optimizer(config: TrainConfig, peft_model: Any, targets: list[str], accelerator: Any,
                       precision: ResolvedPrecision) -> LoraRun:
    """AdamW over the LoRA factors (float32 whatever the precision) with warm-up and linear decay,
    prepared by Accelerate."""
    loss = AnswerNLL(peft_model)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config.warmup_steps, config.max_steps))
    wrapped, optimizer = accelerator.prepare(loss, optimizer)
    return LoraRun(peft_model, loss, wrapped, params, optimizer, scheduler, accelerator, targets, precision)


def _resume(config: TrainConfig, lora: LoraRun, checkpoint: Path | None) -> TrainState:
    """A fresh state, or the checkpoint's (refused if it was made with settings that change the weights,
    including a precision setting that resolves differently on this machine)."""
    now = {**config.model_dump(), "precision_used": lora.precision.name}
    if checkpoint is None:
        return TrainState(config=now)
    saved = _load_checkpoint(checkpoint, lora.peft_model, lora.optimizer, lora.scheduler, lora.accelerator)
    try:
        state = TrainState(**saved)
    except TypeError:
        raise ConfigError(f"checkpoint {checkpoint} is unreadable (no training state in state.json)") from None
    diffs = [k for k in state.config if k not in RUN_ONLY and state.config[k] != now.get(k)]
    if diffs:
        raise ConfigError(
            f"cannot resume from checkpoint {checkpoint}: it was made with different settings: "
            + ", ".join(f"{k}={state.config[k]!r} (now {now.get(k)!r})" for k in diffs)
        )
    state.config = now
    return state


def _validate(lora: LoraRun, data: TrainData, state: TrainState, step: int, bar: _Progress) -> None:
    """Append the token-weighted validation loss (overall and per domain) at ``step`` to ``state``."""
    if not data.val:
        return
    t0 = time.perf_counter()
    res = _validation_loss(lora.loss, [v.examples for v in data.val], data.pad, data.val_batch_tokens, lora.accelerator,
                           lora.precision)
    total_nll, total_tok = sum(s for s, _ in res), sum(c for _, c in res)
    entry = {
        "step": step,
        "loss": total_nll / max(total_tok, 1),
        "domains": {d.name: s / max(c, 1) for d, (s, c) in zip(data.domains, res)},
    }
    state.validation.append(entry)
    state.validation_seconds += time.perf_counter() - t0
    bar.log(f"step {step}: validation loss {entry['loss']:.4f}")


def _train_step(config: TrainConfig, lora: LoraRun, data: TrainData, step: int) -> dict[str, Any]:
    """One optimizer step on the global batch ``schedule[step]``; returns its loss-curve entry."""
    acc = lora.accelerator
    world, device = acc.num_processes, acc.device
    exs = [data.train[k].examples[i] for k, i in data.schedule[step][acc.process_index :: world]]
    counts = acc.reduce(torch.tensor([sum(e.n_answer for e in exs)], dtype=torch.float64, device=device), reduction="sum")
    global_count = float(counts[0])
    step_nll = torch.zeros((), dtype=torch.float64, device=device)
    chunks = _micro_batches(exs, config.micro_batch_size or config.batch_size // world, config.micro_batch_tokens)
    for c, chunk in enumerate(chunks):
        b = collate(chunk, data.pad).to(device)
        # gradients are all-reduced once per step, on the last micro-batch
        with acc.no_sync(lora.wrapped) if c < len(chunks) - 1 else contextlib.nullcontext():
            with lora.precision.autocast():  # the forward only; backward runs outside, as autocast wants
                nll, _ = lora.wrapped(b.input_ids, b.attention_mask, b.target_mask)
            acc.backward(nll.sum() * world / max(global_count, 1.0))
        step_nll += nll.detach().double().sum()
    if config.max_grad_norm > 0:
        acc.clip_grad_norm_(lora.params, config.max_grad_norm)
    lr_used = lora.optimizer.param_groups[0]["lr"]
    lora.optimizer.step()
    lora.scheduler.step()
    lora.optimizer.zero_grad(set_to_none=True)
    step_nll = acc.reduce(step_nll, reduction="sum")
    return {"step": step + 1, "loss": float(step_nll) / max(global_count, 1.0), "lr": lr_used,
            "answer_tokens": int(global_count)}


def _run_steps(config: TrainConfig, lora: LoraRun, data: TrainData, state: TrainState, bar: _Progress) -> float:
    """Steps ``state.step .. max_steps - 1`` with validation and checkpoints; returns the training seconds."""
    lora.wrapped.train()
    t_start, tokens = time.perf_counter(), 0
    if state.step == 0 and not state.validation:
        _validate(lora, data, state, 0, bar)
    for step in range(state.step, config.max_steps):
        entry = _train_step(config, lora, data, step)
        state.loss_curve.append(entry)
        state.step = done = step + 1
        tokens += entry["answer_tokens"]
        rate = tokens / max(time.perf_counter() - t_start, 1e-9)
        bar.update(done, f"loss {entry['loss']:.4f}  {rate:,.0f} answer tok/s")
        last = done == config.max_steps
        if last or (config.eval_every and done % config.eval_every == 0):
            _validate(lora, data, state, done, bar)
        if config.checkpoint_every and done % config.checkpoint_every == 0 and not last:
            state.seconds += time.perf_counter() - t_start
            t_start, tokens = time.perf_counter(), 0
            _save_checkpoint(config.checkpoint_path, done, lora.peft_model, lora.optimizer, lora.scheduler,
                             lora.accelerator, dataclasses.asdict(state))
    return state.seconds + (time.perf_counter() - t_start)


def _record(config: TrainConfig, lora: LoraRun, data: TrainData, state: TrainState, seconds: float,
            resumed_from: Path | None) -> dict[str, Any]:
    """The ``lorablocks_train.json`` record: config, data fingerprints, curves, timings, versions."""
    domains = [
        {"name": d.name, "source": d.source, "train_sha256": d.fingerprint("train"), "train_examples": len(ts),
         "train_truncated": ts.truncated, "train_answer_tokens": ts.answer_tokens, "limit": config.train_limit}
        for d, ts in zip(data.domains, data.train)
    ]
    return {
        "tool": "lorablocks",
        "kind": "train",
        "created": utc_now(),
        "base_model": model_id(config.model),
        "config": config.model_dump(),
        "targets": lora.targets,
        "domains": domains,
        "validation_examples": {d.name: len(v) for d, v in zip(data.domains, data.val)},
        "processes": lora.accelerator.num_processes,
        "precision": lora.precision.to_dict(),
        "steps": state.step,
        "train_seconds": seconds,
        "validation_seconds": state.validation_seconds,
        # training throughput excludes the time spent on validation
        "answer_tokens_per_second": sum(e["answer_tokens"] for e in state.loss_curve)
        / max(seconds - state.validation_seconds, 1e-9),
        "loss_curve": state.loss_curve,
        "validation": state.validation,
        "resumed_from": str(resumed_from) if resumed_from else None,
        "versions": versions(),
    }


def _inputs(config: TrainConfig) -> list[str]:
    """What the output may never replace: the data files and folders, and a local model folder."""
    return [d for d in [*config.data, config.model] if Path(d).exists()]


def _check_checkpoint_dir(config: TrainConfig) -> None:
    """Refuse a checkpoint folder that is not lorablocks' own, or that is, holds or lies inside the output
    or an input (before any work)."""
    folder = config.checkpoint_path
    check_checkpoint_folder(folder)
    reason = input_refusal(folder, [config.out, *_inputs(config)])
    if reason is not None:
        raise ConfigError(f"checkpoint folder {folder} {reason}; choose another one", setting="checkpoint_dir")


def _write_output(config: TrainConfig, lora: LoraRun, record: dict[str, Any], data: TrainData | None = None) -> None:
    """The adapter and its record into ``config.out`` (atomically, main process); drop the checkpoints."""
    if lora.accelerator.is_main_process:
        with atomic_dir(Path(config.out), force=config.force, kind="adapter", inputs=_inputs(config)) as tmp:
            lora.peft_model.save_pretrained(tmp, safe_serialization=True, save_embedding_layers=False)
            if config.statistics and data is not None:  # the input statistics regmean composes with
                record["statistics"] = write_training_statistics(
                    lora.peft_model, data.train, data.domains, data.pad, tmp, config.statistics_tokens,
                    config.max_length, model_id(config.model))
            (tmp / RECORD_NAME).write_text(json.dumps(record, indent=2, default=str) + "\n")
        if not config.keep_checkpoints:
            remove_checkpoints(config.checkpoint_path)  # only the checkpoints this training wrote
    lora.accelerator.wait_for_everyone()


def train_adapter(config: TrainConfig, *, model: Any = None, tokenizer: Any = None, progress: bool = True) -> TrainResult:
    """Train a LoRA adapter as ``config`` says and write it to ``config.out``; return its record.

    ``model``/``tokenizer`` may be passed to reuse a loaded base model (it is wrapped for training and
    unwrapped again afterwards, its base weights untouched); otherwise ``config.model`` is loaded.
    Runs under ``accelerate launch``/``torchrun`` as well as in a plain process.
    """
    from accelerate import Accelerator

    config.require_complete()
    out = Path(config.out)
    check_output_free(out, config.force, kind="adapter", inputs=_inputs(config))  # before any work
    _check_checkpoint_dir(config)
    checkpoint, skipped = latest_checkpoint(config.checkpoint_path) if config.resume else (None, [])
    for path in skipped:
        log.warning(f"ignoring {path}: not a lorablocks checkpoint (safetensors + JSON); pickled files are never loaded")
    domains = resolve_domains(config.data)
    # Accelerate's mixed precision stays off (even if ACCELERATE_MIXED_PRECISION is set): ``precision`` is the one setting
    accelerator = Accelerator(mixed_precision="no", cpu=not _has_accelerator())
    precision = resolve_precision(config.precision, accelerator.device)
    if config.batch_size % accelerator.num_processes:
        raise ConfigError(f"batch_size {config.batch_size} is not divisible by the {accelerator.num_processes} processes")
    train_raw, val_raw = _load_examples(config, domains)  # a bad file is reported before any model is loaded
    if model is None:
        model, tokenizer = load_model(config.model, cache_dir=config.cache_dir)
    elif tokenizer is None:
        raise ConfigError("train_adapter: pass the tokenizer together with the model")
    data = _prepare_data(config, tokenizer, domains, train_raw, val_raw)
    peft_model, targets = _wrap_lora(config, model)
    try:
        lora = _prepare_optimizer(config, peft_model, targets, accelerator, precision)
        state = _resume(config, lora, checkpoint)
        bar = _Progress(progress and accelerator.is_main_process, config.max_steps, state.step)
        try:
            with precision.attention(peft_model):
                seconds = _run_steps(config, lora, data, state, bar)
        finally:
            bar.close()
        record = _record(config, lora, data, state, seconds, checkpoint)
        _write_output(config, lora, record, data)
    finally:
        peft_model.unload()  # give the caller its base model back, without LoRA layers
    return TrainResult(adapter=out, record=record)
