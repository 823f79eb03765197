"""`qdit <verb>`: parses arguments, calls the public API, prints. Nothing imports this module."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

import torch

from qdit.errors import QditError


def _format_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


def cmd_inspect(args) -> int:
    from qdit.api import inspect

    info = inspect(args.path)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{info['path']}")
    print(f"  model        {info['model']} ({info['class_name']})")
    print(f"  format       {info['format']}" + (f" / {info['quant_algo']}" if info["quant_algo"] else ""))
    if info["producer"]:
        print(f"  producer     {info['producer'].get('name')} {info['producer'].get('version')}")
    print(f"  parameters   {info['parameter_count']:,} ({info['stored_elements']:,} stored elements)")
    print(f"  size         {_format_bytes(info['total_bytes'])}: " +
          ", ".join(f"{k} {_format_bytes(v)}" for k, v in sorted(info["bytes_by_dtype"].items())))
    print("  Linear layers by scheme: " + ", ".join(f"{k} {v}" for k, v in sorted(info["scheme_counts"].items())))
    if info["excluded"]:
        shown = info["excluded"][:8]
        print(f"  kept in BF16 ({len(info['excluded'])}): " + ", ".join(shown) +
              (", ..." if len(info["excluded"]) > len(shown) else ""))
    return 0


def cmd_quantize(args) -> int:
    from qdit.tools.quantize import quantize_checkpoint

    dst = quantize_checkpoint(args.src, args.dst, args.format, device=args.device, calibration=args.calibration)
    print(f"wrote {dst}")
    return 0


def cmd_demo(args) -> int:
    """The main job on the embedded default: a tiny transformer quantized at load and run once."""
    from qdit.api import inspect, load_transformer
    from qdit.models import adapter_by_name
    from qdit.tools.embedded import tiny_checkpoint

    adapter = adapter_by_name(args.model)
    path = tiny_checkpoint(args.model)
    print(f"embedded {args.model} checkpoint (tiny config, random weights): {path}")
    bf16 = load_transformer(path, device=args.device)
    inputs = adapter.example_inputs(dict(bf16.config), device=args.device)
    with torch.no_grad():
        reference = adapter.output_tensor(bf16(**inputs)).float()
    print(f"{'format':<16} {'backends':<24} {'load s':>7} {'forward s':>9} {'rel. error vs BF16':>19}")
    for fmt in args.formats.split(","):
        start = time.perf_counter()
        model = load_transformer(path, device=args.device, quantize=fmt, backend=args.backend)
        loaded = time.perf_counter() - start
        start = time.perf_counter()
        with torch.no_grad():
            out = adapter.output_tensor(model(**inputs)).float()
        ran = time.perf_counter() - start
        err = ((out - reference).norm() / reference.norm()).item()
        backends = ",".join(f"{k}:{v}" for k, v in model.qdit_load_report.backends.items())
        print(f"{fmt:<16} {backends:<24} {loaded:>7.2f} {ran:>9.3f} {err:>19.4f}")
    info = inspect(path)
    print(f"transformer: {info['parameter_count']:,} parameters, {_format_bytes(info['total_bytes'])} in BF16")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qdit", description="Run quantized diffusion transformers.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log loading details")
    sub = parser.add_subparsers(dest="verb", required=True)

    p = sub.add_parser("inspect", help="describe a checkpoint: format, schemes per layer, sizes")
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="print the full description as JSON")
    p.set_defaults(func=cmd_inspect)

    from qdit.formats import LOAD_TIME_FORMATS

    p = sub.add_parser("quantize", help="quantize a BF16 transformer and write it in ModelOpt's export layout")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--format", required=True, choices=sorted(LOAD_TIME_FORMATS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--calibration", default="synthetic", choices=["synthetic"],
                   help="inputs for static activation scales: 'synthetic' runs the model's example inputs")
    p.set_defaults(func=cmd_quantize)

    from qdit.models import ADAPTERS

    p = sub.add_parser("demo", help="quantize the embedded tiny transformer at load and compare with BF16")
    p.add_argument("--model", default="qwen-image", choices=[a.name for a in ADAPTERS])
    p.add_argument("--formats", default="fp8,fp8_per_channel,nvfp4,w4a16_nvfp4,nvfp4_svd")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", default=None, help="force a kernel backend (default: chosen per layer)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except QditError as e:
        print(f"qdit: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
