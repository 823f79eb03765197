"""`qdit bench`: one denoising step of a full-size DiT (random weights) on the GPU, qdit's formats side
by side with diffusers BF16 (eager and compiled) in one run, plus load time and weight memory.

    qdit bench --model qwen-image --batches 1,2 --resolutions 1024,1328 --out benchmarks/results

Writes <out>/<model>-<H>x<W>-b<batch>.json and .md per (batch, resolution), naming the GPU, versions
and command. Peers: diffusers' own BF16 model (eager, compiled blocks, compiled + one CUDA graph) and,
as format `torchao_fp8`, that model with torchao's FP8 per-row dynamic quantization on the same Linears
qdit quantizes. Each row also times the conditioning-only Linears (timestep modulation) on their own.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import sys
import time
from pathlib import Path

import torch

import qdit
from qdit.api import random_transformer
from qdit.compile import compile_blocks
from qdit.kernels import backend_by_name
from qdit.models import adapter_by_name
from qdit.quant.calibration import calibrate_static_input_scales
from qdit.quant.layer import QuantLinear
from qdit.quant.storage import weight_bytes


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


def replay_ms(fn, iters: int) -> float:
    """Median time of `fn` captured in one CUDA graph (no host launch overhead)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    times = []
    for _ in range(iters + 2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    del graph
    times = sorted(times[2:])
    return times[len(times) // 2]


def graphed_step_ms(model, inputs, adapter, iters: int) -> float:
    """The step captured whole in one CUDA graph (static inputs), so host launch overhead is gone."""
    with torch.no_grad():
        return replay_ms(lambda: adapter.output_tensor(model(**inputs)), iters)


def conditioning_linears_ms(model, adapter, batch: int, iters: int) -> tuple[int, float]:
    """(count, ms): the Linears that see only the conditioning vector (one row per image), all run once."""
    layers = [m for name, m in model.named_modules()
              if adapter.is_conditioning_linear(name) and hasattr(m, "in_features")]
    if not layers:
        return 0, 0.0
    dtype = next(model.parameters()).dtype
    inputs = {m.in_features: torch.randn(batch, m.in_features, device="cuda", dtype=dtype) for m in layers}
    with torch.no_grad():
        return len(layers), replay_ms(lambda: [m(inputs[m.in_features]) for m in layers], iters)


def torchao_fp8(model, adapter, layers: str = "recipe") -> None:
    """The peer: torchao's FP8 dynamic per-row quantization of the Linears qdit would quantize (layers as
    qdit's quantize_layers)."""
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
    except ImportError as e:
        raise RuntimeError(f"the torchao_fp8 peer needs torchao installed ({e})") from e
    config = dict(model.config)
    quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
              filter_fn=lambda m, name: isinstance(m, torch.nn.Linear)
              and not adapter.is_kept_in_bf16(name, config, layers))


def timed_compile(model, inputs, adapter, peer: bool, mode: str | None) -> float:
    # Peers compile as diffusers users do: graph breaks allowed, inductor's stock options.
    compile_blocks(model, fullgraph=not peer, mode=mode, qdit_heuristics=not peer)
    start = time.perf_counter()
    with torch.no_grad():
        adapter.output_tensor(model(**inputs))
    torch.cuda.synchronize()
    return time.perf_counter() - start


def profile(model, inputs, adapter, label: str) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch.no_grad(), torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            adapter.output_tensor(model(**inputs))
        torch.cuda.synchronize()
    print(f"--- profile ({label}, 2 steps) ---")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=24, max_name_column_width=160))
    kernels = [(e.key, e.self_device_time_total / 1e3) for e in prof.key_averages() if e.self_device_time_total > 0]
    print(f"--- where a step's GPU time goes ({label}), ms per step ---")
    for part, ms in kernel_time_by_part(kernels, steps=2).items():
        print(f"{part:<44} {ms:8.2f}")


# Kernel-name patterns of the parts of a step, first match wins. Inductor's fused kernels are named
# after the ops they fuse (an activation quantization fused into a norm is named "..._scaled_mm_..."),
# so they are told apart by their prefix before anything else.
KERNEL_PARTS = (
    ("inductor-fused elementwise/norm (Triton)", ("triton_",)),
    ("attention (SDPA)", ("sdpa", "flash", "fmha", "attention")),
    ("GEMM (cuBLAS/CUTLASS)", ("nvjet", "gemm", "cutlass", "xmma", "sm90_", "cublas")),
    ("ATen elementwise (not fused)", ("at::native",)),
    ("qdit Triton kernels", ("_kernel",)),
)


