"""Time to the first compiled step of a full-size transformer from a cold start: each format in its own
process with empty inductor and Triton caches, nothing run before the compiled step. `qdit bench`'s
compile_s is measured after the eager steps (qdit's own Triton kernels are then already built and tuned)
and in a process that may have compiled other formats; this is what a user's first run pays.

    python benchmarks/cold_start.py --model qwen-image --formats bf16,nvfp4_static+fp8attn --out FILE.md

Per format: load_s (random weights, quantized at load; `_static` formats calibrated, as in qdit bench),
first_step_s (compile_blocks, then the first step: dynamo, inductor, Triton builds and autotuning of every
kernel), second_step_ms (the next step, compiled, without a CUDA graph). The calibration of a `_static`
format runs one eager step, which builds qdit's own Triton kernels inside load_s: for those formats
load_s + first_step_s bounds the cold time (a ModelOpt export carries its scales and skips it).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def one_format(model_name: str, fmt: str, size: int) -> dict:
    import torch

    from qdit.bench import format_model
    from qdit.compile import compile_blocks
    from qdit.models import adapter_by_name

    adapter = adapter_by_name(model_name)
    start = time.perf_counter()
    model, inputs, peer = format_model(model_name, fmt, adapter, torch.device("cuda"), batch=1, height=size,
                                       width=size, text_tokens=adapter.bench_text_tokens)
    torch.cuda.synchronize()
    row = {"format": fmt, "load_s": round(time.perf_counter() - start, 1)}
    # Peers compile as diffusers users do (stock inductor, graph breaks allowed), as in qdit bench.
    compile_blocks(model, fullgraph=not peer, qdit_heuristics=not peer)
    times = []
    with torch.no_grad():
        for _ in range(2):
            start = time.perf_counter()
            adapter.output_tensor(model(**inputs))
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    row["first_step_s"] = round(times[0], 1)
    row["second_step_ms"] = round(times[1] * 1e3, 1)
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="qwen-image")
    parser.add_argument("--formats", default="bf16,fp8_static+fp8attn,nvfp4_static+fp8attn")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--out", required=True)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one format in this process
    args = parser.parse_args()
    if args.one:
        print("ROW " + json.dumps(one_format(args.model, args.one, args.size)), flush=True)
        return
    rows = []
    for fmt in args.formats.split(","):
        with tempfile.TemporaryDirectory() as inductor_cache, tempfile.TemporaryDirectory() as triton_cache:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": inductor_cache, "TRITON_CACHE_DIR": triton_cache}
            done = subprocess.run([sys.executable, __file__, "--model", args.model, "--size", str(args.size),
                                   "--one", fmt, "--out", args.out], env=env, capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("ROW ")]
        if done.returncode or not lines:
            raise SystemExit(f"{fmt}: exit {done.returncode}\n{done.stderr[-3000:]}")
        rows.append(json.loads(lines[-1][4:]))
        print(json.dumps(rows[-1]), flush=True)
    import torch

    table = [f"# Cold start, {args.model}, {args.size}x{args.size}, batch 1",
             "", f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}; each format in a fresh process with "
                 "empty TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR.",
             f"Command: `python benchmarks/cold_start.py {' '.join(sys.argv[1:])}`", "",
             "| format | load s | first compiled step s | second step ms |", "|---|---|---|---|"]
    table += [f"| {r['format']} | {r['load_s']} | {r['first_step_s']} | {r['second_step_ms']} |" for r in rows]
    with open(args.out, "w") as f:
        f.write("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
