"""load_pipeline: a diffusers pipeline folder with qdit's transformer in it; generate: run it."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qdit.api import load_transformer
from qdit.compile import compile_blocks
from qdit.config import QditConfig, resolve_config
from qdit.cuda_graph import enable_cuda_graphs
from qdit.errors import CheckpointError, QditError
from qdit.formats import detect
from qdit.formats.checkpoint import open_checkpoint
from qdit.models import adapter_for_class

log = logging.getLogger("qdit.pipelines")


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _check_components(folder: Path) -> dict[str, Any]:
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise CheckpointError("not a diffusers pipeline folder: model_index.json is missing", file=str(folder),
                              hint="pass the folder that holds model_index.json and one subfolder per component")
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError("model_index.json is not valid JSON", file=str(index_file), found=str(e)) from e
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list) or entry[0] is None:
            continue
        if not (folder / name).is_dir():
            raise CheckpointError(f"pipeline component folder {name}/ is missing", file=str(folder / name),
                                  expected=f"{name}/ ({entry[0]}.{entry[1]}) as model_index.json lists",
                                  found="no such folder", hint="copy the whole pipeline folder")
    return index


def _transformer_quantize(config: QditConfig, transformer_folder: Path) -> str | None:
    """Translate the config's quantize option into load_transformer's, refusing conflicting requests."""
    fmt = detect(open_checkpoint(transformer_folder))
    if config.quantize == "auto":
        return None
    if config.quantize == "none":
        if fmt.name != "bf16":
            raise QditError(f"quantize=none asks for BF16, but {transformer_folder} is quantized "
                            f"({fmt.name} {fmt.quant_algo}); use quantize=auto to run it as it is")
        return None
    return config.quantize  # load_transformer refuses to quantize an already-quantized checkpoint


def load_pipeline(path: str | os.PathLike, *, device: str | torch.device | None = None,
                  config: QditConfig | str | os.PathLike | None = None,
                  transformer: str | os.PathLike | None = None, **overrides: Any):
    """The diffusers pipeline of `path` with qdit's (quantized) transformer in it.

    config: a QditConfig, a YAML file, or None for defaults; keyword overrides change single fields.
    transformer: a transformer folder to use instead of the pipeline's own (e.g. a quantized export
        or a converted Nunchaku checkpoint of it).
    """
    import diffusers

    from qdit.pipelines.fp8_storage import apply_fp8_weight_storage

    cfg = resolve_config(config, overrides)
    folder = Path(path)
    if not folder.exists():
        raise CheckpointError("pipeline path does not exist", file=str(folder))
    index = _check_components(folder)
    device = torch.device(device or _default_device())
    transformer_folder = Path(transformer) if transformer is not None else folder / "transformer"
    transformer_model = load_transformer(transformer_folder, device=device, dtype=cfg.torch_dtype, backend=cfg.backend,
                                         quantize=_transformer_quantize(cfg, transformer_folder),
                                         quantize_layers=cfg.quantize_layers, attention=cfg.attention,
                                         weights_4bit=cfg.weights_4bit)
    pipeline_cls = getattr(diffusers, index.get("_class_name", ""), None)
    if pipeline_cls is None:
        raise CheckpointError("model_index.json names a pipeline class diffusers does not have",
                              file=str(folder / "model_index.json"), found=str(index.get("_class_name")))
    pipe = pipeline_cls.from_pretrained(folder, transformer=transformer_model, dtype=cfg.torch_dtype)
    pipe.to(device)
    converted = {}
    if cfg.text_encoder_fp8:
        for name in ("text_encoder", "text_encoder_2"):
            if getattr(pipe, name, None) is not None:
                converted[name] = apply_fp8_weight_storage(getattr(pipe, name))
    if cfg.vae_fp8:
        converted["vae"] = apply_fp8_weight_storage(pipe.vae)
    if converted:
        log.info("FP8 weight storage: %s", ", ".join(f"{k}: {v} layers" for k, v in converted.items()))
    if cfg.compile:
        compile_blocks(pipe.transformer)
    if cfg.cuda_graph:
        enable_cuda_graphs(pipe.transformer)
    pipe.qdit_config = cfg
    return pipe


@dataclass
class GenerationResult:
    images: list  # PIL images
    seconds: float
    seconds_per_step: float
    peak_gpu_bytes: int | None  # None on CPU
    metadata: dict[str, str]


def _check_prompt_length(pipe, prompt: str, max_sequence_length: int) -> None:
    # The long-context tokenizer is the second one where a pipeline has two (FLUX: CLIP + T5).
    tokenizer = getattr(pipe, "tokenizer_2", None) or pipe.tokenizer
    n = len(tokenizer(prompt)["input_ids"])
    if n > max_sequence_length:
        raise QditError(f"the prompt is {n} tokens long; this pipeline's text encoder takes at most "
                        f"{max_sequence_length}. Shorten the prompt.")


def generate(pipe, prompt: str, *, config: QditConfig | None = None, progress: bool = True,
             **overrides: Any) -> GenerationResult:
    """Generate images with a pipeline from load_pipeline, using the config's generation fields."""
    cfg = (config or getattr(pipe, "qdit_config", None) or QditConfig()).replace(**overrides)
    adapter = adapter_for_class(type(pipe.transformer).__name__, source=type(pipe.transformer).__name__)
    max_sequence_length = 512
    _check_prompt_length(pipe, prompt, max_sequence_length)
    kwargs: dict[str, Any] = {
        "prompt": prompt, "height": cfg.height, "width": cfg.width, "num_inference_steps": cfg.steps,
        "num_images_per_prompt": cfg.num_images, "max_sequence_length": max_sequence_length,
        "generator": torch.Generator(device="cpu").manual_seed(cfg.seed),
    }
    if cfg.negative_prompt is not None:
        kwargs["negative_prompt"] = cfg.negative_prompt
    if cfg.guidance is not None:
        kwargs[adapter.guidance_argument] = cfg.guidance
    pipe.set_progress_bar_config(disable=not progress)
    device = pipe.transformer.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    with torch.no_grad():
        images = pipe(**kwargs).images
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    report = getattr(pipe.transformer, "qdit_plan", {})
    schemes = sorted({lq.describe() for lq in report.values() if lq.quantized}) or ["bf16"]
    quantized = sum(lq.quantized for lq in report.values())
    metadata = {
        "prompt": prompt, "seed": str(cfg.seed), "steps": str(cfg.steps),
        "model": adapter.name, "quantization": ",".join(schemes),
        "quantized_linears": f"{quantized} of {len(report)}",
        "negative_prompt": cfg.negative_prompt or "", "software": "qdit",
    }
    return GenerationResult(images, seconds, seconds / cfg.steps, peak, metadata)


def save_png(image, path: str | os.PathLike, metadata: dict[str, str]) -> Path:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for k, v in metadata.items():
        info.add_text(k, v)
    path = Path(path)
    image.save(path, pnginfo=info)
    return path


def check_writable(path: str | os.PathLike) -> Path:
    """Fail before generating, not after, when the output cannot be written."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise QditError(f"cannot write {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise QditError(f"cannot write {path}: permission denied; choose another --output")
    return path
