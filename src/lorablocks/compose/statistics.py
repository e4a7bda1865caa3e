"""Where a composition's input statistics come from: stored beside each block, or computed now.

``combine --method regmean`` with stored statistics needs no model and no data (the adapter file source
carries them: :attr:`~lorablocks.files.adapters.AdapterFile.statistics`). For blocks without them,
:func:`statistics_now` loads the model once and collects them on one domain per block
(:mod:`lorablocks.passes.statistics`), in memory. :func:`write_block_statistics` is ``lorablocks stats``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lorablocks.errors import ConfigError, OutputExistsError
from lorablocks.files.statistics import STATS_NAME, BlockStatistics, write_statistics

__all__ = ["shapes_of", "statistics_now", "write_block_statistics"]


def shapes_of(source: Any) -> dict[str, tuple[int, int]]:
    """``(out, in)`` per module of a delta source (an adapter file's header, or factors in memory)."""
    shapes = getattr(source, "shapes", None)
    if shapes is not None:
        return dict(shapes)
    return {m: source.factors(m).shape for m in source.modules}


def _collect(session: Any, file: Any, domain: Any, settings: Any) -> Any:
    """The statistics of one opened adapter ``file`` on ``domain``, with the block applied to the model."""
    from lorablocks.passes.statistics import block_statistics

    delta = session.load_blocks([file])[0]
    with session.composed(delta):
        return block_statistics(session.model, session.tokenizer, file.modules, domain, settings,
                                session.model_id, adapter_sha256=file.sha256)


def statistics_now(files: Sequence[Any], data: Sequence[str], model: str, *, settings: Any = None,
                   cache_dir: str | os.PathLike | None = None, session: Any = None) -> list[BlockStatistics]:
    """Each block's statistics: stored ones as they are, the others collected now on ``data[i]`` (one domain
    per block, in order) with ``model`` (loaded only if some block lacks statistics)."""
    from lorablocks.model.session import ComposedModel
    from lorablocks.passes.statistics import StatsSettings
    from lorablocks.training.data import resolve_domains

    if len(data) != len(files):
        raise ConfigError(f"{len(data)} data domains for {len(files)} adapters: give one domain per adapter, in "
                          "the same order", setting="data")
    missing = [i for i, f in enumerate(files) if f.statistics is None]
    out: list[Any] = [f.statistics for f in files]
    if missing:
        domains = resolve_domains([data[i] for i in missing])
        session = session or ComposedModel.load(model, cache_dir=cache_dir)
        settings = settings or StatsSettings(split="validation")
        for i, domain in zip(missing, domains):
            out[i] = _collect(session, files[i], domain, settings).statistics(session.model_id)
    return out


def write_block_statistics(adapter: str | os.PathLike, model: str, data: str, *, settings: Any = None,
                           force: bool = False, cache_dir: str | os.PathLike | None = None) -> BlockStatistics:
    """``lorablocks stats``: collect an adapter's statistics on ``data`` and write them beside it.

    Any PEFT adapter folder may receive them (the file is new; nothing else in the folder is touched); an
    existing statistics file is replaced only with ``force``, and only if lorablocks wrote it."""
    from lorablocks.compose.operations import open_blocks
    from lorablocks.model.session import ComposedModel
    from lorablocks.passes.statistics import StatsSettings
    from lorablocks.training.data import resolve_domains

    file = open_blocks([adapter])[0]
    target = Path(adapter) / STATS_NAME
    if target.exists() and not force:
        raise OutputExistsError(f"{target} exists; pass --force to collect the statistics again")
    domain = resolve_domains([data])[0]
    settings = settings or StatsSettings()
    domain.load(settings.split, 1)  # a missing split is reported before the model is loaded
    session = ComposedModel.load(model, cache_dir=cache_dir)
    session.check_base_model([(str(file.path), file.base_model)])
    collected = _collect(session, file, domain, settings)
    return write_statistics(target, collected.grams, collected.modules, session.model_id, collected.data, force=force)
