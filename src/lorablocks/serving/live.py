"""A served model whose composition changes in place while it serves, safely and exactly.

:class:`LiveModel` owns a :class:`~lorablocks.model.session.ComposedModel`, the block library and a
readers-writer lock. A generation holds the read lock from its first token to its last; a change of
composition is composed (factored, cheap) outside the lock, then takes the write lock, which waits for the
running generations and holds new ones (writers first) while the weights are rewritten: no request ever
runs on a half-applied composition, and each knows the fingerprint of the composition it ran on.
:class:`Runner` runs generations on a fixed pool of threads behind a bounded queue (full: 503).
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from lorablocks.compose.methods import get_method, validate_params
from lorablocks.compose.recipe import MemorySource, Recipe, compose, scaled_overflows
from lorablocks.core.algebra import Delta
from lorablocks.errors import CompositionError
from lorablocks.model.merge import check_delta_fits
from lorablocks.model.session import ComposedModel
from lorablocks.serving.blocks import BlockLibrary, LoadedBlock, check_blocks_fit, live_recipe
from lorablocks.serving.errors import ServerBusyError, UnknownBlockError

__all__ = ["BASE_FINGERPRINT", "RWLock", "ActiveBlock", "ChangeReport", "LiveModel", "Runner", "check_method",
           "check_statistics"]

#: the fingerprint reported while no block is active (float32 weights; others add their dtype: ``base@bfloat16``)
BASE_FINGERPRINT = "base"


class RWLock:
    """Many readers or one writer; a waiting writer holds back new readers (so changes never starve)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    def writer_waiting(self) -> bool:
        """Whether a writer waits (a reader that can stop early should)."""
        return self._writers_waiting > 0

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


@dataclass(frozen=True)
class ActiveBlock:
    name: str
    weight: float


@dataclass(frozen=True)
class ChangeReport:
    """A change of composition: the new blocks and fingerprint, how long it took (all, and the write-locked part),
    and the blocks available (listed before the change: nothing after the swap can fail)."""

    active: tuple[ActiveBlock, ...]
    fingerprint: str
    seconds: float
    locked_seconds: float
    available: tuple[str, ...] = ()


def check_method(method: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``params`` if ``method`` exists and takes them (:class:`CompositionError` otherwise)."""
    validate_params(get_method(method), dict(params or {}))
    return dict(params or {})


def check_statistics(loaded: Sequence[LoadedBlock], method: str) -> None:
    """Refuse, naming it, the first block without stored input statistics when ``method`` needs them."""
    if not get_method(method).needs_statistics:
        return
    bare = next((b for b in loaded if b.file.statistics is None), None)
    if bare is not None:
        raise CompositionError(f"block {bare.name!r} has no input statistics, which {method} needs: collect them "
                               f"with `lorablocks stats {bare.name} --data DOMAIN`", setting="statistics")


class LiveModel:
    """A composed model, its block library, the server-wide composition method (and its parameters), and the
    active blocks ``[(name, weight), ...]``: every change composes them by that method."""

    def __init__(self, composed: ComposedModel, library: BlockLibrary, method: str = "sum",
                 params: Mapping[str, Any] | None = None) -> None:
        self.composed, self.library = composed, library
        self.method, self.params = method, check_method(method, params)
        self.lock = RWLock()
        self._change = threading.Lock()  # one change at a time (read-modify-write of the active list)
        #: (active blocks, fingerprint), replaced as one value under the write lock
        self._base = BASE_FINGERPRINT + composed.dtype_tag  # no block active: "base" (float32), "base@bfloat16"
        self._current: tuple[tuple[ActiveBlock, ...], str] = ((), self._base)

    @property
    def active(self) -> tuple[ActiveBlock, ...]:
        return self._current[0]

    @property
    def fingerprint(self) -> str:
        return self._current[1]

    def state(self) -> dict[str, Any]:
        """``{"available": [...], "active": [{"name", "weight"}], "fingerprint", "method", "params"}``."""
        active, fp = self._current
        return {"available": self.library.names(), "active": [{"name": b.name, "weight": b.weight} for b in active],
                "fingerprint": fp, "method": self.method, "params": dict(self.params)}

    @contextlib.contextmanager
    def reading(self) -> Iterator[str]:
        """Hold the composition still (read lock); yields its fingerprint."""
        with self.lock.read():
            yield self._current[1]

    def set_active(self, entries: Sequence[tuple[str, float]]) -> ChangeReport:
        """Make exactly ``entries`` the composition (empty: the base model); unchanged on any error."""
        with self._change:
            return self._set(entries, lambda i: f"active.{i}.weight")

    def add(self, name: str, weight: float) -> ChangeReport:
        """Add block ``name`` at ``weight``, or change its weight if active."""
        with self._change:
            entries = [(b.name, b.weight) for b in self.active]
            names = [n for n, _ in entries]
            if name in names:
                entries[names.index(name)] = (name, weight)
            else:
                entries.append((name, weight))
            return self._set(entries, lambda i: "weight")

    def remove(self, name: str) -> ChangeReport:
        """Take block ``name`` out of the composition."""
        with self._change:
            if name not in [b.name for b in self.active]:
                self.library.path(name)  # a path-y or unknown name gets its own error first
                raise UnknownBlockError(f"block {name!r} is not active", setting="name")
            return self._set([(b.name, b.weight) for b in self.active if b.name != name], lambda i: "weight")

    def composition(self, entries: Sequence[tuple[str, float]],
                    weight_setting: Callable[[int], str] = lambda i: "weight") -> tuple[Delta, Recipe | None]:
        """The delta and recipe of ``entries`` by the server's method, every check done (names, files, weights,
        the fit to the model); nothing is changed. ``weight_setting(i)`` names entry ``i``'s weight in errors."""
        names, seen = [n for n, _ in entries], set()
        dup = next((n for n in names if n in seen or seen.add(n)), None)  # linear: a request may list many
        if dup is not None:
            raise CompositionError(f"block {dup!r} is listed twice", setting="active")
        for i, (_, w) in enumerate(entries):
            if not math.isfinite(w):
                raise CompositionError(f"weights must be finite numbers, got {w}", setting=weight_setting(i))
        for n in names:  # every name checked before any block is read
            self.library.path(n)
        loaded = [self.library.get(n) for n in names]
        _check_weights(loaded, [float(w) for _, w in entries], weight_setting)
        return self._compose(loaded, [float(w) for _, w in entries])

    def _set(self, entries: Sequence[tuple[str, float]], weight_setting: Callable[[int], str]) -> ChangeReport:
        """Everything that can fail (names, files, weights, the merged weights, the listing) before the swap."""
        t0 = time.perf_counter()
        delta, recipe = self.composition(entries, weight_setting)
        prepared = self.composed.prepare(delta, recipe) if recipe is not None else None  # outside the lock
        available = tuple(self.library.names())
        t1 = time.perf_counter()
        with self.lock.write():  # generations wait only for the copy into the weights
            report = self.composed.commit(prepared) if prepared is not None else self.composed.clear()
            active = tuple(ActiveBlock(n, float(w)) for n, w in entries)
            self._current = (active, report.fingerprint or self._base)
        t2 = time.perf_counter()
        return ChangeReport(*self._current, t2 - t0, t2 - t1, available)

    def _compose(self, loaded: Sequence[LoadedBlock], weights: Sequence[float]) -> tuple[Delta, Recipe | None]:
        """The live recipe of ``loaded`` by the server's method and its delta, checked against the model (before
        any lock); a method that needs statistics composes from each block's stored ones."""
        if not loaded:
            return {}, None
        check_blocks_fit([b.file for b in loaded])
        self.composed.check_base_model([(b.name, b.file.base_model) for b in loaded])
        check_statistics(loaded, self.method)
        recipe = live_recipe([b.block(w) for b, w in zip(loaded, weights)], self.method, self.params)
        composition = compose(recipe, [MemorySource(b.delta, statistics=b.file.statistics) for b in loaded])
        check_delta_fits(self.composed.model, composition.delta, label="the composition")
        return composition.delta, composition.recipe


