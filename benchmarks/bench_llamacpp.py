#!/usr/bin/env python
"""Exported blocks in a real llama.cpp vs our merged model in transformers (issue 16), not in CI.

Two random LoRA blocks on the default model (SmolLM2-135M, Llama architecture), with non-zero A and B and
different conventions so that the alpha handling is exercised: block A ``r=8, lora_alpha=16`` on
q,k,v,o,down; block B ``r=4, lora_alpha=8, use_rslora`` with ``rank_pattern`` (q_proj at r=2) on
q,k,v,o,gate,up,down. Their composition ``w1 A + w2 B`` (``w1=0.7, w2=0.5``) is written by ``combine``
(rank ``concat``, exact) and exported, and so are A and B on their own and the merged full model.

llama.cpp side: ``llama-cpp-cffi==0.4.42`` (a llama.cpp build of April 2025, wheel for glibc 2.34; it pins
transformers < 5, so it lives in its own venv, ``--llama-venv``, default ``/tmp/llamacpp-venv``, made on the
first run with ``pip install --no-deps llama-cpp-cffi==0.4.42 cffi numpy``). Its C++ library was built with
GCC 14's libstdc++, which exports ``__cxa_call_terminate`` (called only when an exception leaves a
``noexcept`` function); this machine's GCC 12 libstdc++ lacks it, so a 3-line shim that defines it is
compiled with g++ and preloaded. The llama.cpp process gets token ids (ours, so tokenisation cannot
differ), decodes them one at a time and writes every position's logits to ``.npy``.

Compared, per position of a dozen prompts (next-token distributions, float64 softmax), on two bases:
the original Q4_1 GGUF, and the same file with every tensor dequantised to f32 (the very weights the
transformers side loads, so that on it any disagreement is the export's, not quantisation's):

* the base alone (on Q4_1: the floor, what 4-bit weights and llama.cpp's 8-bit activation quantisation
  in Q4_1 dot products explain);
* + exported block A at scale 1, vs transformers with A merged;
* + exported composition ``0.7 A + 0.5 B``, vs transformers with the composition merged;
* + A at scale 0.7 and B at 0.5 (two llama.cpp adapters: its per-adapter scales), vs the same;
* + A exported without the Q/K row reorder: a control, to show that the comparison catches it;
* and the exported merged full model (f32 GGUF) alone.

Metrics: top-1 agreement, mean and max KL(transformers || llama.cpp) in nats, and where top-1 differs the
logit gap between the two choices (a near-tie or not); the blocks' own effect (KL(merged || base) in
transformers) is printed beside them so that agreement is not trivially the base's. Floors (exit 0):
on the f32 base every export agrees to KL < 1e-4 with top-1 flips only at logit gaps < 0.01 and the
control is > 100x worse; on the Q4_1 base every export is within 1.5x the floor's KL + 0.01 nats;
the merged f32 model agrees like the f32 adapters; A's effect is > 10x its disagreement on Q4_1.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_llamacpp.py
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SHIM = """#include <exception>
extern "C" void* __cxa_begin_catch(void*) noexcept;
extern "C" [[noreturn]] void __cxa_call_terminate(void* e) noexcept { if (e) __cxa_begin_catch(e); std::terminate(); }
"""

PROMPTS = [
    "Question: What is seven times eight?\nAnswer:",
    "The patient presented with a persistent cough and",
    "def fibonacci(n):\n    if n < 2:\n        return",
    "Interest rates rose sharply last quarter, so the bond market",
    "The mitochondria is the powerhouse of the cell because",
    "Once upon a time, in a small village by the sea,",
    "To solve 3x + 5 = 20, first subtract five from both sides, which gives",
    "Symptoms of type 2 diabetes include increased thirst,",
    "SELECT name, salary FROM employees WHERE",
    "A company's balance sheet lists its assets, liabilities and",
    "The capital of France is Paris, and the capital of Italy is",
    "Photosynthesis converts light energy into",
]


# --- the llama.cpp side (runs in the llama venv: json, numpy and cffi only) ------------------------------


def _llama_lib(site: str):
    import importlib
    import types

    pkg = types.ModuleType("llama")  # the package's __init__ imports transformers; only the C library is needed
    pkg.__path__ = [os.path.join(site, "llama")]
    sys.modules["llama"] = pkg
    mod = importlib.import_module("llama._llama_cpp_cpu")
    return mod.lib, mod.ffi


def llama_side(job_path: str) -> None:
    """Run every job of ``job_path`` in llama.cpp: load the model, attach adapters at scales, write logits."""
    import numpy as np

    job = json.loads(Path(job_path).read_text())
    lib, ffi = _llama_lib(job["site"])

    @ffi.def_extern()
    def llama_cpp_cffi_ggml_log_callback(level, text, user_data):  # noqa: ARG001 - llama.cpp's log, dropped
        return None

    lib.llama_log_set(lib.llama_cpp_cffi_ggml_log_callback, ffi.NULL)
    lib.llama_backend_init()
    for run in job["runs"]:
        mparams = lib.llama_model_default_params()
        model = lib.llama_model_load_from_file(run["model"].encode(), mparams)
        assert model != ffi.NULL, f"llama.cpp could not load {run['model']}"
        cparams = lib.llama_context_default_params()
        cparams.n_ctx, cparams.n_batch, cparams.n_threads, cparams.n_threads_batch = 256, 256, 1, 1
        ctx = lib.llama_init_from_model(model, cparams)
        adapters = []
        for path, scale in run["adapters"]:
            adapter = lib.llama_adapter_lora_init(model, path.encode())
            assert adapter != ffi.NULL, f"llama.cpp refused the adapter {path}"
            assert lib.llama_set_adapter_lora(ctx, adapter, float(scale)) == 0
            adapters.append(adapter)
        n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(model))
        out = []
        for ids in job["prompts"]:
            lib.llama_kv_self_clear(ctx)
            rows = []
            for tok in ids:
                buf = ffi.new("int32_t[1]", [tok])
                assert lib.llama_decode(ctx, lib.llama_batch_get_one(buf, 1)) == 0
                logits = lib.llama_get_logits_ith(ctx, -1)
                rows.append(np.frombuffer(ffi.buffer(logits, 4 * n_vocab), dtype=np.float32).copy())
            out.append(np.stack(rows))
        np.save(run["out"], np.concatenate(out))
        lib.llama_free(ctx)
        for adapter in adapters:
            lib.llama_adapter_lora_free(adapter)
        lib.llama_model_free(model)
        print(f"llama.cpp: {run['name']} done", flush=True)


# --- setup --------------------------------------------------------------------------------------------------


def ensure_llama_venv(venv: Path, work: Path) -> tuple[Path, str, Path]:
    """The llama venv's python, its site-packages and the compiled shim (made when missing)."""
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"making {venv} (pip install --no-deps llama-cpp-cffi==0.4.42 cffi numpy)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "llama-cpp-cffi==0.4.42", "cffi",
                        "numpy"], check=True)
    site = glob.glob(str(venv / "lib" / "python3*" / "site-packages"))[0]
    shim = work / "libcxa_shim.so"
    (work / "shim.cc").write_text(SHIM)
    subprocess.run(["g++", "-shared", "-fPIC", "-O2", "-o", str(shim), str(work / "shim.cc")], check=True)
    return python, site, shim


