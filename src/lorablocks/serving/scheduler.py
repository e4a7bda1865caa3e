"""Continuous batching: one thread owns the model and decodes every running generation together.

Between two decoding steps the :class:`Scheduler` lets requests join (each prompt is prefilled alone, and its
KV cache joins the batch's, left-padded to one length) and leave (EOS, a stop string, its length, a client
gone, the server stopping). A step feeds every running sequence its last token at once, with an attention
mask that hides the padding and each sequence's own position ids, so a sequence's logits are those it gets
alone up to float round-off (greedy tokens are the same); each picks its next token by its own sampling
settings and generator (:class:`~lorablocks.serving.generation.Decoding`).

Each decoding thread (a *lane*; one by default) holds the composition's read lock for one iteration (prefills
and one step), never across steps, and admits no more prefills once a change waits: a change of composition
waits for at most one step and applies between two. The weights are merged in place,
so a generation cannot go on on the weights it started with: every running one is cut, its last chunk's
``finish_reason`` is ``composition_changed``, and all of its tokens came from the composition whose fingerprint
it reported at its start. Requests that were waiting start on the new composition. Rows that run a per-request
composition (:mod:`lorablocks.serving.unmerged`) add its factors minus the default's and are not cut: their weights
do not depend on the default.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from transformers.cache_utils import DynamicLayer

from lorablocks.errors import one_line
from lorablocks.serving.errors import ServerBusyError
from lorablocks.serving.generation import Decoding, SamplingParams, cache_argument, cache_of, eos_token_ids
from lorablocks.serving.live import LiveModel
from lorablocks.serving.unmerged import RowHooks

__all__ = ["CUT_BY_CHANGE", "Job", "BatchCache", "Scheduler"]

#: ``finish_reason`` of a generation cut by a change of composition
CUT_BY_CHANGE = "composition_changed"


class Job(Protocol):
    """A generation as the scheduler sees it: its prompt, settings, a cancel flag and where its events go:
    ``("start", fingerprint)``, ``("chunk", Chunk)``, ``("error", exception)``, then always ``("end", None)``."""

    ids: list[int]
    params: SamplingParams
    cancelled: threading.Event
    #: a per-request composition (:class:`~lorablocks.serving.unmerged.RowComposition`) or ``None``: the default
    composition: Any

    def put(self, kind: str, value: Any = None) -> None: ...


class BatchCache:
    """The KV cache of sequences of different lengths, left-padded to one length ``T``.

    ``mask`` ``[B, T]`` is 1 where a sequence has a token; ``lengths[b]`` is how many it has (its next
    token's position). Joining pads the shorter side on the left; leaving drops rows, then the columns that
    are padding in every row that is left.
    """

    def __init__(self) -> None:
        self.cache: Any = None
        self.mask: torch.Tensor | None = None
        self.lengths: list[int] = []

    @staticmethod
    def batchable(cache: Any) -> bool:
        """Whether a prefill's cache can join a batch: every layer a plain growing (not sliding) one."""
        layers = getattr(cache, "layers", None)
        return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)

    def join(self, cache: Any, length: int) -> None:
        """Add one sequence of ``length`` tokens whose (batch-1) ``cache`` holds exactly them."""
        device = cache.layers[0].keys.device
        mask = torch.ones(1, length, dtype=torch.long, device=device)
        if self.cache is None:
            # plain growing layers append in place; any other kind (a sliding window) stays as it is
            cache.layers[:] = [_GrowingLayer.of(layer) if type(layer) is DynamicLayer else layer
                               for layer in cache.layers]
            self.cache, self.mask, self.lengths = cache, mask, [length]
            return
        width = max(self.mask.shape[1], length)
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([_left_pad(mine.keys, width), _left_pad(theirs.keys, width)])
            mine.values = torch.cat([_left_pad(mine.values, width), _left_pad(theirs.values, width)])
        self.mask = torch.cat([_left_pad(self.mask, width), _left_pad(mask, width)])
        self.lengths.append(length)

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in that order); an empty list empties the batch."""
        if not rows:
            self.cache, self.mask, self.lengths = None, None, []
            return
        index = torch.tensor(rows, device=self.mask.device)
        self.lengths = [self.lengths[r] for r in rows]
        trim = self.mask.shape[1] - max(self.lengths)  # columns of padding in every row that is left
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[..., trim:, :]
            layer.values = layer.values.index_select(0, index)[..., trim:, :]
        self.mask = self.mask.index_select(0, index)[:, trim:]

    def step_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(attention_mask [B, T + 1], position_ids [B, 1])`` of one new token per sequence; the mask becomes
        the batch's and every length grows by one (the forward appends to the cache)."""
        assert self.mask is not None
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        positions = torch.tensor([[n] for n in self.lengths], device=self.mask.device)
        self.lengths = [n + 1 for n in self.lengths]
        return self.mask, positions


