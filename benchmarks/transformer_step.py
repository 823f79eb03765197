"""One denoising step of a full-size DiT (random weights) on the GPU: qdit formats side by side with
diffusers BF16 (eager and compiled), all in one run, plus load time and weight memory per format.

    python benchmarks/transformer_step.py --model qwen-image --out benchmarks/results

Writes <out>/<model>-<height>-b<batch>.json and .md, naming the GPU, versions and command.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from pathlib import Path

import torch

import qdit
from qdit.api import random_transformer
from qdit.kernels import backend_by_name
from qdit.models import adapter_by_name
from qdit.quant.layer import QuantLinear


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def step_ms(model, inputs, adapter, iters: int) -> float:
    with torch.no_grad():
        for _ in range(2):
            adapter.output_tensor(model(**inputs))
        torch.cuda.synchronize()
        times = []
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            adapter.output_tensor(model(**inputs))
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def compile_blocks(model, adapter, fullgraph: bool) -> None:
    for attr in adapter.block_lists:
        for block in getattr(model, attr):
            block.compile(fullgraph=fullgraph)


def timed_compile(model, inputs, adapter, fullgraph: bool) -> float:
    compile_blocks(model, adapter, fullgraph)
    start = time.perf_counter()
    with torch.no_grad():
        adapter.output_tensor(model(**inputs))
    torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="qwen-image")
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--text-tokens", type=int, default=256)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--formats", default="bf16,fp8,fp8_per_channel,nvfp4")
    parser.add_argument("--compile", default="bf16,fp8,fp8_per_channel", help="formats also timed compiled")
    parser.add_argument("--reference-forward", default="fp8,nvfp4",
                        help="formats whose reference-backend forward is timed once (smoke test)")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()

    adapter = adapter_by_name(args.model)
    device = torch.device("cuda")
    rows = []
    for fmt in args.formats.split(","):
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        model = random_transformer(args.model, full_size=True, device=device,
                                   quantize=None if fmt == "bf16" else fmt)
        torch.cuda.synchronize()
        row = {"format": fmt, "load_s": round(time.perf_counter() - start, 2),
               "weight_gb": round(weight_bytes(model) / 1e9, 2),
               "backends": model.qdit_load_report.backends}
        inputs = adapter.example_inputs(dict(model.config), batch=args.batch, height=args.height, width=args.width,
                                        text_tokens=args.text_tokens, device=device)
        if fmt == "bf16" or any(b != "reference" for b in row["backends"]):
            row["eager_ms"] = round(step_ms(model, inputs, adapter, args.iters), 1)
        if fmt in args.reference_forward.split(","):
            fast = {m: m.backend for m in model.modules() if isinstance(m, QuantLinear)}
            for m in fast:
                m.backend = backend_by_name("reference")
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.no_grad():
                out = adapter.output_tensor(model(**inputs))
            torch.cuda.synchronize()
            row["reference_forward_s"] = round(time.perf_counter() - t0, 2)
            row["reference_output_finite"] = bool(torch.isfinite(out).all())
            for m, b in fast.items():
                m.backend = b
        if fmt in args.compile.split(","):
            row["compile_s"] = round(timed_compile(model, inputs, adapter, fullgraph=fmt != "bf16"), 1)
            row["compiled_ms"] = round(step_ms(model, inputs, adapter, args.iters), 1)
        row["peak_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
        print(json.dumps(row), flush=True)
        rows.append(row)
        del model, inputs

    base = next((r for r in rows if r["format"] == "bf16"), None)
    meta = {
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "qdit": qdit.__version__,
        "diffusers": __import__("diffusers").__version__, "python": platform.python_version(),
        "command": "python " + " ".join(sys.argv), "model": args.model, "height": args.height, "width": args.width,
        "batch": args.batch, "text_tokens": args.text_tokens, "weights": "random (seeded), full-size config",
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{args.model}-{args.height}x{args.width}-b{args.batch}"
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [f"# {args.model} transformer step, {args.height}x{args.width}, batch {args.batch}, "
             f"{args.text_tokens} text tokens", "",
             f"GPU: {meta['gpu']}; torch {meta['torch']}; diffusers {meta['diffusers']}; random weights.",
             f"Command: `{meta['command']}`", "",
             "| format | backends | load s | weights GB | eager ms | compiled ms | compile s | vs BF16 compiled | "
             "reference fwd s | peak GB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = ""
        if base and base.get("compiled_ms") and r.get("compiled_ms"):
            ratio = f"{r['compiled_ms'] / base['compiled_ms']:.2f}x"
        lines.append(f"| {r['format']} | {', '.join(f'{k}:{v}' for k, v in r['backends'].items()) or 'torch'} | "
                     f"{r['load_s']} | {r['weight_gb']} | {r.get('eager_ms', '')} | {r.get('compiled_ms', '')} | "
                     f"{r.get('compile_s', '')} | {ratio} | {r.get('reference_forward_s', '')} | {r['peak_gb']} |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
