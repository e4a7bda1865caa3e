"""Per-request compositions, served unmerged from the blocks' factors beside the merged default.

A request may name its own composition in its ``model`` field (``"math+medicine:0.5"``: blocks of the library,
``+``-separated, each with an optional ``:WEIGHT``, 1 by default). It is composed by the server's method, like a
change of the default, but never written into the weights: while the default composition ``D`` stays merged
(``W = W0 + dW_D``), every linear module adds, for the rows of the batch that run composition ``C``,

    y += x (dW_C - dW_D)^T = (x [A_C; A_D]^T) [B_C, -B_D]^T

from the factors (rank ``r_C + r_D``, never a dense ``out x in``), so those rows run on ``W0 + dW_C`` up to float
round-off, whatever the default is and however it changes while they run (they are never cut by a change).
With float32 weights their fingerprint is the one the same composition reports when it is made the default (the
same recipe); with bfloat16 weights the two differ by the rounding of the merged weights, so the fingerprint says
``+unmerged``.

At most ``limit`` distinct compositions are held (each costs its factors' memory and, per decoding step, two
small matmuls per module); one no running request uses is dropped for a new one, and when every held one is in
use a request naming another gets :class:`~lorablocks.serving.errors.ServerBusyError` (503, Retry-After).
"""

from __future__ import annotations

import collections
import contextlib
import math
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lorablocks.core.algebra import LowRank
from lorablocks.serving.errors import ModelNotFoundError, RequestError, ServerBusyError

__all__ = ["parse_composition", "RowComposition", "RequestCompositions", "RowHooks"]


def parse_composition(text: str, known: Callable[[str], bool] = lambda name: False) -> list[tuple[str, float]]:
    """``"math+medicine:0.5"`` -> ``[("math", 1.0), ("medicine", 0.5)]``; :class:`RequestError` on bad syntax.

    Block names may hold ``+`` (the study's ``merged-math+medicine``) and ``:`` (``v2:final``): where ``known(name)``
    says a name is a block, it is read whole. At each place the longest run of ``+``-joined parts that names a
    block, alone or followed by ``:WEIGHT``, is taken; a part that is a block's whole name has weight 1."""
    parts, entries, i = text.split("+"), [], 0
    if len(parts) > MAX_PARTS:
        raise RequestError(f"model: a composition of at most {MAX_PARTS} '+'-joined parts, got {len(parts)}",
                           setting="model")
    while i < len(parts):
        longest = i + 1  # a name is at most 255 characters (and its weight a few more): no longer run is tried
        while longest < len(parts) and len("+".join(parts[i:longest + 1])) <= _LONGEST_PART:
            longest += 1
        j = next((j for j in range(longest, i + 1, -1) if _names_block(parts[i:j], known)), i + 1)
        entries.append(_entry(text, "+".join(parts[i:j]), known))
        i = j
    return entries


#: '+'-joined parts a request's composition may have (each name costs a look-up in the library)
MAX_PARTS = 256
_LONGEST_PART = 255 + 40  # a block name's longest (check_block_name) and room for ':WEIGHT'


def _names_block(run: list[str], known: Callable[[str], bool]) -> bool:
    """Whether ``+``-joined ``run`` is a block's name, alone or with ``:WEIGHT`` (after a ``:`` of its last part)."""
    text = "+".join(run)
    return known(text.strip()) or (":" in run[-1] and known(text.rpartition(":")[0].strip()))


def _entry(text: str, part: str, known: Callable[[str], bool]) -> tuple[str, float]:
    if ":" not in part or known(part.strip()):
        name, weight = part.strip(), None
    else:
        name, _, weight = part.rpartition(":")
        name = name.strip()
    if not name:
        raise RequestError(f"model {text!r}: an empty block name; write blocks as NAME[:WEIGHT]+NAME[:WEIGHT]",
                           setting="model")
    try:
        w = float(weight) if weight is not None else 1.0
    except ValueError:
        raise RequestError(f"model {text!r}: weight {weight!r} of block {name!r} is not a number",
                           setting="model") from None
    if not math.isfinite(w):
        raise RequestError(f"model {text!r}: the weight of block {name!r} must be finite", setting="model")
    return name, w


@dataclass(frozen=True)
class _Factors:
    """One module's added delta as pre-transposed factors: ``y += (x @ At) @ Bt``."""

    At: torch.Tensor
    Bt: torch.Tensor


@dataclass(eq=False)
class RowComposition:
    """A composition served unmerged: its name in requests, its fingerprint, its delta, and how many running
    requests use it."""

    spec: str
    fingerprint: str
    delta: Mapping[str, LowRank]
    users: int = 0
    _against: tuple[Any, torch.dtype, dict[str, _Factors]] | None = field(default=None, repr=False)

    def factors(self, default: Mapping[str, LowRank], dtype: torch.dtype = torch.float32) -> dict[str, _Factors]:
        """Per module, the factors of ``delta - default`` (what rows of this composition add to the merged
        weights ``W0 + default``) in the model's ``dtype``; kept until the default changes."""
        cached = self._against
        if cached is not None and cached[0] is default and cached[1] == dtype:
            return cached[2]
        out: dict[str, _Factors] = {}
        for name in {*self.delta, *default}:
            mine, theirs = self.delta.get(name), default.get(name)
            As = ([mine.A] if mine is not None else []) + ([theirs.A] if theirs is not None else [])
            Bs = ([mine.B] if mine is not None else []) + ([-theirs.B] if theirs is not None else [])
            out[name] = _Factors(torch.cat(As).T.contiguous().to(dtype), torch.cat(Bs, dim=1).T.contiguous().to(dtype))
        self._against = (default, dtype, out)
        return out