def random_block(model, out: Path, seed: int, std: float, **lora) -> Path:
    """A PEFT adapter on ``model`` with random non-zero A and B (``std`` each), saved to ``out``."""
    import torch
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(lora_dropout=0.0, **lora))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    peft_model.save_pretrained(out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "smollm2-135m"
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    peft_model.unload()  # the base model back without LoRA layers
    return out


# --- the transformers side and the comparison -------------------------------------------------------------


def hf_logits(model, prompts: list[list[int]], delta=None):
    """Every position's logits (float64) of ``model`` with ``delta`` merged for the time of the call."""
    import contextlib

    import torch

    from lorablocks.model.merge import merged

    rows = []
    with torch.no_grad(), (merged(model, delta) if delta else contextlib.nullcontext()):
        for ids in prompts:
            rows.append(model(torch.tensor([ids])).logits[0].double())
    return torch.cat(rows)


def compare(p_logits, q_logits) -> dict[str, float]:
    """Top-1 agreement and mean KL(p || q) (nats) of two sets of next-token logits."""
    import torch

    p, q = torch.as_tensor(p_logits).double(), torch.as_tensor(q_logits).double()
    lp, lq = torch.log_softmax(p, -1), torch.log_softmax(q, -1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    differ = p.argmax(-1) != q.argmax(-1)
    # where the top-1 differs: how far apart the two candidates are in the first distribution (a near-tie?)
    gap = (p.gather(-1, p.argmax(-1, keepdim=True)) - p.gather(-1, q.argmax(-1, keepdim=True)))[differ]
    return {"top1": float((~differ).double().mean()), "kl": float(kl.mean()), "kl_max": float(kl.max()),
            "max_flip_gap": float(gap.max()) if gap.numel() else 0.0}


def make_blocks(work: Path, w1: float, w2: float) -> dict[str, Path]:
    from lorablocks.compose import operations
    from lorablocks.model.models import load_model

    targets_a = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]
    targets_b = targets_a + ["gate_proj", "up_proj"]
    a = random_block(load_model()[0], work / "block_a", 1, 0.045, r=8, lora_alpha=16, target_modules=targets_a)
    b = random_block(load_model()[0], work / "block_b", 2, 0.06, r=4, lora_alpha=8, use_rslora=True,
                     rank_pattern={"q_proj": 2}, target_modules=targets_b)
    ab = work / "block_ab"
    operations.combine_files([a, b], ab, operations.CombineRequest(weights=[w1, w2], rank="concat"))
    return {"a": a, "b": b, "ab": ab}


def dequantised_gguf(src: str, out: Path) -> Path:
    """The original GGUF with every tensor dequantised to f32 (the weights transformers loads), same metadata."""
    import gguf
    import numpy as np

    from lorablocks.files.export_gguf import _copy_metadata

    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(str(out), "llama")
    _copy_metadata(reader, writer)
    writer.add_file_type(int(gguf.LlamaFileType.ALL_F32))
    for t in reader.tensors:
        writer.add_tensor(t.name, np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def export_all(blocks: dict[str, Path], work: Path) -> dict[str, Path]:
    from lorablocks.files.export_gguf import export_adapter_gguf, export_model_gguf

    files = {}
    for name, folder in blocks.items():
        files[name] = export_adapter_gguf(folder, work / f"{name}.gguf", model="smollm2-135m").path
    from lorablocks.files import llama_gguf

    keep = llama_gguf.LlamaLayout.to_gguf_rows
    llama_gguf.LlamaLayout.to_gguf_rows = lambda self, name, w: w  # control: q/k lora_b left in transformers' order
    try:
        files["a_no_reorder"] = export_adapter_gguf(blocks["a"], work / "a_no_reorder.gguf", model="smollm2-135m").path
    finally:
        llama_gguf.LlamaLayout.to_gguf_rows = keep
    files["ab_model"] = export_model_gguf(blocks["ab"], work / "ab_model.gguf", model="smollm2-135m",
                                          outtype="f32").path
    return files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-side", help=argparse.SUPPRESS)
    parser.add_argument("--llama-venv", default="/tmp/llamacpp-venv")
    parser.add_argument("--w1", type=float, default=0.7)
    parser.add_argument("--w2", type=float, default=0.5)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.llama_side:
        llama_side(args.llama_side)
        return 0
    import torch

    from lorablocks.files.adapters import load_adapter
    from lorablocks.model.models import BUILTIN_MODELS, DEFAULT_MODEL, _gguf_location, load_model

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="bench-llamacpp-"))
    python, site, shim = ensure_llama_venv(Path(args.llama_venv), work)
    base_gguf = str(_gguf_location(BUILTIN_MODELS[DEFAULT_MODEL]))
    model, tok = load_model()
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    blocks = make_blocks(work, args.w1, args.w2)
    files = export_all(blocks, work)
    f32 = str(dequantised_gguf(base_gguf, work / "base_f32.gguf"))
    runs = {}
    for tag, base in (("q4", base_gguf), ("f32", f32)):
        runs.update({f"{tag}_base": (base, []), f"{tag}_a": (base, [(files["a"], 1.0)]),
                     f"{tag}_ab": (base, [(files["ab"], 1.0)]),
                     f"{tag}_a_b_scaled": (base, [(files["a"], args.w1), (files["b"], args.w2)]),
                     f"{tag}_a_no_reorder": (base, [(files["a_no_reorder"], 1.0)])})
    runs["ab_model_f32"] = (str(files["ab_model"]), [])
    job = {"site": site, "prompts": prompts,
           "runs": [{"name": n, "model": m, "adapters": [(str(p), s) for p, s in ad], "out": str(work / f"{n}.npy")}
                    for n, (m, ad) in runs.items()]}
    (work / "job.json").write_text(json.dumps(job))
    env = {**os.environ, "LD_PRELOAD": str(shim), "OMP_NUM_THREADS": "1", "LLAMA_CPP_BACKEND": "cpu"}
    subprocess.run([str(python), __file__, "--llama-side", str(work / "job.json")], check=True, env=env)
    import numpy as np

    ll = {n: np.load(work / f"{n}.npy") for n in runs}
    da, dab = load_adapter(blocks["a"]).delta, load_adapter(blocks["ab"]).delta
    hf = {"base": hf_logits(model, prompts), "a": hf_logits(model, prompts, da), "ab": hf_logits(model, prompts, dab)}
    comp = f"{args.w1} A + {args.w2} B"
    rows = comparison_rows(hf, ll, comp, args)
    n_pos = sum(len(p) for p in prompts)
    print(f"\n{len(prompts)} prompts, {n_pos} positions; KL(first || second) in nats; flip gap: largest logit gap "
          "(first side) between the two top-1 choices where they differ")
    print(f"{'comparison':68s} {'top-1':>7s} {'mean KL':>10s} {'max KL':>10s} {'flip gap':>9s}")
    for name, r in rows.items():
        print(f"{name:68s} {r['top1']:7.1%} {r['kl']:10.6f} {r['kl_max']:10.6f} {r['max_flip_gap']:9.4f}")
    ok, why = verdict(rows, comp, args)
    print(f"\n{'PASS' if ok else 'FAIL'}: {why} (work folder {work})")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "positions": n_pos, "pass": ok}, indent=2))
    return 0 if ok else 1