def kernel_time_by_part(kernels: list[tuple[str, float]], steps: int) -> dict[str, float]:
    """(kernel name, total ms) pairs -> ms per step for each part of KERNEL_PARTS, "other" and "total";
    qdit's own kernels are listed one by one."""
    parts: dict[str, float] = {}
    for name, ms in kernels:
        part = next((p for p, keys in KERNEL_PARTS if any(k in name for k in keys)), "other")
        if part == "qdit Triton kernels":
            part = f"qdit {name}"
        parts[part] = parts.get(part, 0.0) + ms / steps
    parts = dict(sorted(parts.items(), key=lambda kv: -kv[1]))
    parts["total"] = sum(parts.values())
    return parts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="qwen-image")
    parser.add_argument("--resolutions", default="1024", help="comma-separated square sizes, e.g. 1024,1328")
    parser.add_argument("--batches", default="1", help="comma-separated batch sizes, e.g. 1,2,4")
    parser.add_argument("--text-tokens", type=int, default=None,
                        help="text length (default: the model's usual one, 512 for FLUX, 256 otherwise)")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--formats", default="bf16,fp8,fp8_static,fp8_per_channel,nvfp4,nvfp4_svd,w4a16_nvfp4",
                        help="bf16 = diffusers' own model; <fmt>_static = quantized at load, then activation "
                             "scales calibrated on the step's inputs (a ModelOpt export's layout); <fmt>+fp8attn = "
                             "with FP8 attention; <fmt>+blocks = every block Linear quantized, not the recipe's "
                             "(torchao_fp8+blocks likewise); <fmt>+expanded = 4-bit weights expanded to FP8 at load")
    parser.add_argument("--compile", default="all", help="formats also timed compiled ('all' or a list)")
    parser.add_argument("--reference-forward", default="",
                        help="formats whose reference-backend forward is timed once (smoke test)")
    parser.add_argument("--compile-mode", default="", help="torch.compile mode, e.g. reduce-overhead (CUDA graphs)")
    parser.add_argument("--cuda-graph", action="store_true", help="also time compiled steps replayed as one CUDA graph")
    parser.add_argument("--profile", default="", help="formats whose compiled step is profiled (kernel table)")
    parser.add_argument("--out", default="benchmarks/results")


def run(args) -> int:
    if not torch.cuda.is_available():
        raise SystemExit("qdit bench needs a CUDA GPU")
    for size in (int(s) for s in args.resolutions.split(",")):
        for batch in (int(b) for b in args.batches.split(",")):
            run_one(args, size, size, batch)
    return 0


def run_one(args, height: int, width: int, batch: int) -> None:
    args = argparse.Namespace(**{**vars(args), "height": height, "width": width, "batch": batch})
    adapter = adapter_by_name(args.model)
    if args.text_tokens is None:
        args.text_tokens = adapter.bench_text_tokens
    device = torch.device("cuda")
    rows = []
    for fmt in args.formats.split(","):
        # A format's setup can change inductor's process-wide config: torchao's quantize_ turns on
        # coordinate-descent tuning (recommended_inductor_config_setter) and never turns it off, which
        # made every format after the torchao peer compile ten times longer and tune differently.
        # Each format starts from, and hands back, the config the run began with.
        with isolated_inductor_config():
            rows.append(bench_format(args, fmt, adapter, device))

    write_results(args, rows, run_meta(args))


FORMAT_OPTIONS = ("fp8attn", "blocks", "expanded")


def parse_format(fmt: str) -> tuple[str, set[str]]:
    """"<format>[_static][+option...]" -> (format, options). "_static": quantized at load, then activation
    scales calibrated on the step's inputs (the layout of a ModelOpt export with static input_scale).
    Options: "fp8attn", FP8 attention; "blocks", quantize_layers="blocks" (every block Linear, not the
    recipe's); "expanded", weights_4bit="expanded_fp8" (4-bit weights expanded to FP8 once, at load).
    The peers take "blocks" only (torchao then quantizes the same Linears)."""
    spec, *options = fmt.split("+")
    unknown = [o for o in options if o not in FORMAT_OPTIONS]
    if unknown:
        raise SystemExit(f"qdit bench: unknown format option(s) {', '.join(unknown)} in {fmt!r} "
                         f"(known: {', '.join(FORMAT_OPTIONS)})")
    if spec == "bf16" and options:
        raise SystemExit(f"qdit bench: {fmt!r}: bf16 takes no options (it is diffusers' unquantized model)")
    if spec == "torchao_fp8" and set(options) - {"blocks"}:
        raise SystemExit(f"qdit bench: {fmt!r}: torchao_fp8 takes only +blocks (FP8 attention is qdit's)")
    return spec, set(options)


def format_model(model_name: str, fmt: str, adapter, device: torch.device, *, batch: int, height: int, width: int,
                 text_tokens: int) -> tuple[torch.nn.Module, dict, bool]:
    """The full-size transformer (random weights) of one benchmark format, its step inputs, and whether it
    is a peer (diffusers BF16, torchao) rather than qdit."""
    spec, options = parse_format(fmt)
    peer = spec in ("bf16", "torchao_fp8")
    layers = "blocks" if "blocks" in options else "recipe"
    model = random_transformer(model_name, full_size=True, device=device,
                               quantize=None if peer else spec.removesuffix("_static"),
                               quantize_layers="recipe" if peer else layers,
                               diffusers_modules=peer, attention="fp8" if "fp8attn" in options else "bf16",
                               weights_4bit="expanded_fp8" if "expanded" in options else "packed")
    if spec == "torchao_fp8":
        torchao_fp8(model, adapter, layers)
    inputs = adapter.example_inputs(dict(model.config), batch=batch, height=height, width=width,
                                    text_tokens=text_tokens, device=device)
    if spec.endswith("_static"):
        calibrate_static_input_scales(model, lambda m, i: m(**i), [inputs])
    return model, inputs, peer


