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
    if info["model"] is None:
        print("  model        unknown: the checkpoint has no transformer config")
    else:
        print(f"  model        {info['model']} ({info['class_name']})")
    print(f"  format       {info['format']}" + (f" / {info['quant_algo']}" if info["quant_algo"] else ""))
    if info["producer"]:
        print(f"  producer     {info['producer'].get('name')} {info['producer'].get('version')}")
    if info["parameter_count"] is not None:
        print(f"  parameters   {info['parameter_count']:,} ({info['stored_elements']:,} stored elements)")
    else:
        print(f"  stored       {info['stored_elements']:,} elements")
    print(f"  size         {_format_bytes(info['total_bytes'])}: " +
          ", ".join(f"{k} {_format_bytes(v)}" for k, v in sorted(info["bytes_by_dtype"].items())))
    print("  Linear layers by scheme: " + ", ".join(f"{k} {v}" for k, v in sorted(info["scheme_counts"].items())))
    if info["excluded"]:
        shown = info["excluded"][:8]
        print(f"  kept in BF16 ({len(info['excluded'])}): " + ", ".join(shown) +
              (", ..." if len(info["excluded"]) > len(shown) else ""))
    return 0


def cmd_quantize(args) -> int:
    from qdit.tools.quantize import quantize_checkpoint, quantize_pipeline

    if args.calibration_prompts and not args.pipeline:
        raise QditError("--calibration-prompts needs --pipeline: prompts become transformer inputs through "
                        "the pipeline's text encoder")
    if args.pipeline:
        from qdit.tools.quantize import read_prompts

        prompts = read_prompts(args.calibration_prompts) if args.calibration_prompts else None
        dst = quantize_pipeline(args.src, args.dst, args.format, device=args.device, calibration_prompts=prompts,
                                height=args.size, width=args.size, quantize_layers=args.quantize_layers)
    else:
        dst = quantize_checkpoint(args.src, args.dst, args.format, device=args.device, calibration=args.calibration,
                                  quantize_layers=args.quantize_layers)
    print(f"wrote {dst}")
    return 0


def cmd_convert_nunchaku(args) -> int:
    from qdit.tools.convert_nunchaku import convert_nunchaku_checkpoint

    dst = convert_nunchaku_checkpoint(args.src, args.dst, base=args.base)
    print(f"wrote {dst}")
    return 0


def cmd_generate(args) -> int:
    from qdit.config import QditConfig, resolve_config
    from qdit.pipelines.load import check_writable, generate, load_pipeline, save_png

    overrides = {"quantize": args.quantize, "quantize_layers": args.quantize_layers, "backend": args.backend,
                 "steps": args.steps, "guidance": args.guidance, "seed": args.seed, "height": args.height,
                 "width": args.width, "num_images": args.num_images,
                 "negative_prompt": args.negative_prompt, "text_encoder_fp8": args.text_encoder_fp8 or None,
                 "vae_fp8": args.vae_fp8 or None, "compile": args.compile or None,
                 "cuda_graph": args.cuda_graph or None, "attention": args.attention,
                 "weights_4bit": args.weights_4bit}
    if args.model is None:
        from qdit.eval.evaluate import SHIPPED_MODEL

        model = SHIPPED_MODEL
        # Its own defaults (128x128, true CFG 3) live next to it, so they travel with the weights.
        base = QditConfig.from_yaml(SHIPPED_MODEL / "qdit.yaml")
        print(f"no --model: using the shipped shapes model (a tiny Qwen-Image pipeline trained on coloured "
              f"shapes; try a prompt like 'a large red circle at the top left on a white background') at {model}")
    else:
        model, base = args.model, QditConfig()
    config = resolve_config(args.config or base, overrides)
    outputs = _output_paths(args.output, config.num_images)
    for path in outputs:
        check_writable(path)
    pipe = load_pipeline(model, device=args.device, config=config)
    result = generate(pipe, args.prompt, config=config)
    for image, path in zip(result.images, outputs):
        save_png(image, path, result.metadata)
        print(f"wrote {path}")
    peak = f"{result.peak_gpu_bytes / 2**30:.2f} GiB" if result.peak_gpu_bytes is not None else "n/a (CPU)"
    print(f"{config.steps} steps in {result.seconds:.2f} s ({result.seconds_per_step:.3f} s/step), "
          f"transformer {result.metadata['quantization']} ({result.metadata['quantized_linears']} Linears), "
          f"peak GPU memory {peak}")
    return 0


def _output_paths(output: str, count: int) -> list[str]:
    if count == 1:
        return [output]
    stem, dot, ext = output.rpartition(".")
    return [f"{stem}-{i}.{ext}" if dot else f"{output}-{i}" for i in range(count)]


