"""Training checkpoints as safetensors + JSON: nothing a checkpoint holds is ever unpickled.

``step-NNNNNNN/`` holds ``lora.safetensors`` (the trained tensors), ``optimizer.safetensors`` (the optimizer
state tensors, named ``<param index>.<key>``), ``state.json`` (the trainer's state, the optimizer's param
groups and scalar state, the scheduler's state) and ``rng-<process>.safetensors`` (the torch RNG states;
the Python RNG state as JSON metadata). A ``step-*`` folder without ``state.json`` is not a checkpoint:
pickled files (``state.pt`` of earlier versions, or planted ones) are never read. Each checkpoint is
written atomically, and older ones are removed once it is in place.

A checkpoint folder lorablocks creates carries ``lorablocks-checkpoints.json``. Before any work a run refuses
(:func:`check_checkpoint_folder`) a checkpoint folder that holds anything but checkpoints (a user's folder),
and at the end it removes only the files it writes (:func:`remove_checkpoints`): the folder itself only
when lorablocks made it and nothing else is left in it.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from lorablocks.errors import ConfigError
from lorablocks.files.outputs import atomic_dir, utc_now

__all__ = ["CHECKPOINTS_MARKER", "check_checkpoint_folder", "latest_checkpoint", "save_checkpoint", "load_checkpoint",
           "remove_checkpoints"]

#: The marker lorablocks writes into every checkpoint folder it creates.
CHECKPOINTS_MARKER = "lorablocks-checkpoints.json"
_STEP = re.compile(r"step-\d{7}")
#: What a run leaves in a checkpoint folder while it writes one (see :func:`save_checkpoint`, ``atomic_dir``).
_IN_PROGRESS = re.compile(r"\.step-\d{7}\.(?:(?:tmp|old)-\d+-\w+|lock)|\.rng-\d{7}-\d+\.safetensors")
#: The files of one checkpoint.
_FILES = re.compile(r"lora\.safetensors|optimizer\.safetensors|state\.json|rng-\d+\.safetensors")


def _refuse(folder: Path, why: str) -> ConfigError:
    return ConfigError(f"checkpoint folder {folder} {why}; lorablocks uses only a new folder or one it made "
                       "for checkpoints, and removes only its own checkpoints", setting="checkpoint_dir")


def check_checkpoint_folder(folder: Path) -> None:
    """Refuse (:class:`ConfigError`) a checkpoint folder lorablocks did not make or that holds anything but
    checkpoints, so that removing the checkpoints at the end can never touch anything else. A missing or
    empty folder is fine; without the marker (folders of earlier versions) every entry must be a checkpoint."""
    if not os.path.lexists(folder):
        return
    if folder.is_symlink() or not folder.is_dir():
        raise _refuse(folder, "is not a folder" if not folder.is_symlink() else "is a symbolic link")
    try:
        entries = list(os.scandir(folder))
    except OSError as exc:
        raise _refuse(folder, f"cannot be read ({exc.strerror})") from None
    marked = any(e.name == CHECKPOINTS_MARKER and e.is_file(follow_symlinks=False) for e in entries)
    for e in sorted(entries, key=lambda e: e.name):
        if (e.name == CHECKPOINTS_MARKER and marked) or _IN_PROGRESS.fullmatch(e.name):
            continue
        is_step = _STEP.fullmatch(e.name) is not None and e.is_dir(follow_symlinks=False)
        if not is_step:
            raise _refuse(folder, f"holds {e.name}, which is not a lorablocks checkpoint")
        if not marked and not (Path(e.path) / "state.json").is_file():
            raise _refuse(folder, f"was not made by lorablocks (no {CHECKPOINTS_MARKER}, and {e.name} is not a checkpoint)")


def _make_folder(folder: Path) -> None:
    """Create the checkpoint folder with its marker, unless it exists (checked by :func:`check_checkpoint_folder`)."""
    try:
        folder.mkdir(parents=True)
    except FileExistsError:
        return
    (folder / CHECKPOINTS_MARKER).write_text(json.dumps({"tool": "lorablocks", "kind": "checkpoints",
                                                         "created": utc_now()}) + "\n")


def _remove_checkpoint(step: Path) -> None:
    """Remove one checkpoint's own files, then its folder if that left it empty (a planted file stays)."""
    if step.is_symlink() or not step.is_dir():
        return
    for f in step.iterdir():
        if _FILES.fullmatch(f.name) and not f.is_symlink() and f.is_file():
            f.unlink(missing_ok=True)
    try:
        step.rmdir()
    except OSError:
        pass


