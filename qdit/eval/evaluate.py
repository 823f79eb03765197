"""`qdit eval`: the same prompts and seeds through a pipeline in several formats, scored and compared.

Formats (names for --formats):
  bf16                    the checkpoint as it is
  fp8, nvfp4, ...         quantized while loading (qdit.formats.LOAD_TIME_FORMATS)
  modelopt-<format>       written by `qdit quantize` as a ModelOpt export, calibrated on the transformer
                          inputs of training captions, then loaded from disk
  either, +blocks         with quantize_layers="blocks": every block Linear, not the recipe's
  NAME=FOLDER             a transformer folder made elsewhere (a converted Nunchaku checkpoint, say)
"""

from __future__ import annotations

import json
import logging
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from qdit.errors import QditError
from qdit.eval import metrics
from qdit.eval.sampling import sample_images
from qdit.eval.scenes import IMAGE_SIZE, held_out_prompts, random_scenes
from qdit.eval.scorer import ATTRIBUTES, accuracy, score

log = logging.getLogger("qdit.eval")

SHIPPED_MODEL = Path(__file__).resolve().parent.parent / "assets" / "shapes-qwen-image"
MODELOPT_PREFIX = "modelopt-"
BLOCKS_SUFFIX = "+blocks"
CALIBRATION_PROMPTS = 4  # training captions whose 20-step transformer inputs calibrate the exports


def default_formats() -> list[str]:
    from qdit.formats import LOAD_TIME_FORMATS

    return ["bf16", *LOAD_TIME_FORMATS, *(MODELOPT_PREFIX + f for f in LOAD_TIME_FORMATS)]


@dataclass(frozen=True)
class EvalSettings:
    steps: int = 20
    guidance: float = 3.0
    negative_prompt: str = ""
    size: int = IMAGE_SIZE
    seed: int = 0
    batch_size: int = 50


@dataclass
class FormatResult:
    format: str
    transformer: str  # how the transformer was made, in words
    quantized_linears: str  # "24 of 56"
    backends: dict[str, int]
    accuracy: dict[str, float]
    psnr_vs_bf16: float | None
    ssim_vs_bf16: float | None
    lpips_vs_bf16: float | None
    weight_bytes: int
    weights_vs_bf16: float
    activation_bytes: int | None  # one transformer forward beyond its weights (CUDA only)
    peak_bytes: int | None  # peak allocated while generating (CUDA only)
    peak_vs_bf16: float | None
    seconds_per_image: float
    notes: list[str] = field(default_factory=list)


def parse_formats(text: str) -> list[tuple[str, Path | None]]:
    """--formats: comma-separated names; NAME=FOLDER names a prepared transformer folder."""
    from qdit.formats import LOAD_TIME_FORMATS

    known = default_formats()
    parsed = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        if "=" in item:
            name, folder = item.split("=", 1)
            if not Path(folder).is_dir():
                raise QditError(f"--formats {item}: {folder} is not a folder (expected a transformer folder)")
            parsed.append((name, Path(folder)))
        elif item in known or item.removesuffix(BLOCKS_SUFFIX) in set(known) - {"bf16"}:
            parsed.append((item, None))
        else:
            raise QditError(f"--formats: unknown format {item!r}; known: {', '.join(known)}, any but bf16 with "
                            f"{BLOCKS_SUFFIX} (every block Linear quantized), or NAME=FOLDER for a prepared "
                            f"transformer folder (load-time formats: {', '.join(LOAD_TIME_FORMATS)})")
    if not parsed:
        raise QditError("--formats is empty")
    if parsed[0][0] != "bf16":
        parsed = [("bf16", None), *[p for p in parsed if p[0] != "bf16"]]  # the reference for PSNR/SSIM
    return parsed


def _capture_first_call(pipe, prompt: str, settings: EvalSettings) -> tuple[tuple, dict]:
    """The transformer's inputs at the first step of one true-CFG generation (for the memory probe)."""
    from qdit.tools.quantize import pipeline_calibration_inputs

    # One prompt, no guidance (true CFG 1): the memory of a batch-1 forward.
    inputs = pipeline_calibration_inputs(pipe, [prompt], steps=2, guidance=1.0, height=settings.size,
                                         width=settings.size)
    return (), inputs[0]


