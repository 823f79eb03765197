"""`qdit quantize`: a BF16 transformer quantized at load, calibrated, written as a ModelOpt export."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch

from qdit.api import load_transformer
from qdit.errors import CheckpointError, QditError
from qdit.formats.checkpoint import open_checkpoint
from qdit.models import adapter_for_class
from qdit.quant.calibration import calibrate_static_input_scales
from qdit.tools.save import save_modelopt_export

log = logging.getLogger("qdit.tools")


def synthetic_calibration_inputs(adapter, config, device) -> list[dict]:
    """The adapter's example inputs (seeded noise): enough to set activation ranges of random-weight
    models and to make the round trip exact; real models should be calibrated on real prompts."""
    return [adapter.example_inputs(config, device=device, seed=seed) for seed in range(2)]


def quantize_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, fmt: str, *, device: str = "cpu",
                        calibration: str = "synthetic", calibration_inputs: list[dict] | None = None) -> Path:
    ckpt = open_checkpoint(src)
    adapter = adapter_for_class(ckpt.class_name, source=str(ckpt.config_file))
    model = load_transformer(src, device=device, quantize=fmt)
    if calibration_inputs is None:
        if calibration != "synthetic":
            raise ValueError(f"unknown calibration source {calibration!r}")
        log.warning("calibrating activation scales on synthetic inputs (the model's example inputs)")
        calibration_inputs = synthetic_calibration_inputs(adapter, dict(model.config), device)
    with torch.no_grad():
        calibrate_static_input_scales(model, lambda m, inputs: m(**inputs), calibration_inputs)
    return save_modelopt_export(model, dst)


def quantize_pipeline(src: str | os.PathLike, dst: str | os.PathLike, fmt: str, *, device: str = "cpu") -> Path:
    """A whole pipeline folder: the transformer quantized (ModelOpt export layout), the rest copied."""
    src, dst = Path(src), Path(dst)
    if not (src / "model_index.json").is_file():
        raise CheckpointError("not a diffusers pipeline folder: model_index.json is missing", file=str(src),
                              hint="use `qdit quantize SRC DST` (without --pipeline) for a transformer folder")
    if dst.exists() and any(dst.iterdir()):
        raise QditError(f"{dst} exists and is not empty; choose a new output folder")
    quantize_checkpoint(src / "transformer", dst / "transformer", fmt, device=device)
    for entry in src.iterdir():
        if entry.name == "transformer":
            continue
        if entry.is_dir():
            shutil.copytree(entry, dst / entry.name)
        else:
            shutil.copy2(entry, dst / entry.name)
    return dst