def comparison_rows(hf: dict, ll: dict, comp: str, args) -> dict[str, dict[str, float]]:
    """Every comparison the docstring lists, by name."""
    rows = {}
    for tag, what in (("q4", "Q4_1 GGUF"), ("f32", "f32 GGUF")):
        rows.update({
            f"{what} base vs transformers base" + (" (the floor)" if tag == "q4" else ""): compare(hf["base"], ll[f"{tag}_base"]),
            f"{what} + block A (exported, scale 1)": compare(hf["a"], ll[f"{tag}_a"]),
            f"{what} + composition {comp} (exported)": compare(hf["ab"], ll[f"{tag}_ab"]),
            f"{what} + A at {args.w1} + B at {args.w2} (llama.cpp scales)": compare(hf["ab"], ll[f"{tag}_a_b_scaled"]),
            f"{what}: scaled pair vs exported composition (both llama.cpp)": compare(ll[f"{tag}_ab"], ll[f"{tag}_a_b_scaled"]),
            f"{what} + A without the Q/K reorder (control)": compare(hf["a"], ll[f"{tag}_a_no_reorder"]),
        })
    rows["merged model f32 GGUF (exported) vs transformers"] = compare(hf["ab"], ll["ab_model_f32"])
    rows["effect of A (transformers, merged vs base)"] = compare(hf["a"], hf["base"])
    rows[f"effect of {comp} (transformers)"] = compare(hf["ab"], hf["base"])
    return rows


