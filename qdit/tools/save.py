"""Writing a loaded qdit transformer as a diffusers folder in ModelOpt's export layout."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from qdit.errors import QditError
from qdit.formats import modelopt
from qdit.loading.loader import model_config
from qdit.quant.layer import QuantLinear

# The ModelOpt release whose export layout qdit writes (fields, key names, dtypes).
MODELOPT_LAYOUT_VERSION = "0.47.0"


def export_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Checkpoint tensors only: derived buffers (non-persistent) are not part of the format."""
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


def save_modelopt_export(model: torch.nn.Module, dst: str | os.PathLike) -> Path:
    dst = Path(dst)
    try:
        dst.mkdir(parents=True, exist_ok=True)
        probe = dst / ".qdit-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise QditError(f"cannot write to {dst}: {e}. Choose a writable output folder.") from e
    plan = model.qdit_plan
    quantized = {m.name: m.layer_quant for m in model.modules() if isinstance(m, QuantLinear)}
    plan = {name: quantized.get(name, lq) for name, lq in plan.items()}
    ranks = {lq.lora_rank for lq in plan.values() if lq.lora_rank}
    config = dict(model.config)
    config = {"_class_name": type(model).__name__, **model_config(config)}
    config["quantization_config"] = modelopt.export_quantization_config(
        plan, max(ranks) if ranks else None, MODELOPT_LAYOUT_VERSION)
    with open(dst / "config.json", "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, default=list)
    save_file(export_state_dict(model), str(dst / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    return dst