def _load(model: Path, name: str, folder: Path | None, device, backend: str | None, workdir: Path,
          calibration: list[dict] | None) -> tuple[Any, str]:
    from qdit.pipelines.load import load_pipeline
    from qdit.tools.quantize import quantize_checkpoint

    if name == "bf16":
        return load_pipeline(model, device=device, quantize="none", backend=backend), "BF16 checkpoint"
    if folder is not None:
        from qdit.formats import detect, open_checkpoint

        fmt = detect(open_checkpoint(folder))
        return (load_pipeline(model, device=device, transformer=folder, backend=backend),
                f"transformer folder {folder.name} ({fmt.name}{' ' + fmt.quant_algo if fmt.quant_algo else ''})")
    layers = "blocks" if name.endswith(BLOCKS_SUFFIX) else "recipe"
    fmt = name.removesuffix(BLOCKS_SUFFIX)
    which = ", every block Linear" if layers == "blocks" else ""
    if fmt.startswith(MODELOPT_PREFIX):
        fmt = fmt[len(MODELOPT_PREFIX):]
        export = workdir / name
        quantize_checkpoint(model / "transformer", export, fmt, device=str(device), calibration_inputs=calibration,
                            quantize_layers=layers)
        return (load_pipeline(model, device=device, transformer=export, backend=backend),
                f"ModelOpt export written by qdit quantize ({fmt}{which}), calibrated on {CALIBRATION_PROMPTS} "
                "training captions")
    return (load_pipeline(model, device=device, quantize=fmt, quantize_layers=layers, backend=backend),
            f"quantized at load ({fmt}{which})")


def evaluate(model: str | Path | None = None, *, formats: list[tuple[str, Path | None]] | None = None,
             prompts: list[str] | None = None, settings: EvalSettings = EvalSettings(),
             device: str | torch.device = "cpu", backend: str | None = None,
             grid_rows: int = 8) -> tuple[list[FormatResult], torch.Tensor]:
    """Results per format, and the image grid [3, H, W] (rows: the first prompts; columns: formats)."""
    from qdit.pipelines.load import load_pipeline
    from qdit.tools.quantize import pipeline_calibration_inputs

    model = Path(model) if model is not None else SHIPPED_MODEL
    formats = formats or parse_formats(",".join(default_formats()))
    prompts = prompts or held_out_prompts(200)
    seeds = [settings.seed + i for i in range(len(prompts))]
    device = torch.device(device)
    calibration = None
    if any(name.startswith(MODELOPT_PREFIX) for name, _ in formats):
        pipe = load_pipeline(model, device=device, quantize="none")
        calibration = pipeline_calibration_inputs(
            pipe, [s.caption for s in random_scenes(CALIBRATION_PROMPTS, split="train", seed=settings.seed)],
            steps=settings.steps, guidance=settings.guidance if settings.guidance > 1 else None,
            negative_prompt=settings.negative_prompt if settings.guidance > 1 else None,
            height=settings.size, width=settings.size, seed=settings.seed)
        del pipe
    lpips_reason = metrics.lpips_unavailable_reason()
    results: list[FormatResult] = []
    columns: list[torch.Tensor] = []
    reference: torch.Tensor | None = None
    with tempfile.TemporaryDirectory(prefix="qdit-eval-") as tmp:
        for name, folder in formats:
            pipe, made = _load(model, name, folder, device, backend, Path(tmp), calibration)
            pipe.set_progress_bar_config(disable=True)
            sample_images(pipe, prompts[:1], seeds[:1], steps=2, guidance=settings.guidance,
                          negative_prompt=settings.negative_prompt, size=settings.size)  # warm-up
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            images = sample_images(pipe, prompts, seeds, steps=settings.steps, guidance=settings.guidance,
                                   negative_prompt=settings.negative_prompt, size=settings.size,
                                   batch_size=settings.batch_size)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - start
            peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
            args, kwargs = _capture_first_call(pipe, prompts[0], settings)
            activations = metrics.forward_activation_bytes(pipe.transformer, args, kwargs)
            plan = pipe.transformer.qdit_plan
            notes = []
            bf16 = results[0] if results else None
            if reference is None:
                reference = images
            lpips_value = metrics.lpips(images, reference) if bf16 and lpips_reason is None else None
            if lpips_reason is not None:
                notes.append(lpips_reason)
            weights = metrics.module_bytes(pipe.transformer)
            results.append(FormatResult(
                format=name, transformer=made,
                quantized_linears=f"{sum(lq.quantized for lq in plan.values())} of {len(plan)}",
                backends=dict(pipe.transformer.qdit_load_report.backends),
                accuracy=accuracy([score(img, p) for img, p in zip(images, prompts)]),
                psnr_vs_bf16=metrics.psnr(images, reference) if bf16 else None,
                ssim_vs_bf16=metrics.ssim(images, reference) if bf16 else None,
                lpips_vs_bf16=lpips_value,
                weight_bytes=weights, weights_vs_bf16=weights / (bf16.weight_bytes if bf16 else weights),
                activation_bytes=activations, peak_bytes=peak,
                peak_vs_bf16=None if peak is None else peak / (bf16.peak_bytes if bf16 else peak),
                seconds_per_image=seconds / len(prompts), notes=notes))
            columns.append(images[:grid_rows])
            log.info("%s: accuracy %.3f", name, results[-1].accuracy["all"])
            del pipe
    grid = torch.cat([torch.cat(list(col), dim=1) for col in columns], dim=2)
    return results, grid


