"""lorablocks: LoRA adapters as building blocks (arXiv 2508.11985, "Naive LoRA Summation").

The math (:mod:`lorablocks.core.algebra`, :mod:`lorablocks.core.overlap`) is pure functions over factored deltas;
file formats, model merging, training, evaluation, the study and the CLI live in their own modules.
"""

from __future__ import annotations

__version__ = "0.1.0"
