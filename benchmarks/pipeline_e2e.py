"""Text to image end to end on the GPU: the full-size Qwen-Image transformer (random weights) with a
small text encoder and VAE sized to it, 1024x1024, in BF16, FP8 and NVFP4, in one run.

    python benchmarks/pipeline_e2e.py --steps 20 --out benchmarks/results [--compile] [--cuda-graph]

With --compile the transformer's blocks are compiled (as `compile: true` does); with --cuda-graph each
format is timed twice in the same run: as loaded, then with the forward replayed from CUDA graphs
(`cuda_graph: true`).

Reports seconds per image, seconds per step and peak GPU memory per format; writes JSON and markdown.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

import qdit
from qdit.api import random_transformer
from qdit.compile import compile_blocks
from qdit.config import QditConfig
from qdit.cuda_graph import enable_cuda_graphs
from qdit.pipelines.tiny import components_around, pipeline_class


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="qwen-image")
    parser.add_argument("--formats", default="bf16,fp8,nvfp4")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks")
    parser.add_argument("--cuda-graph", action="store_true", help="also time each format with CUDA-graph replay")
    args = parser.parse_args()
    rows = []
    for fmt in args.formats.split(","):
        gc.collect()
        torch.cuda.empty_cache()
        transformer = random_transformer(args.model, full_size=True, device="cuda",
                                         quantize=None if fmt == "bf16" else fmt)
        parts = components_around(args.model, transformer)
        pipe = pipeline_class(args.model)(**parts)
        for name in ("text_encoder", "vae"):
            getattr(pipe, name).to("cuda", torch.bfloat16)
        config = QditConfig(quantize="none" if fmt == "bf16" else fmt, steps=args.steps, height=args.size,
                            width=args.size, seed=0)
        if args.compile:
            compile_blocks(pipe.transformer, fullgraph=fmt != "bf16", qdit_heuristics=fmt != "bf16")  # diffusers BF16 as the bench runs it
        for graphed in (False, True) if args.cuda_graph else (False,):
            if graphed:
                enable_cuda_graphs(pipe.transformer)
            start = time.perf_counter()
            qdit.generate(pipe, "a red circle", config=config.replace(steps=2), progress=False)  # warm-up
            warmup_s = time.perf_counter() - start
            result = qdit.generate(pipe, "a large red circle on the left", config=config, progress=False)
            row = {"format": fmt, "compiled": args.compile, "cuda_graph": graphed,
                   "seconds_per_image": round(result.seconds, 2), "seconds_per_step": round(result.seconds_per_step, 3),
                   "warmup_s": round(warmup_s, 1), "peak_gpu_gib": round(result.peak_gpu_bytes / 2**30, 2),
                   "transformer_layers": result.metadata["quantization"], "image_size": list(result.images[0].size)}
            print(json.dumps(row), flush=True)
            rows.append(row)
        del pipe, parts, transformer
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "command": "python " + " ".join(sys.argv),
            "model": args.model, "steps": args.steps, "size": args.size,
            "note": "full-size transformer with random weights; tiny random text encoder and VAE; no CFG"}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"pipeline-{args.model}-{args.size}" + ("-compiled" if args.compile else "")
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [f"# {args.model} text-to-image, {args.size}x{args.size}, {args.steps} steps, batch 1", "",
             f"GPU: {meta['gpu']}; torch {meta['torch']}. {meta['note']}.", f"Command: `{meta['command']}`", "",
             "| transformer | compiled | CUDA graph | s / image | s / step | warm-up s (2 steps) | peak GPU GiB |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['format']} | {r['compiled']} | {r['cuda_graph']} | {r['seconds_per_image']} | "
              f"{r['seconds_per_step']} | {r['warmup_s']} | {r['peak_gpu_gib']} |" for r in rows]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