def _mb(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.2f}"


def markdown_table(results: list[FormatResult], *, header: dict[str, Any]) -> str:
    lines = [f"# qdit eval: {header['model']}", ""]
    lines += [f"- {k}: {v}" for k, v in header.items() if k != "model"]
    lines += ["", "| format | quantized Linears | accuracy | " + " | ".join(ATTRIBUTES) +
              " | PSNR vs BF16 (dB) | SSIM vs BF16 | LPIPS vs BF16 | weights MiB (x BF16) | activations MiB | "
              "peak MiB (x BF16) | s/image |",
              "|" + "---|" * (13 + len(ATTRIBUTES) - 4)]
    for r in results:
        fmt = lambda v, spec: "—" if v is None else ("inf" if v == float("inf") else format(v, spec))  # noqa: E731
        lines.append(
            f"| {r.format} | {r.quantized_linears} | {r.accuracy['all']:.3f} | "
            + " | ".join(f"{r.accuracy[a]:.3f}" for a in ATTRIBUTES)
            + f" | {fmt(r.psnr_vs_bf16, '.2f')} | {fmt(r.ssim_vs_bf16, '.4f')} | {fmt(r.lpips_vs_bf16, '.4f')}"
            + f" | {_mb(r.weight_bytes)} ({r.weights_vs_bf16:.2f}) | {_mb(r.activation_bytes)}"
            + f" | {_mb(r.peak_bytes)}" + (f" ({r.peak_vs_bf16:.2f})" if r.peak_vs_bf16 is not None else "")
            + f" | {r.seconds_per_image:.3f} |")
    notes = sorted({n for r in results for n in r.notes})
    if any(r.activation_bytes is None for r in results):
        notes.append("activations and peak memory are measured on CUDA only (the CPU allocator keeps no peak)")
    if notes:
        lines += ["", *[f"- {n}" for n in notes]]
    lines += ["", "How each transformer was made:", ""]
    lines += [f"- {r.format}: {r.transformer}; backends {r.backends}" for r in results]
    return "\n".join(lines) + "\n"


def write_report(results: list[FormatResult], grid: torch.Tensor, out: str | Path, *,
                 header: dict[str, Any]) -> str:
    from PIL import Image

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(results, header=header)
    (out / "eval.md").write_text(table, encoding="utf-8")
    (out / "eval.json").write_text(json.dumps({"header": header, "results": [asdict(r) for r in results]},
                                              indent=2, allow_nan=True), encoding="utf-8")
    Image.fromarray((grid.clamp(0, 1).permute(1, 2, 0) * 255).round().byte().numpy()).save(out / "grid.png")
    return table


def run_header(model: Path, prompts: list[str], settings: EvalSettings, device, command: str) -> dict[str, Any]:
    import diffusers

    name = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else platform.processor() or "cpu"
    return {"model": str(model), "command": command, "device": f"{torch.device(device)} ({name})",
            "prompts": len(prompts), "steps": settings.steps, "guidance (true CFG)": settings.guidance,
            "size": settings.size, "seed": settings.seed, "torch": torch.__version__,
            "diffusers": diffusers.__version__, "grid": "grid.png: rows are the first prompts, columns the formats in table order"}
