"""A block's input statistics on disk: ``lorablocks_stats.safetensors`` beside its adapter files.

One Gram per distinct input site (modules fed the same tensor, e.g. ``q/k/v_proj`` or ``gate/up_proj``,
share one, keyed by the first of them), each the token *mean* of ``x x^T`` over the block's domain
examples (prompt and answer tokens, padding masked). Inputs up to :data:`DENSE_MAX` wide are stored exactly
(float32, the packed upper triangle ``<site>.triu``, row by row: a Gram is symmetric, so half the bytes
to store, read and hash; format 1 files with the whole ``<site>.gram`` are still read); wider ones as a
sketch: the top :data:`SKETCH_RANK` eigenpairs (``<site>.U``, ``<site>.S``) plus the exact diagonal
(``<site>.diag``). The safetensors metadata holds one JSON object
(``lorablocks``): format, base model, per site its modules, width, token count and kind, and which data
(split, examples, tokens) the statistics came from. Nothing is ever unpickled: safetensors + JSON only.

Statistics made on another base model, or whose widths do not fit a block's modules, are refused like
mismatched adapters (:class:`~lorablocks.errors.BaseModelMismatchError`, :class:`~lorablocks.errors.ShapeMismatchError`).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from lorablocks.core.regmean import InputGram
from lorablocks.errors import (AdapterFormatError, BaseModelMismatchError, LoraBlocksError, OutputExistsError,
                               ShapeMismatchError)
from lorablocks.files.outputs import atomic_file, one_line
from lorablocks.files.records import PendingDigest

__all__ = ["STATS_NAME", "FORMAT", "READABLE", "pack_triu", "unpack_triu", "DENSE_MAX", "SKETCH_RANK", "StatsSite",
           "BlockStatistics", "open_statistics", "statistics_beside", "write_statistics"]

STATS_NAME = "lorablocks_stats.safetensors"
FORMAT = "lorablocks-stats/2"
#: formats read (1: whole Grams, ``<site>.gram``; 2: packed upper triangles, ``<site>.triu``)
READABLE = ("lorablocks-stats/1", FORMAT)
#: inputs up to this width keep their exact Gram (SmolLM2-135M: 576 and 1536; 7B: 4096 and 11008 are sketched)
DENSE_MAX = 2048
#: eigenpairs kept by a sketch
SKETCH_RANK = 256


@dataclass(frozen=True)
class StatsSite:
    """One input site: the modules fed by it, its width, token count and how its Gram is stored."""

    modules: tuple[str, ...]
    size: int
    tokens: int
    kind: str  # "full" or "sketch"


@dataclass
class BlockStatistics:
    """A block's input statistics (read from a file on demand, or held in memory)."""

    sites: dict[str, StatsSite]
    base_model: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    format: str = FORMAT
    #: the file's SHA-256, or its digest still being computed in the background (:attr:`sha256` waits)
    digest: str | PendingDigest | None = None
    grams: dict[str, InputGram] | None = None  # in memory (``path`` None)

    @property
    def sha256(self) -> str | None:
        """The statistics file's SHA-256 (None in memory); waits for a background digest."""
        if isinstance(self.digest, PendingDigest):
            try:
                self.digest = self.digest.result()
            except LoraBlocksError as exc:
                raise AdapterFormatError(str(exc)) from None
        return self.digest

    @property
    def module_site(self) -> dict[str, str]:
        return {m: s for s, site in self.sites.items() for m in site.modules}

    def check_fits(self, shapes: Mapping[str, tuple[int, int]], base_model: str | None, label: str) -> None:
        """Refuse statistics of another base model, missing a module, or of another width."""
        from lorablocks.model.models import same_base_model

        where = str(self.path) if self.path else f"the statistics of {label}"
        if base_model and self.base_model and not same_base_model(base_model, self.base_model):
            raise BaseModelMismatchError(f"{where} were collected on {self.base_model}, but {label} was trained on "
                                         f"{base_model}", setting="statistics")
        sites = self.module_site
        for module, (_, width) in shapes.items():
            if module not in sites:
                raise ShapeMismatchError(f"{where} hold no statistics for module {module} of {label}; "
                                         "collect them again (lorablocks stats)")
            if self.sites[sites[module]].size != width:
                raise ShapeMismatchError(f"{where}: module {module} has input width {self.sites[sites[module]].size} "
                                         f"there but {width} in {label}: they were made for different base models")

    def gram(self, module: str) -> InputGram:
        """The Gram of ``module``'s input site, read from disk now (or from memory); the last two sites read
        are kept, so that the modules of one site (``q/k/v_proj``) get the same object, read once."""
        site = self.module_site[module]
        if self.grams is not None:
            return self.grams[site]
        recent = self.__dict__.setdefault("_recent", [])
        hit = next((g for s, g in recent if s == site), None)
        if hit is None:
            hit = self._read(site)
            recent[:] = [(site, hit), *recent[:1]]
        return hit

    def _read(self, site: str) -> InputGram:
        module = self.sites[site].modules[0]
        meta = self.sites[site]
        try:
            with safe_open(str(self.path), framework="pt") as fh:
                if meta.kind == "full" and self.format == READABLE[0]:
                    return InputGram.exact(fh.get_tensor(f"{site}.gram"), meta.tokens)
                if meta.kind == "full":
                    return InputGram.exact(unpack_triu(fh.get_tensor(f"{site}.triu"), meta.size), meta.tokens)
                return InputGram(diag=fh.get_tensor(f"{site}.diag"), U=fh.get_tensor(f"{site}.U"),
                                 S=fh.get_tensor(f"{site}.S"), tokens=meta.tokens)
        except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as exc:
            raise AdapterFormatError(f"{self.path}: cannot read the statistics of {module} ({one_line(exc)})") from None

    def record(self) -> dict[str, Any]:
        """What a composition's record says about the statistics it used."""
        return {"path": str(self.path) if self.path else None, "sha256": self.sha256, "data": self.data}