class _GrowingLayer(DynamicLayer):
    """A growing KV-cache layer that appends into spare room instead of copying the whole cache at every step
    (``DynamicLayer`` concatenates). ``keys``/``values`` are views of the first ``n`` positions of larger
    buffers; anything that assigns them new tensors (the batch joining or leaving) is adopted at the next
    update, with one copy. The same values as ``DynamicLayer``; a few per cent off a step of 8-16 rows
    (``benchmarks/bench_decode_step.py``)."""

    @classmethod
    def of(cls, layer: DynamicLayer) -> _GrowingLayer:
        grown = cls()
        grown.__dict__.update(layer.__dict__)
        grown.room, grown.view = None, None
        return grown

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, new = self.get_seq_length(), key_states.shape[-2]
        if self.room is None or self.keys is not self.view or n + new > self.room[0].shape[-2]:
            self.room = self._grow(n, n + new, key_states, value_states)
        keys, values = self.room
        keys[..., n:n + new, :].copy_(key_states)
        values[..., n:n + new, :].copy_(value_states)
        self.keys, self.values = keys[..., :n + new, :], values[..., :n + new, :]
        self.view = self.keys
        return self.keys, self.values

    def _grow(self, n: int, length: int, keys: torch.Tensor,
              values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Buffers with room for ``length`` and half as much again (at least 64 more), holding the first ``n``."""
        capacity = length + max(64, length // 2)
        out = []
        for old, like in ((self.keys, keys), (self.values, values)):
            buffer = like.new_empty(*like.shape[:-2], capacity, like.shape[-1])
            if n:
                buffer[..., :n, :].copy_(old)
            out.append(buffer)
        return out[0], out[1]


def _left_pad(x: torch.Tensor, width: int) -> torch.Tensor:
    """``x`` (``[B, ..., T, D]`` for keys and values, ``[B, T]`` for a mask) padded with zeros on the left of
    its sequence axis to ``width``."""
    missing = width - (x.shape[-2] if x.dim() == 4 else x.shape[-1])
    if missing <= 0:
        return x
    pad = (0, 0, missing, 0) if x.dim() == 4 else (missing, 0)
    return torch.nn.functional.pad(x, pad)


@dataclass
class _Row:
    """A running generation: its job, its decoding state, the token to feed next and its fingerprint."""

    job: Job
    decoding: Decoding
    token: int
    fingerprint: str
    composition: Any = None
    done: bool = field(default=False)


class Scheduler:
    """Decodes up to ``max_batch`` generations together; at most ``queue`` more wait (beyond:
    :class:`ServerBusyError`, a 503). The same interface as :class:`~lorablocks.serving.live.Runner`.

    ``lanes`` threads each decode a batch of their own (up to ``ceil(max_batch / lanes)`` rows; the least
    loaded lane takes the next waiting request), each forward on one intra-op thread as the thread-per-generation
    path runs them. ``serve`` uses one: two measured slower than one on this project's 2-core machine
    (``benchmarks/bench_serving.py --parts batching``).
    """

    def __init__(self, live: LiveModel, max_batch: int = 16, queue: int = 32, lanes: int = 1) -> None:
        self.live, self.max_batch, self.queue = live, max(1, max_batch), max(0, queue)
        self.workers = self.max_batch  # generations run at once, as the Runner names it
        self.stopping = threading.Event()
        #: the error that stopped a decoding thread (then every new generation is refused with it)
        self.failure: Exception | None = None
        self._cond = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self._admitted = 0
        model = live.composed.model
        self._eos = eos_token_ids(model, live.composed.tokenizer)
        self._cache_arg, self._extra = cache_argument(model)
        #: adds per-request compositions' factors to their rows (:mod:`lorablocks.serving.unmerged`)
        self.row_hooks = RowHooks(model)
        lanes = max(1, min(lanes, self.max_batch))
        self._lanes = [_Lane(self, -(-self.max_batch // lanes)) for _ in range(lanes)]
        for i, lane in enumerate(self._lanes):
            threading.Thread(target=lane.loop, name=f"lorablocks-scheduler-{i}", daemon=True).start()

    def start(self, job: Job) -> None:
        """Queue ``job``; :class:`ServerBusyError` when ``max_batch + queue`` are already in."""
        with self._cond:
            if self.failure is not None:
                raise RuntimeError(f"the scheduler stopped on an internal error: {type(self.failure).__name__}: "
                                   f"{one_line(self.failure)}")
            if self.stopping.is_set():
                raise ServerBusyError("the server is stopping")
            if self._admitted >= self.max_batch + self.queue:
                raise ServerBusyError(f"the server is busy: {self.max_batch} generations running and {self.queue} "
                                      "waiting; retry shortly")
            self._admitted += 1
            self._waiting.append(job)
            self._cond.notify_all()

    def shutdown(self) -> None:
        """Stop: running generations end at the next step, waiting ones without starting."""
        with self._cond:
            self.stopping.set()
            self._cond.notify_all()

    def _take(self, lane: _Lane) -> Job | None:
        """The next waiting job for ``lane``, if it has room and no other lane has fewer rows."""
        if lane.rows and self.live.lock.writer_waiting():  # a change waits: one step, then it applies
            return None
        with self._cond:
            room = lane.cap if lane.batchable else 1
            if not self._waiting or len(lane.rows) >= room or len(lane.rows) > min(len(x.rows) for x in self._lanes):
                return None
            return self._waiting.popleft()

    def _end(self, job: Job) -> None:
        job.put("end")
        with self._cond:
            self._admitted -= 1

    def _end_waiting(self, error: Exception | None = None) -> None:
        """End every job still waiting (told ``error`` first, if any), without starting it."""
        with self._cond:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for job in waiting:
            if error is not None:
                job.put("error", error)
            self._end(job)


class _Lane:
    """One decoding thread and its batch: rows join and leave between its steps."""

    def __init__(self, owner: Scheduler, cap: int) -> None:
        self.owner, self.cap = owner, cap
        self.rows: list[_Row] = []
        self.batch = BatchCache()
        self.batchable = True  # until a prefill's cache says otherwise (sliding-window layers: one at a time)

    def loop(self) -> None:
        """Decode until the server stops; a bug that escapes ends every generation with its error (none hangs)
        and the scheduler refuses new ones."""
        try:
            self._serve()
        except Exception as exc:  # noqa: BLE001 - told to every client, in one line
            self.owner.failure = exc
            for row in self.rows:  # done rows that are still here have not ended yet
                if not row.done:
                    row.job.put("error", exc)
                self.owner._end(row.job)
            self.rows, self.batch = [], BatchCache()
            self.owner._end_waiting(exc)

    def _serve(self) -> None:
        owner = self.owner
        while True:
            with owner._cond:
                while not (owner._waiting or self.rows or owner.stopping.is_set()):
                    owner._cond.wait()
            if owner.stopping.is_set():
                self._stop_all()
                return
            with owner.live.reading() as fingerprint:
                self._leave(lambda row: row.composition is None and row.fingerprint != fingerprint, CUT_BY_CHANGE)
                self._leave(lambda row: row.job.cancelled.is_set(), "length")
                self._admit(fingerprint)
                if self.rows:
                    self._step()
                elif owner._waiting:  # another lane's turn: do not spin on the lock
                    time.sleep(0.001)

    def _stop_all(self) -> None:
        self._leave(lambda row: True, "length")
        self.owner._end_waiting()

    def _leave(self, cut: Any, reason: str) -> None:
        """Rows that are done, or that ``cut(row)`` ends (their last chunk says ``reason``), leave the batch."""
        for row in self.rows:
            if not row.done and cut(row):
                try:
                    row.job.put("chunk", row.decoding.cut(reason))
                except Exception as exc:  # noqa: BLE001 - the text held back does not decode: this row's error
                    row.job.put("error", exc)
                row.done = True
        kept = [i for i, row in enumerate(self.rows) if not row.done]
        if len(kept) < len(self.rows):
            for row in self.rows:
                if row.done:
                    self.owner._end(row.job)
            self.rows = [self.rows[i] for i in kept]
            self.batch.keep(kept)

    def _admit(self, fingerprint: str) -> None:
        """Prefill waiting jobs (one at a time) while the lane has room; each joins with its first token."""
        while (job := self.owner._take(self)) is not None:
            if job.cancelled.is_set():
                self.owner._end(job)
                continue
            try:
                self._prefill(job, fingerprint)
            except Exception as exc:  # reported to that client as one line; the batch goes on
                job.put("error", exc)
                self.owner._end(job)

    @torch.no_grad()
    def _prefill(self, job: Job, fingerprint: str) -> None:
        owner, model = self.owner, self.owner.live.composed.model
        decoding = Decoding(owner.live.composed.tokenizer, job.params, owner._eos)
        inputs = torch.tensor([list(job.ids)], device=next(model.parameters()).device)
        composition = getattr(job, "composition", None)
        groups = [] if composition is None else [(None, composition.factors(owner.live.composed.delta,
                                                                            owner.live.composed.dtype))]
        with owner.row_hooks.rows(groups):
            out = model(input_ids=inputs, use_cache=True, **{owner._cache_arg: None}, **owner._extra)
        if composition is not None:
            fingerprint = composition.fingerprint
        job.put("start", fingerprint)
        token, chunk = decoding.step(out.logits[0, -1])
        if chunk is not None:
            job.put("chunk", chunk)
        if chunk is not None and chunk.finish_reason:
            owner._end(job)
            return
        cache = cache_of(out)
        if not BatchCache.batchable(cache):
            self.batchable = False
            if self.rows:  # never join a cache that cannot be batched
                raise RuntimeError("this model's KV cache cannot be batched")
        self.batch.join(cache, len(job.ids))
        self.rows.append(_Row(job, decoding, token, fingerprint, composition))

    @torch.no_grad()
    def _step(self) -> None:
        """One token for every running row; a failing forward ends them all with its error."""
        owner = self.owner
        try:
            mask, positions = self.batch.step_inputs()
            tokens = torch.tensor([[row.token] for row in self.rows], device=mask.device)
            with owner.row_hooks.rows(self._groups(mask.device)):
                out = owner.live.composed.model(input_ids=tokens, attention_mask=mask, position_ids=positions,
                                                use_cache=True, **{owner._cache_arg: self.batch.cache}, **owner._extra)
        except Exception as exc:  # noqa: BLE001 - every running client is told, in one line
            for row in self.rows:
                row.job.put("error", exc)
                row.done = True
            self._leave(lambda row: False, "length")
            return
        for i, row in enumerate(self.rows):
            try:
                row.token, chunk = row.decoding.step(out.logits[i, -1])
            except Exception as exc:  # noqa: BLE001 - this row's token or text (its tokenizer): it alone ends
                row.job.put("error", exc)
                row.done = True
                continue
            if chunk is not None:
                row.job.put("chunk", chunk)
                row.done = chunk.finish_reason is not None
        self._leave(lambda row: False, "length")

    def _groups(self, device: torch.device) -> list[tuple[torch.Tensor, Any]]:
        """The rows of each per-request composition in the batch and its factors against the merged default."""
        rows: dict[int, list[int]] = {}
        held: dict[int, Any] = {}
        for i, row in enumerate(self.rows):
            if row.composition is not None:
                rows.setdefault(id(row.composition), []).append(i)
                held[id(row.composition)] = row.composition
        default, dtype = self.owner.live.composed.delta, self.owner.live.composed.dtype
        return [(torch.tensor(r, device=device), held[k].factors(default, dtype)) for k, r in rows.items()]