def bench_format(args, fmt: str, adapter, device: torch.device) -> dict:
    """Load, time and (if asked) compile, graph and profile one format: its results row."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    model, inputs, peer = format_model(args.model, fmt, adapter, device, batch=args.batch, height=args.height,
                                       width=args.width, text_tokens=args.text_tokens)
    torch.cuda.synchronize()
    row = {"format": fmt, "load_s": round(time.perf_counter() - start, 2),
           "weight_gb": round(weight_bytes(model) / 1e9, 2),
           "backends": model.qdit_load_report.backends}
    fast = peer or any(b != "reference" for b in row["backends"])
    if fast:
        row["eager_ms"] = round(step_ms(model, inputs, adapter, args.iters), 1)
        count, ms = conditioning_linears_ms(model, adapter, args.batch, args.iters)
        row["conditioning_linears"], row["conditioning_ms"] = count, round(ms, 2)
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
    if args.compile == "all" or fmt in args.compile.split(","):
        # A stage that fails is recorded in the results (and the run goes on to the next format).
        try:
            row["compile_s"] = round(timed_compile(model, inputs, adapter, peer=peer,
                                                   mode=args.compile_mode or None), 1)
            row["compiled_ms"] = round(step_ms(model, inputs, adapter, args.iters), 1)
            if args.cuda_graph:
                row["compiled_graph_ms"] = round(graphed_step_ms(model, inputs, adapter, args.iters), 1)
        except Exception as e:  # noqa: BLE001 - reported in the results file, not swallowed
            row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
            print(f"{fmt}: {row['error']}", flush=True)
    if fmt in args.profile.split(","):
        profile(model, inputs, adapter, fmt)
    row["peak_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    print(json.dumps(row), flush=True)
    return row


@contextlib.contextmanager
def isolated_inductor_config():
    """Restore torch._inductor.config, every key, and the float32 matmul precision (torchao's setter
    also changed that before version 0.18) to what they were on entry, also after an error."""
    import torch._inductor.config as inductor_config

    saved = inductor_config.get_config_copy()
    matmul_precision = torch.get_float32_matmul_precision()
    try:
        yield
    finally:
        inductor_config.load_config(saved)
        torch.set_float32_matmul_precision(matmul_precision)


def run_meta(args) -> dict:
    """What a results file names besides its rows: GPU, versions, command, shapes."""
    return {
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "qdit": qdit.__version__,
        "diffusers": __import__("diffusers").__version__, "python": platform.python_version(),
        "command": "qdit " + " ".join(sys.argv[1:]),  # `python -m qdit.cli` runs the same CLI
        "model": args.model, "height": args.height, "width": args.width, "batch": args.batch,
        "text_tokens": args.text_tokens, "compile_mode": args.compile_mode or "default",
        "weights": "random (seeded), full-size config",
    }


def write_results(args, rows: list[dict], meta: dict) -> None:
    """<out>/<model>-<H>x<W>-b<batch>.json and .md; ratios are against the bf16 row of the same run."""
    base = next((r for r in rows if r["format"] == "bf16"), None)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{args.model}-{args.height}x{args.width}-b{args.batch}" + (f"-{args.compile_mode}" if args.compile_mode else "")
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [f"# {args.model} transformer step, {args.height}x{args.width}, batch {args.batch}, "
             f"{args.text_tokens} text tokens", "",
             f"GPU: {meta['gpu']}; torch {meta['torch']}; diffusers {meta['diffusers']}; random weights; "
             f"compile mode {meta['compile_mode']}.",
             f"Command: `{meta['command']}`", "",
             "| format | backends | load s | weights GB | eager ms | compiled ms | compiled+graph ms | compile s | "
             "vs BF16 compiled | vs BF16 compiled+graph | conditioning Linears ms | reference fwd s | peak GB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = ""
        if base and base.get("compiled_ms") and r.get("compiled_ms"):
            ratio = f"{r['compiled_ms'] / base['compiled_ms']:.2f}x"
        graph_ratio = ""
        if base and base.get("compiled_graph_ms") and r.get("compiled_graph_ms"):
            graph_ratio = f"{r['compiled_graph_ms'] / base['compiled_graph_ms']:.2f}x"
        lines.append(f"| {r['format']} | {', '.join(f'{k}:{v}' for k, v in r['backends'].items()) or 'torch'} | "
                     f"{r['load_s']} | {r['weight_gb']} | {r.get('eager_ms', '')} | {r.get('compiled_ms', '')} | "
                     f"{r.get('compiled_graph_ms', '')} | {r.get('compile_s', '')} | {ratio} | {graph_ratio} | "
                     f"{r.get('conditioning_ms', '')} | "
                     f"{r.get('reference_forward_s', '')} | {r['peak_gb']} |" + (f" error: {r['error']}" if "error" in r else ""))
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