@functools.lru_cache(maxsize=4)
def _triu_flat(n: int) -> torch.Tensor:
    """Flat indices of an ``n x n`` matrix's upper triangle, row by row."""
    rows, cols = torch.triu_indices(n, n)
    return rows * n + cols


def pack_triu(gram: torch.Tensor) -> torch.Tensor:
    """The upper triangle (diagonal included) of a square matrix, row by row, as one vector."""
    return gram.reshape(-1)[_triu_flat(gram.shape[0])]


def unpack_triu(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The symmetric ``n x n`` matrix whose upper triangle :func:`pack_triu` packed."""
    if packed.ndim != 1 or packed.shape[0] != n * (n + 1) // 2:
        raise ValueError(f"{tuple(packed.shape)} is not the packed triangle of a {n} x {n} matrix")
    half = torch.zeros(n * n, dtype=packed.dtype).index_copy_(0, _triu_flat(n), packed).view(n, n)
    return half.add_(half.T.tril(-1))  # the mirror from the transpose: 2.5x faster than a scattered copy


def _site_of(key: str, value: Any, where: Path) -> StatsSite:
    try:
        site = StatsSite(modules=tuple(str(m) for m in value["modules"]), size=int(value["size"]),
                         tokens=int(value["tokens"]), kind=str(value["kind"]))
    except (KeyError, TypeError, ValueError):
        raise AdapterFormatError(f"{where}: site {key} is described incompletely") from None
    if site.kind not in ("full", "sketch") or not site.modules or site.size < 1:
        raise AdapterFormatError(f"{where}: site {key} is described wrongly ({site.kind}, {site.size})")
    return site


def open_statistics(path: str | os.PathLike, *, digest: bool = True) -> BlockStatistics:
    """Open a statistics file (header and metadata only) and validate what it says; its SHA-256 is computed in
    the background (``digest`` False: not at all, for a file only checked)."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta, keys = fh.metadata() or {}, set(fh.keys())
            shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in keys}
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as exc:
        raise AdapterFormatError(f"{path} is not a readable statistics file ({one_line(exc)})") from None
    try:
        info = json.loads(meta.get("lorablocks", ""))
    except ValueError:
        info = None
    if not isinstance(info, dict) or info.get("format") not in READABLE or not isinstance(info.get("sites"), dict):
        raise AdapterFormatError(f"{path} is not a lorablocks statistics file (format {FORMAT})")
    packed = info["format"] != READABLE[0]
    sites = {k: _site_of(k, v, path) for k, v in info["sites"].items()}
    for k, s in sites.items():
        if s.kind == "sketch":
            want = {f"{k}.diag": (s.size,)}
        else:
            want = {f"{k}.triu": (s.size * (s.size + 1) // 2,)} if packed else {f"{k}.gram": (s.size, s.size)}
        for name, shape in want.items():
            if shapes.get(name) != shape:
                raise AdapterFormatError(f"{path}: tensor {name} is {shapes.get(name)}, its site says {shape}")
    return BlockStatistics(sites=sites, base_model=info.get("base_model"), data=info.get("data") or {}, path=path,
                           format=info["format"], digest=PendingDigest(path) if digest else None)


def statistics_beside(folder: str | os.PathLike) -> BlockStatistics | None:
    """The statistics stored in an adapter folder, or None when it has none."""
    path = Path(folder) / STATS_NAME
    return open_statistics(path) if path.is_file() else None


def _is_ours(path: Path) -> bool:
    try:
        open_statistics(path, digest=False)
        return True
    except AdapterFormatError:
        return False


def write_statistics(path: str | os.PathLike, grams: Mapping[str, InputGram], modules: Mapping[str, Sequence[str]],
                     base_model: str | None, data: Mapping[str, Any], *, force: bool = False) -> BlockStatistics:
    """Write ``grams`` (site -> Gram, ``modules[site]`` the modules it feeds) atomically; an existing file is
    replaced only with ``force`` and only if it is a lorablocks statistics file."""
    from safetensors.torch import save

    path = Path(path)
    if path.exists():
        if not force:
            raise OutputExistsError(f"{path} exists; pass --force to replace it")
        if not path.is_file() or not _is_ours(path):
            raise OutputExistsError(f"{path} is not a lorablocks statistics file; it is never replaced")
    tensors: dict[str, torch.Tensor] = {}
    sites: dict[str, Any] = {}
    for site, g in grams.items():
        if g.is_sketch:
            tensors.update({f"{site}.diag": g.diag, f"{site}.U": g.U, f"{site}.S": g.S})
        else:
            tensors[f"{site}.triu"] = pack_triu(g.full)
        sites[site] = {"modules": list(modules[site]), "size": g.size, "tokens": int(g.tokens),
                       "kind": "sketch" if g.is_sketch else "full"}
    tensors = {k: v.detach().to(torch.float32).contiguous() for k, v in tensors.items()}
    info = {"format": FORMAT, "base_model": base_model, "normalised": "token mean of x x^T", "sites": sites,
            "data": dict(data)}
    blob = save(tensors, metadata={"lorablocks": json.dumps(info, default=str)})
    with _into_adapter_folder(), atomic_file(path, force=path.exists(), mode="wb") as fh:
        fh.write(blob)
    return open_statistics(path)


def _into_adapter_folder() -> Any:
    """Adding the statistics file into the adapter folder it describes is the one write into an input folder
    lorablocks makes (a new file, or one it wrote itself: checked above), so the running command's record of
    inputs is set aside for it."""
    import contextlib

    from lorablocks.files import records

    fresh = getattr(records, "reading_inputs", None)
    return fresh() if fresh is not None else contextlib.nullcontext()
