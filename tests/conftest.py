"""Shared fixtures: tiny FLUX checkpoints (BF16 and quantized by qdit), built once per test session.

The session-scoped folders are read-only by convention: a test that edits a checkpoint copies it
first (`ckpt_variant`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

SAFETENSORS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="session")
def flux_bf16(tmp_path_factory) -> Path:
    from qdit.tools.embedded import random_model, write_bf16_checkpoint

    return write_bf16_checkpoint(random_model("flux", seed=0), tmp_path_factory.mktemp("ckpt") / "flux-bf16")


def _quantized(flux_bf16: Path, tmp_path_factory, fmt: str) -> Path:
    from qdit.tools.quantize import quantize_checkpoint

    return quantize_checkpoint(flux_bf16, tmp_path_factory.mktemp("ckpt") / f"flux-{fmt}", fmt)


@pytest.fixture(scope="session")
def flux_fp8(flux_bf16, tmp_path_factory) -> Path:
    return _quantized(flux_bf16, tmp_path_factory, "fp8")


@pytest.fixture(scope="session")
def flux_nvfp4(flux_bf16, tmp_path_factory) -> Path:
    return _quantized(flux_bf16, tmp_path_factory, "nvfp4")


@pytest.fixture
def ckpt_variant(tmp_path):
    """make(src, name, tensors=None, config=None) -> a copy of checkpoint `src` under tmp_path.

    `tensors` (name -> tensor) replaces the whole safetensors file; `config` replaces config.json.
    """

    def make(src: Path, name: str = "variant", *, tensors: dict | None = None, config: dict | None = None) -> Path:
        dst = tmp_path / name
        shutil.copytree(src, dst)
        if tensors is not None:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst / SAFETENSORS),
                      metadata={"format": "pt"})
        if config is not None:
            (dst / "config.json").write_text(json.dumps(config, indent=2))
        return dst

    return make


@pytest.fixture(scope="session")
def flux_forward():
    """forward(model) -> the FLUX sample tensor for fixed seeded example inputs."""
    from qdit.models import adapter_by_name

    adapter = adapter_by_name("flux")

    def forward(model: torch.nn.Module) -> torch.Tensor:
        inputs = adapter.example_inputs(dict(model.config), height=128, width=128, text_tokens=8)
        with torch.no_grad():
            return adapter.output_tensor(model(**inputs))

    return forward