class RequestCompositions:
    """The compositions requests name, at most ``limit`` at once, composed by ``live``'s method on first use."""

    def __init__(self, live: Any, hooks: RowHooks | None, limit: int = 4) -> None:
        """``hooks``: the engine's (``None``: an engine that cannot serve per-request compositions, limit 0)."""
        self.live = live
        self.limit = max(0, limit) if hooks is not None else 0
        self._held: collections.OrderedDict[tuple, RowComposition] = collections.OrderedDict()
        self._lock = threading.Lock()

    def acquire(self, spec: str) -> RowComposition:
        """The composition ``spec`` names, held for one request until :meth:`release`."""
        available = self.live.library.names()  # one listing per request (every name in it checked, as is_block does)
        listed = set(available)
        entries = parse_composition(spec, listed.__contains__)
        names = [n for n, _ in entries]
        if not all(n in listed for n in names):
            raise ModelNotFoundError(
                f"model {spec!r} is neither this server's model nor a composition of its blocks "
                f"(NAME[:WEIGHT]+...; available: {', '.join(available) or 'none'})", setting="model")
        if self.limit == 0:
            raise RequestError("per-request compositions are off on this server (serve --max-compositions 0, or "
                               "--max-batch 0); change the default composition with /v1/blocks", setting="model")
        key = (tuple(entries), tuple(self.live.library.get(n).file.sha256 for n in names))
        with self._lock:
            held = self._held.get(key)
            if held is not None:
                held.users += 1
                self._held.move_to_end(key)
                return held
        delta, recipe = self.live.composition(entries, lambda i: "model")  # outside the lock: may take a while
        composed = self.live.composed
        # in float32 unmerged rows run on W0 + dW_C up to round-off, as the same composition merged does; in a
        # lower precision the merged default's own rounding differs from the merged composition's by as much as
        # the rounding, and the tokens drift apart: other weights, so another fingerprint
        fingerprint = recipe.fingerprint(base=f"{composed.identity}+unmerged" if composed.dtype_tag else composed.identity)
        with self._lock:
            held = self._held.get(key) or self._make_room(key, RowComposition(spec, fingerprint, delta))
            held.users += 1
            return held

    def is_block(self, name: str) -> bool:
        """Whether ``name`` is a block of the library (a bad or unknown name is not)."""
        try:
            self.live.library.path(name)
        except Exception:  # noqa: BLE001 - a bad or unknown name is simply not a block
            return False
        return True

    def _make_room(self, key: tuple, new: RowComposition) -> RowComposition:
        if len(self._held) >= self.limit:
            idle = next((k for k, c in self._held.items() if c.users == 0), None)
            if idle is None:
                raise ServerBusyError(f"the server holds {self.limit} per-request compositions, all in use; retry "
                                      "shortly or use one of them")
            del self._held[idle]
        self._held[key] = new
        return new

    def release(self, held: RowComposition) -> None:
        with self._lock:
            held.users = max(0, held.users - 1)

    def held(self) -> list[RowComposition]:
        with self._lock:
            return list(self._held.values())

    def usage(self) -> dict[str, int]:
        """How many per-request compositions are held, how many of them running requests use, and the limit."""
        with self._lock:
            return {"held": len(self._held), "in_use": sum(c.users > 0 for c in self._held.values()),
                    "limit": self.limit}


class RowHooks:
    """Forward hooks that add, per group of batch rows, a composition's factors to a model's linear modules.

    The decoding thread sets the groups for one forward with :meth:`rows`: only then, and only on the modules the
    groups touch, are hooks registered (removed after), so a forward without per-request rows runs no hook at all.
    A hook reads its thread's groups: a forward on another thread adds nothing.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._local = threading.local()
        self._modules: dict[str, nn.Module] | None = None

    def _targets(self) -> dict[str, nn.Module]:
        if self._modules is None:
            self._modules = {name: m for name, m in self.model.named_modules()
                             if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"}
        return self._modules

    @contextlib.contextmanager
    def rows(self, groups: Sequence[tuple[torch.Tensor | None, Mapping[str, _Factors]]]) -> Iterator[None]:
        """During the block, rows ``index`` (``None``: all) of a forward add the factors given for them."""
        if not groups:
            yield
            return
        targets = self._targets()
        needed = {name for _, factors in groups for name in factors if name in targets}
        self._local.groups = list(groups)
        handles = [targets[name].register_forward_hook(self._hook(name)) for name in sorted(needed)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            self._local.groups = None

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            groups = getattr(self._local, "groups", None)
            if not groups:
                return None
            x = args[0]
            for index, factors in groups:
                f = factors.get(name)
                if f is None:
                    continue
                xs = x if index is None else x.index_select(0, index)
                add = (xs @ f.At.to(xs.dtype)) @ f.Bt.to(xs.dtype)
                output = output + add if index is None else output.index_add(0, index, add)
            return output

        return hook