def _check_weights(loaded: Sequence[LoadedBlock], weights: Sequence[float],
                   weight_setting: Callable[[int], str]) -> None:
    """Refuse a weight so large that the block's factors times it overflow, naming that block's weight."""
    for i, (block, w) in enumerate(zip(loaded, weights)):
        x = next((x for x in block.delta.values() if scaled_overflows(w, x)), None)
        if x is not None:
            raise CompositionError(f"block {block.name!r}: weight {w:g} is too large (times the block's factors it "
                                   f"overflows {str(x.A.dtype).removeprefix('torch.')})", setting=weight_setting(i))


class Runner:
    """Runs generation jobs on ``workers`` threads; at most ``queue`` more may wait (beyond: 503)."""

    def __init__(self, workers: int = 4, queue: int = 32) -> None:
        self.workers, self.queue = max(1, workers), max(0, queue)
        self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="lorablocks-gen")
        self._admitted = 0
        self._lock = threading.Lock()
        self.stopping = threading.Event()
        #: what stopped the engine (never set here: each generation's error is its own; see Scheduler.failure)
        self.failure: Exception | None = None

    def submit(self, job: Callable[[], None]) -> Future:
        """Queue ``job``; :class:`ServerBusyError` when ``workers + queue`` jobs are already in."""
        with self._lock:
            if self._admitted >= self.workers + self.queue:
                raise ServerBusyError(f"the server is busy: {self.workers} generations running and {self.queue} "
                                      "waiting; retry shortly")
            self._admitted += 1
        try:
            return self._pool.submit(self._run, job)
        except RuntimeError:  # the pool is shut down: the server is stopping
            self._release()
            raise ServerBusyError("the server is stopping") from None

    def start(self, job: Any) -> None:
        """Run a generation job (:class:`~lorablocks.serving.scheduler.Job` with a ``run()`` of its own) on a
        thread of its own: the path without batching."""
        self.submit(job.run)

    def _run(self, job: Callable[[], None]) -> None:
        try:
            job()
        finally:
            self._release()

    def _release(self) -> None:
        with self._lock:
            self._admitted -= 1

    def shutdown(self) -> None:
        """Stop: running generations end at their next token, queued ones as soon as they start."""
        self.stopping.set()
        self._pool.shutdown(wait=False)
