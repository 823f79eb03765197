"""qdit's public API: load_transformer and inspect."""

from __future__ import annotations

import logging
import os
from collections import Counter, defaultdict
from typing import Any

import torch

from qdit import formats
from qdit.formats.checkpoint import open_checkpoint
from qdit.loading.loader import RandomWeights, build_skeleton, linear_layers, load_into
from qdit.models import adapter_by_name, adapter_for_class

log = logging.getLogger("qdit")


def load_transformer(path: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
                     backend: str | None = None, quantize: str | None = None, quantize_layers: str = "recipe",
                     attention: str = "bf16", weights_4bit: str = "packed") -> torch.nn.Module:
    """Load a diffusers DiT transformer with qdit's quantized layers.

    path: a transformer folder (config.json + safetensors) or a pipeline folder (model_index.json).
    quantize: None/"none" loads the checkpoint as it is (a ModelOpt export runs quantized, a BF16
        checkpoint runs in BF16); "fp8", "fp8_per_channel", "nvfp4", "w4a16_nvfp4" or "nvfp4_svd"
        quantizes a BF16 checkpoint while it loads.
    quantize_layers: with quantize, which Linears: "recipe" (the format producer's choice: ModelOpt's
        recipe keeps some large layers in BF16) or "blocks" (every Linear of the repeated blocks).
    backend: force a kernel backend by name (default: the best one for the device, per layer).
    attention: "bf16" (diffusers' attention) or "fp8" (cuDNN's FP8 attention: Qwen-Image, Z-Image, FLUX).
    weights_4bit: "packed" or "expanded_fp8": on GPUs that multiply 4-bit layers as FP8 (Hopper, Ada),
        keep the 4-bit codes and expand per call (least memory) or expand once at load (faster; an FP8
        checkpoint's memory).
    """
    device = torch.device(device)
    ckpt = open_checkpoint(path)
    adapter = adapter_for_class(ckpt.class_name, source=str(ckpt.config_file))
    fmt = formats.detect(ckpt)
    skeleton = build_skeleton(adapter, ckpt.config, dtype)
    linears = linear_layers(skeleton)
    source = formats.loading_source(ckpt, fmt, linears)
    plan = formats.plan_for(source, fmt, adapter, linears, quantize, quantize_layers=quantize_layers)
    model, report = load_into(skeleton, source, plan, dtype=dtype, device=device, backend=backend,
                              quantize_from_full=quantize not in (None, "none"), weights_4bit=weights_4bit)
    log.info("loaded %s (%s%s) in %.1f s: %d tensors, backends %s", ckpt.folder, fmt.name,
             f" {fmt.quant_algo}" if fmt.quant_algo else "", report.seconds, report.tensors_read, report.backends)
    adapter.install_compile_friendly_modules(model, attention=attention)
    model.qdit_load_report = report
    model.qdit_plan = plan
    return model


def random_transformer(model: str, *, full_size: bool = False, config: dict[str, Any] | None = None,
                       device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
                       backend: str | None = None, quantize: str | None = None, quantize_layers: str = "recipe",
                       seed: int = 0, diffusers_modules: bool = False, attention: str = "bf16",
                       weights_4bit: str = "packed") -> torch.nn.Module:
    """A transformer with seeded random weights, built and quantized exactly as a checkpoint load would be.

    model: an adapter name ("qwen-image", "flux", "z-image"); full_size picks the published config,
    otherwise the tiny one, unless `config` is given. diffusers_modules keeps diffusers' own attention
    processors and activations (the benchmark's diffusers peers) instead of qdit's; quantize_layers,
    attention and weights_4bit as for load_transformer.
    """
    adapter = adapter_by_name(model)
    device = torch.device(device)
    cfg = dict(config or (adapter.full_config if full_size else adapter.tiny_config))
    skeleton = build_skeleton(adapter, cfg, dtype)
    source = RandomWeights(adapter, skeleton, device, dtype, seed)
    fmt = formats.DetectedFormat("bf16", None)
    plan = formats.plan_for(source, fmt, adapter, linear_layers(skeleton), quantize,
                            quantize_layers=quantize_layers)
    model_, report = load_into(skeleton, source, plan, dtype=dtype, device=device, backend=backend,
                               quantize_from_full=quantize not in (None, "none"), weights_4bit=weights_4bit)
    if not diffusers_modules:
        adapter.install_compile_friendly_modules(model_, attention=attention)
    model_.qdit_load_report = report
    model_.qdit_plan = plan
    return model_


def inspect(path: str | os.PathLike) -> dict[str, Any]:
    """Format, quant_algo, scheme per Linear, excluded layers, bytes by dtype and parameter counts.

    A single .safetensors file is read as a merged Nunchaku checkpoint (its header metadata says so,
    or the error says what was found instead), and a folder with Nunchaku's legacy
    transformer_blocks.safetensors / unquantized_layers.safetensors as that older layout.
    """
    from qdit.tools.convert_nunchaku import inspect_nunchaku_file, is_legacy_nunchaku_folder

    if os.path.isfile(path) or is_legacy_nunchaku_folder(path):
        return inspect_nunchaku_file(path)
    ckpt = open_checkpoint(path)
    adapter = adapter_for_class(ckpt.class_name, source=str(ckpt.config_file))
    fmt = formats.detect(ckpt)
    skeleton = build_skeleton(adapter, ckpt.config, torch.bfloat16)
    linears = linear_layers(skeleton)
    plan = formats.plan_for(formats.loading_source(ckpt, fmt, linears), fmt, adapter, linears, None)
    bytes_by_dtype: dict[str, int] = defaultdict(int)
    elements = 0
    for info in ckpt.tensors.values():
        n = 1
        for d in info.shape:
            n *= d
        elements += n
        bytes_by_dtype[str(info.dtype).replace("torch.", "")] += n * info.dtype.itemsize
    logical = sum(p.numel() for p in skeleton.parameters())
    return {
        "path": str(ckpt.folder),
        "model": adapter.name,
        "class_name": ckpt.class_name,
        "format": fmt.name,
        "quant_algo": fmt.quant_algo,
        "producer": fmt.modelopt.producer if fmt.modelopt else None,
        "files": [str(f) for f in ckpt.files],
        "layers": {name: lq.describe() for name, lq in plan.items()},
        "scheme_counts": dict(Counter(lq.describe() for lq in plan.values())),
        "excluded": sorted(name for name, lq in plan.items() if not lq.quantized) if fmt.name != "bf16" else [],
        "bytes_by_dtype": dict(bytes_by_dtype),
        "total_bytes": sum(bytes_by_dtype.values()),
        "parameter_count": logical,
        "stored_elements": elements,
    }