def remove_checkpoints(folder: Path) -> None:
    """Remove the checkpoints in ``folder`` (their own files only), its marker, and the folder itself when
    lorablocks made it (it had the marker) and nothing else is left in it."""
    if folder.is_symlink() or not folder.is_dir():
        return
    for step in folder.iterdir():
        if _STEP.fullmatch(step.name):
            _remove_checkpoint(step)
    marker = folder / CHECKPOINTS_MARKER
    if marker.is_file() and not marker.is_symlink():
        marker.unlink()
        try:
            folder.rmdir()
        except OSError:
            pass


def latest_checkpoint(folder: Path) -> tuple[Path | None, list[Path]]:
    """The latest complete checkpoint in ``folder`` (or None), and the ``step-*`` folders that are not one."""
    if not folder.is_dir():
        return None, []
    steps = sorted((p for p in folder.glob("step-*") if p.is_dir()), key=lambda p: p.name)
    good = [p for p in steps if (p / "state.json").is_file()]
    return (good[-1] if good else None), [p for p in steps if p not in good]


def _trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _save_rng(path: Path) -> None:
    """This process's torch (and CUDA) RNG state as tensors, Python's ``random`` state as JSON metadata."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    save_file(tensors, str(path), metadata={"python": json.dumps(random.getstate())})


def _load_rng(path: Path) -> None:
    """Restore what :func:`_save_rng` wrote."""
    with safe_open(str(path), "pt") as f:
        torch.set_rng_state(f.get_tensor("torch"))
        if "cuda" in f.keys() and torch.cuda.is_available():
            torch.cuda.set_rng_state(f.get_tensor("cuda"))
        version, internal, gauss = json.loads(f.metadata()["python"])
    random.setstate((version, tuple(internal), gauss))


def _split_optimizer_state(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``optimizer.state_dict()`` as named tensors plus a JSON-able rest (param groups, scalar state)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, entries in sd["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _join_optimizer_state(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`_split_optimizer_state`."""
    state: dict[int, dict[str, Any]] = {}
    for name, t in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = t
    for pid, entries in rest["scalars"].items():
        state.setdefault(int(pid), {}).update(entries)
    groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
              for g in rest["param_groups"]]  # JSON made the tuples (betas) lists
    return {"state": state, "param_groups": groups}


def save_checkpoint(folder: Path, step: int, model: torch.nn.Module, optimizer: Any, scheduler: Any,
                    accelerator: Any, state: dict[str, Any]) -> None:
    """Write ``folder/step-NNNNNNN`` (each process its RNG state, the main process the rest) and drop older
    checkpoints; ``state`` is the trainer's JSON-able state."""
    acc = accelerator
    target = folder / f"step-{step:07d}"
    if acc.is_main_process:
        _make_folder(folder)
    acc.wait_for_everyone()
    _save_rng(folder / f".rng-{step:07d}-{acc.process_index}.safetensors")
    acc.wait_for_everyone()
    if acc.is_main_process:
        tensors, optimizer_rest = _split_optimizer_state(optimizer.state_dict())
        payload = {"state": state, "optimizer": optimizer_rest, "scheduler": scheduler.state_dict()}
        with atomic_dir(target, force=True) as tmp:
            save_file({n: p.detach().cpu().contiguous() for n, p in _trainable(model).items()},
                      str(tmp / "lora.safetensors"))
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            (tmp / "state.json").write_text(json.dumps(payload) + "\n")
            for r in range(acc.num_processes):
                shutil.move(str(folder / f".rng-{step:07d}-{r}.safetensors"), tmp / f"rng-{r}.safetensors")
        for old in folder.glob("step-*"):
            if old != target and _STEP.fullmatch(old.name):
                _remove_checkpoint(old)
    acc.wait_for_everyone()


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: Any, scheduler: Any, accelerator: Any) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and this process's RNG from ``path``; return the trainer's state."""
    rng_file = path / f"rng-{accelerator.process_index}.safetensors"
    if not rng_file.is_file():
        raise ConfigError(f"checkpoint {path} was written by fewer processes; resume with the same process count")
    try:
        tensors = load_file(str(path / "lora.safetensors"))
        payload = json.loads((path / "state.json").read_text())
        optimizer_state = _join_optimizer_state(load_file(str(path / "optimizer.safetensors")), payload["optimizer"])
    except (OSError, ValueError, KeyError, SafetensorError) as exc:  # JSONDecodeError is a ValueError
        raise ConfigError(f"checkpoint {path} is unreadable ({type(exc).__name__}); delete it to start afresh") from None
    params = _trainable(model)
    if set(tensors) != set(params):
        raise ConfigError(f"checkpoint {path} does not match this model/LoRA config (different trained tensors)")
    with torch.no_grad():
        for n, t in tensors.items():
            params[n].copy_(t)
    optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(payload["scheduler"])
    _load_rng(rng_file)
    return payload["state"]
