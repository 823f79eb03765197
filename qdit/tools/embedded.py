"""The embedded default: tiny BF16 checkpoints of each served DiT, built from configs (no download).

Weights are random (seeded); they exercise every code path but draw nothing meaningful.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from qdit.models import adapter_by_name

CACHE_ENV = "QDIT_CACHE"


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "qdit")


def random_model(adapter_name: str, *, seed: int = 0, config: dict | None = None, dtype=torch.bfloat16):
    """A diffusers model of the adapter's class with seeded random weights.

    diffusers zero-initialises some output and modulation layers; every Linear gets a scaled normal
    init instead so that each layer (and each quantization error) reaches the output.
    """
    adapter = adapter_by_name(adapter_name)
    torch.manual_seed(seed)
    model = adapter.model_class().from_config(config or adapter.tiny_config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                k = module.in_features
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) / k**0.5)
                if module.bias is not None:
                    module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.02)
    return model.to(dtype).eval()


def write_bf16_checkpoint(model: torch.nn.Module, dst: str | os.PathLike) -> Path:
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    config = {"_class_name": type(model).__name__, **{k: v for k, v in dict(model.config).items()
                                                      if not k.startswith("_")}}
    with open(dst / "config.json", "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, default=list)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(dst / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    return dst


def tiny_checkpoint(adapter_name: str = "qwen-image", *, seed: int = 0) -> Path:
    """The tiny BF16 checkpoint of a model, created once into the cache directory."""
    dst = cache_dir() / "embedded" / f"{adapter_name}-tiny-seed{seed}"
    if not (dst / "config.json").is_file():
        tmp = dst.with_name(dst.name + f".tmp{os.getpid()}")
        write_bf16_checkpoint(random_model(adapter_name, seed=seed), tmp)
        tmp.replace(dst) if not dst.exists() else None
    return dst
