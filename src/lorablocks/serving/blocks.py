"""The block library of a server (every adapter sub-folder of one folder) and the recipe of live use.

A block is named by its folder name. A name is refused (:class:`BlockNameError`) when it holds a path
separator, is ``.``/``..`` or hidden, or when the folder or its files (config, weights, stored input
statistics) resolve (through symlinks) outside the library's folder: nothing outside it is ever read. Opened
blocks are kept in memory, keyed by their files' size and modification time, so a change of composition reads
nothing from disk unless a block's files changed (new statistics are read at the next change).

Live compositions use rank ``concat`` (the exact sum, no re-factoring: the delta is made dense when it is
merged anyway); ``generate`` and ``serve`` build the same recipe, so they merge the same bits.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorablocks.compose.recipe import Block, Recipe, make_recipe
from lorablocks.core import algebra
from lorablocks.core.algebra import LowRank
from lorablocks.errors import AdapterFormatError, LoraBlocksError, ShapeMismatchError
from lorablocks.files.adapters import CONFIG_NAME, WEIGHTS_NAME, AdapterFile, open_adapter
from lorablocks.files.statistics import STATS_NAME
from lorablocks.serving.errors import BlockNameError, UnknownBlockError

__all__ = ["LIVE_RANK", "LoadedBlock", "BlockLibrary", "check_block_name", "live_recipe", "check_blocks_fit",
           "open_composed"]

#: rank mode of every live composition: the exact concatenated sum
LIVE_RANK = "concat"


def live_recipe(blocks: Sequence[Block], method: str = "sum", params: Mapping[str, Any] | None = None) -> Recipe:
    """The recipe ``generate`` and ``serve`` merge: ``blocks`` by ``method`` at rank ``concat``."""
    return make_recipe(blocks, method=method, params=params, rank=LIVE_RANK)


def check_block_name(name: str) -> str:
    """``name`` if it is a plain folder name; :class:`BlockNameError` otherwise."""
    if not isinstance(name, str) or not name.strip():
        raise BlockNameError("a block name must be a non-empty folder name", setting="name")
    if any(sep in name for sep in ("/", "\\", os.sep, "\0")) or name.startswith(".") or len(name) > 255:
        raise BlockNameError(f"block name {name!r} is not a plain folder name (no paths, '..' or hidden names)",
                             setting="name")
    if not name.isprintable() or not _utf8(name):
        raise BlockNameError(f"block name {name!r} holds control characters or is not valid Unicode", setting="name")
    return name


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (or a folder name that is not UTF-8 on disk)
        return False
    return True


@dataclass(frozen=True)
class LoadedBlock:
    """A block opened and read: its file (config, sha256, shapes) and its delta."""

    name: str
    file: AdapterFile
    delta: dict[str, LowRank]

    def block(self, weight: float) -> Block:
        f = self.file
        return Block(name=self.name, weight=float(weight), path=str(f.path), sha256=f.sha256, scales=f.scales_sha256,
                     base_model=f.base_model)


class BlockLibrary:
    """The adapters in one folder, by folder name; nothing outside the folder can be loaded."""

    def __init__(self, root: str | os.PathLike) -> None:
        path = Path(root).expanduser()
        if not path.is_dir():
            raise LoraBlocksError(f"blocks folder {root} does not exist or is not a folder", setting="blocks")
        self.root = path.resolve()
        self._cache: dict[str, tuple[tuple[int, ...], LoadedBlock]] = {}
        self._lock = threading.Lock()

    def _inside(self, path: Path, name: str) -> bool:
        try:
            real = path.resolve()
        except (OSError, RuntimeError):  # a symlink loop (RuntimeError before Python 3.13)
            raise BlockNameError(f"block {name!r} leads into a symlink loop; it is not loaded",
                                 setting="name") from None
        return real != self.root and real.is_relative_to(self.root)

    def names(self) -> list[str]:
        """Every available block: sub-folders holding an adapter config, whose files stay inside the folder
        (an entry that cannot be read, loops or leads outside is left out)."""
        try:
            entries = [p.name for p in self.root.iterdir()]
        except OSError as exc:
            raise LoraBlocksError(f"cannot list the blocks folder: {exc.strerror or exc}", setting="blocks") from None
        found = []
        for name in entries:
            try:
                if self._folder(name) is not None:
                    found.append(name)
            except (LoraBlocksError, OSError, RuntimeError):
                continue
        return sorted(found)

    def path(self, name: str) -> Path:
        """The folder of block ``name``, after every check on the name and where it leads."""
        folder = self._folder(name)
        if folder is None:
            raise UnknownBlockError(f"no block named {name!r}; available: {', '.join(self.names()) or 'none'}",
                                    setting="name")
        return folder

    def _folder(self, name: str) -> Path | None:
        """The block's folder; ``None`` when there is no adapter of that name; an error for an escaping one."""
        folder = self.root / check_block_name(name)
        try:
            if folder.is_symlink() or folder.exists():
                for p in (folder, *_files(folder)):
                    if (p.is_symlink() or p.exists()) and not self._inside(p, name):
                        raise BlockNameError(f"block {name!r} leads outside the blocks folder; it is not loaded",
                                             setting="name")
            return folder if folder.is_dir() and (folder / CONFIG_NAME).is_file() else None
        except OSError as exc:  # unreadable (permissions, a name too long for the file system)
            raise AdapterFormatError(f"block {name!r} cannot be read: {exc.strerror or exc}", setting="name") from None

    def get(self, name: str) -> LoadedBlock:
        """Block ``name``, opened and read (from memory when its files are unchanged)."""
        folder = self.path(name)
        key = _signature(folder)
        with self._lock:
            cached = self._cache.get(name)
            if cached is not None and cached[0] == key:
                return cached[1]
        file = open_adapter(folder)
        loaded = LoadedBlock(name=name, file=file, delta=file.load().delta)
        with self._lock:
            self._cache[name] = (key, loaded)
        return loaded


