"""Uncertainty of a perplexity change between two models scored on the same examples.

The study's own inference lives in :mod:`lorablocks.study.resample` (the design-shaped bootstrap) and
:mod:`lorablocks.study.inference` (fits, permutation tests, Holm); this module keeps the two-model change
that benchmarks use, computed by the same resampler.
"""

from __future__ import annotations

from lorablocks.study.resample import DEFAULT_RESAMPLES, Interval, paired_change

__all__ = ["Interval", "paired_change", "DEFAULT_RESAMPLES"]