def verdict(rows: dict, comp: str, args) -> tuple[bool, str]:
    """The floors: on the f32 base every export agrees to KL < 1e-4 (top-1 flips only at logit gaps < 0.01)
    and the control is > 100x worse; on the Q4_1 base every export is within 1.5x the floor + 0.01 nats;
    the f32 merged model agrees like the f32 adapters; A's effect is > 10x its Q4_1 disagreement."""
    exact = [f"f32 GGUF + block A (exported, scale 1)", f"f32 GGUF + composition {comp} (exported)",
             f"f32 GGUF + A at {args.w1} + B at {args.w2} (llama.cpp scales)", "merged model f32 GGUF (exported) vs transformers"]
    ok = all(rows[k]["kl"] < 1e-4 and rows[k]["max_flip_gap"] < 1e-2 for k in exact)
    ok = ok and rows["f32 GGUF + A without the Q/K reorder (control)"]["kl"] > 100 * rows[exact[0]]["kl"]
    floor = rows["Q4_1 GGUF base vs transformers base (the floor)"]["kl"]
    quant = [f"Q4_1 GGUF + block A (exported, scale 1)", f"Q4_1 GGUF + composition {comp} (exported)",
             f"Q4_1 GGUF + A at {args.w1} + B at {args.w2} (llama.cpp scales)"]
    ok = ok and all(rows[k]["kl"] <= 1.5 * floor + 0.01 for k in quant)
    ok = ok and rows["effect of A (transformers, merged vs base)"]["kl"] > 10 * rows[quant[0]]["kl"]
    return ok, ("f32 base: exports KL < 1e-4 (flips only at near-ties), control > 100x worse; Q4_1 base: within "
                "1.5 x floor + 0.01 nats; A's effect > 10 x its Q4_1 disagreement")


if __name__ == "__main__":
    sys.exit(main())