def _files(folder: Path) -> tuple[Path, ...]:
    """The files of a block that are read: config, weights, and the input statistics stored beside them."""
    return folder / CONFIG_NAME, folder / WEIGHTS_NAME, folder / STATS_NAME


def _signature(folder: Path) -> tuple[int, ...]:
    out: list[int] = []
    for p in _files(folder):
        try:
            st = p.stat()
            out += [st.st_size, st.st_mtime_ns, st.st_ino]
        except OSError:
            out += [-1, -1, -1]
    return tuple(out)


def check_blocks_fit(files: Sequence[AdapterFile]) -> None:
    """The blocks fit together: shapes per module, model type (``fan_in_fan_out``), recorded base model."""
    from lorablocks.compose.operations import check_same_base_model

    algebra.check_compatible([f.shapes for f in files], [f.name for f in files])
    if len({f.fan_in_fan_out for f in files}) > 1:
        raise ShapeMismatchError("the blocks disagree on fan_in_fan_out: they were made for different model types")
    check_same_base_model(files)


def open_composed(model: str, adapters: Sequence[str | os.PathLike] = (), weights: Sequence[float] | None = None, *,
                  method: str = "sum", params: Mapping[str, Any] | None = None, allow_base_mismatch: bool = False,
                  cache_dir: str | os.PathLike | None = None) -> Any:
    """Load ``model`` with the live recipe of ``adapters`` merged in (what ``generate`` runs on).

    The adapters and the recipe are checked before the (slow) model load.
    """
    from lorablocks.compose.operations import blocks_of, open_blocks
    from lorablocks.compose.recipe import MemorySource
    from lorablocks.model.session import ComposedModel

    files = open_blocks(adapters, allow_base_mismatch=allow_base_mismatch) if adapters else []
    if not files and weights:
        raise LoraBlocksError("weights were given but no adapters", setting="weights")
    recipe = live_recipe(blocks_of(files, weights), method, params) if files else None
    composed = ComposedModel.load(model, cache_dir=cache_dir)
    if recipe is not None:
        deltas = composed.load_blocks(files, allow_base_mismatch=allow_base_mismatch)
        # each block's stored input statistics travel with it (regmean composes with them)
        composed.apply_recipe(recipe, [MemorySource(d, statistics=f.statistics) for f, d in zip(files, deltas)])
    return composed
