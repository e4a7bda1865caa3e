"""The batch schedule of a training run: a pure function of the seed and the step (see :mod:`.train`)."""

from __future__ import annotations

import random
from collections.abc import Sequence

from lorablocks.training.data import TokenizedExample, bucket_window

__all__ = ["batch_schedule"]


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