def cmd_eval(args) -> int:
    from qdit.eval.evaluate import EvalSettings, SHIPPED_MODEL, evaluate, parse_formats, run_header, write_report
    from qdit.eval.scenes import held_out_prompts
    from qdit.tools.quantize import read_prompts

    prompts = held_out_prompts(int(args.prompts)) if args.prompts.isdigit() else read_prompts(args.prompts)
    settings = EvalSettings(steps=args.steps, guidance=args.guidance, seed=args.seed)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = args.model or SHIPPED_MODEL
    results, grid = evaluate(model, formats=parse_formats(args.formats), prompts=prompts, settings=settings,
                             device=device, backend=args.backend)
    command = "qdit " + " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("qdit") else "qdit eval"
    table = write_report(results, grid, args.out, header=run_header(model, prompts, settings, device, command))
    print(table)
    print(f"wrote {args.out}/eval.md, eval.json, grid.png")
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

    from qdit.config import ATTENTION_CHOICES, QUANTIZE_CHOICES, QUANTIZE_LAYERS_CHOICES, WEIGHTS_4BIT_CHOICES
    from qdit.formats import LOAD_TIME_FORMATS

    p = sub.add_parser("quantize", help="quantize a BF16 transformer and write it in ModelOpt's export layout")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--format", required=True, choices=sorted(LOAD_TIME_FORMATS))
    p.add_argument("--quantize-layers", default="recipe", choices=QUANTIZE_LAYERS_CHOICES,
                   help="'recipe' (the format producer's layers) or 'blocks' (every Linear of the repeated blocks)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--calibration", default="synthetic", choices=["synthetic"],
                   help="inputs for static activation scales: 'synthetic' runs the model's example inputs")
    p.add_argument("--pipeline", action="store_true",
                   help="SRC is a pipeline folder: quantize its transformer, copy the other components")
    p.add_argument("--calibration-prompts", default=None, metavar="FILE",
                   help="with --pipeline: calibrate on the transformer inputs of these prompts (one per line)")
    p.add_argument("--size", type=int, default=512, help="with --calibration-prompts: image height and width")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("convert", help="convert another producer's checkpoint to a qdit-readable folder")
    source = p.add_subparsers(dest="source", required=True)
    p = source.add_parser("nunchaku", help="a Nunchaku SVDQuant checkpoint -> diffusers folder, canonical layout")
    p.add_argument("src", help="the merged svdq-{int4|fp4}_r*-<model>.safetensors file, or the older folder holding "
                               "transformer_blocks.safetensors and unquantized_layers.safetensors")
    p.add_argument("dst", help="output transformer folder (new or empty)")
    p.add_argument("--base", default=None, metavar="CONFIG_OR_PIPELINE",
                   help="the diffusers transformer config: a config.json, a transformer folder, or a pipeline "
                        "folder (model_index.json + transformer/config.json). Needed when SRC has no config in "
                        "its header (most legacy folders); when SRC has one, --base wins")
    p.set_defaults(func=cmd_convert_nunchaku)

    p = sub.add_parser("generate", help="text to image with a (quantized) diffusers pipeline")
    p.add_argument("--model", default=None, help="pipeline folder (default: the shipped shapes model)")
    p.add_argument("--prompt", default="a large red circle at the top left on a white background")
    p.add_argument("--config", default=None, help="YAML file of options (flags override it)")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--num-images", type=int, default=None)
    p.add_argument("--quantize", default=None, choices=QUANTIZE_CHOICES)
    p.add_argument("--quantize-layers", default=None, choices=QUANTIZE_LAYERS_CHOICES,
                   help="with a --quantize format: 'recipe' (default; the format producer's layers, ModelOpt's "
                        "recipe keeps some large ones in BF16) or 'blocks' (every Linear of the repeated blocks)")
    p.add_argument("--backend", default=None)
    p.add_argument("--text-encoder-fp8", action="store_true")
    p.add_argument("--vae-fp8", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the repeated transformer blocks")
    p.add_argument("--attention", default=None, choices=ATTENTION_CHOICES,
                   help="fp8: cuDNN's FP8 attention (Hopper/Blackwell; Qwen-Image, Z-Image and FLUX)")
    p.add_argument("--weights-4bit", default=None, choices=WEIGHTS_4BIT_CHOICES,
                   help="4-bit layers multiplied as FP8 (Hopper, Ada): packed = 4-bit codes resident, expanded per "
                        "call (least memory); expanded_fp8 = expanded once at load (faster, FP8-sized weights)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="replay the transformer's forward from CUDA graphs (GPU): no per-kernel launch cost")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--output", default="qdit.png")
    p.set_defaults(func=cmd_generate)

    from qdit import bench

    p = sub.add_parser("bench", help="time a full-size transformer step per format against diffusers BF16 (GPU)")
    bench.add_arguments(p)
    p.set_defaults(func=bench.run)

    from qdit.eval.evaluate import default_formats

    p = sub.add_parser("eval", help="accuracy, fidelity to BF16, memory and speed of each format on a scored model")
    p.add_argument("--model", default=None, help="pipeline folder (default: the shipped shapes model)")
    p.add_argument("--formats", default=",".join(default_formats()),
                   help="comma-separated: bf16, a load-time format, modelopt-<format>, either with +blocks (every "
                        "block Linear quantized, not the recipe's), or NAME=TRANSFORMER_FOLDER")
    p.add_argument("--prompts", default="200", help="N held-out captions, or a file of captions (one per line)")
    p.add_argument("--seed", type=int, default=0, help="prompt i starts from seed + i")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=3.0, help="true classifier-free guidance scale")
    p.add_argument("--backend", default=None, help="force a kernel backend (default: chosen per layer)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--out", default="qdit-eval")
    p.set_defaults(func=cmd_eval)

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
