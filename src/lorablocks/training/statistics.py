"""The input statistics a trained adapter carries: collected at the end of training, on its own inputs.

After the last step, :func:`training_statistics` runs the trained model (base + the new LoRA) over the first
training examples of each of its domains (``statistics_tokens`` in all, split evenly between domains) and
returns what :func:`~lorablocks.files.statistics.write_statistics` stores beside the adapter.
"""

from __future__ import annotations

from typing import Any

from lorablocks.files.statistics import STATS_NAME, write_statistics
from lorablocks.passes.statistics import budgeted, collect_grams

__all__ = ["write_training_statistics"]


def write_training_statistics(peft_model: Any, train_sets: list[Any], domains: list[Any], pad: int, folder: Any,
                              max_tokens: int, max_length: int, base_model: str) -> dict[str, Any]:
    """Collect and write ``folder/lorablocks_stats.safetensors`` (the adapter is already saved there: the
    statistics record its weights' sha256); their record (file, sha256, data)."""
    model = peft_model.get_base_model()  # module names as the adapter file keys them; the LoRA stays active
    modules = [n for n, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
    share = max(1, max_tokens // max(len(train_sets), 1))
    examples = [e for ts in train_sets for e in budgeted(ts.examples, share)]
    collected = collect_grams(model, modules, examples, pad)
    from lorablocks.files.adapters import WEIGHTS_NAME
    from lorablocks.files.outputs import sha256_file

    data = {"domains": [d.name for d in domains], "split": "train", "adapter_sha256": sha256_file(folder / WEIGHTS_NAME),
            "split_sha256": {d.name: d.fingerprint("train") for d in domains}, "examples": len(examples),
            "tokens": collected.tokens, "max_length": max_length, "max_tokens": max_tokens,
            "model": "the block's own (base + block), at the end of training"}
    stats = write_statistics(folder / STATS_NAME, collected.grams, collected.modules, base_model, data)
    return {"file": STATS_NAME, "sha256": stats.sha256, "data": data}
