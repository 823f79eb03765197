"""The embedded default: tiny BF16 checkpoints of each served DiT, built from configs (no download).

Weights are random (seeded); they exercise every code path but draw nothing meaningful.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

CACHE_ENV = "QDIT_CACHE"


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "qdit")


def random_model(adapter_name: str, *, seed: int = 0, config: dict | None = None, dtype=torch.bfloat16):
    """A diffusers model of the adapter's class with seeded random weights, on the CPU.

    The weights come from the loader's RandomWeights (one random-init recipe for tiny checkpoints,
    tests and full-size benchmarks): every Linear gets a scaled normal init, where diffusers would
    zero some output and modulation layers, so each layer and each quantization error reaches the output.
    """
    from qdit.api import random_transformer

    return random_transformer(adapter_name, config=config, device="cpu", dtype=dtype, seed=seed)


def write_bf16_checkpoint(model: torch.nn.Module, dst: str | os.PathLike) -> Path:
    """A plain diffusers transformer folder (config.json + diffusion_pytorch_model.safetensors)."""
    model.save_pretrained(dst)
    return Path(dst)


def tiny_checkpoint(adapter_name: str = "qwen-image", *, seed: int = 0) -> Path:
    """The tiny BF16 checkpoint of a model, created once into the cache directory."""
    dst = cache_dir() / "embedded" / f"{adapter_name}-tiny-seed{seed}"
    if not (dst / "config.json").is_file():
        tmp = dst.with_name(dst.name + f".tmp{os.getpid()}")
        write_bf16_checkpoint(random_model(adapter_name, seed=seed), tmp)
        tmp.replace(dst) if not dst.exists() else None
    return dst
