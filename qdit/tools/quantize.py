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
                        calibration: str = "synthetic", calibration_inputs: list[dict] | None = None,
                        quantize_layers: str = "recipe") -> Path:
    """A BF16 transformer folder quantized to `fmt` (the Linears quantize_layers picks, as
    load_transformer), activation scales calibrated, written in ModelOpt's export layout (its ignore
    list names every Linear left in BF16)."""
    ckpt = open_checkpoint(src)
    adapter = adapter_for_class(ckpt.class_name, source=str(ckpt.config_file))
    model = load_transformer(src, device=device, quantize=fmt, quantize_layers=quantize_layers)
    if calibration_inputs is None:
        if calibration != "synthetic":
            raise ValueError(f"unknown calibration source {calibration!r}")
        log.warning("calibrating activation scales on synthetic inputs (the model's example inputs)")
        calibration_inputs = synthetic_calibration_inputs(adapter, dict(model.config), device)
    with torch.no_grad():
        calibrate_static_input_scales(model, lambda m, inputs: m(**inputs), calibration_inputs)
    return save_modelopt_export(model, dst)


@torch.no_grad()
def pipeline_calibration_inputs(pipe, prompts: list[str], *, steps: int = 20, guidance: float | None = None,
                                negative_prompt: str | None = None, height: int = 512, width: int = 512,
                                seed: int = 0) -> list[dict]:
    """Every transformer call (keyword inputs, as the pipeline made them) while `pipe` generates `prompts`:
    real text embeddings, latents and timesteps across the whole schedule."""
    captured: list[dict] = []

    def keep(module, args, kwargs):
        if args:
            raise QditError(f"{type(module).__name__} was called with positional inputs; calibration capture "
                            "expects the keyword call diffusers pipelines make")
        captured.append({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})

    from qdit.models import adapter_for_class

    adapter = adapter_for_class(type(pipe.transformer).__name__, source=type(pipe.transformer).__name__)
    extra: dict = {adapter.guidance_argument: guidance} if guidance is not None else {}
    if negative_prompt is not None:
        extra["negative_prompt"] = negative_prompt
    handle = pipe.transformer.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        pipe.set_progress_bar_config(disable=True)
        for i, prompt in enumerate(prompts):
            pipe(prompt=prompt, height=height, width=width, num_inference_steps=steps,
                 generator=torch.Generator().manual_seed(seed + i), output_type="latent", **extra)
    finally:
        handle.remove()
    return captured


def read_prompts(path: str | os.PathLike) -> list[str]:
    """One prompt per non-empty line."""
    try:
        prompts = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except OSError as e:
        raise QditError(f"cannot read prompts file {path}: {e}") from e
    if not prompts:
        raise QditError(f"prompts file {path} has no prompts (expected one per line)")
    return prompts


def quantize_pipeline(src: str | os.PathLike, dst: str | os.PathLike, fmt: str, *, device: str = "cpu",
                      calibration_prompts: list[str] | None = None, height: int = 512, width: int = 512,
                      quantize_layers: str = "recipe") -> Path:
    """A whole pipeline folder: the transformer quantized (ModelOpt export layout), the rest copied.

    calibration_prompts: static activation scales are set from the transformer inputs the BF16
    pipeline produces for these prompts (20 steps, at height x width); without them, from synthetic inputs.
    """
    src, dst = Path(src), Path(dst)
    if not (src / "model_index.json").is_file():
        raise CheckpointError("not a diffusers pipeline folder: model_index.json is missing", file=str(src),
                              hint="use `qdit quantize SRC DST` (without --pipeline) for a transformer folder")
    if dst.exists() and any(dst.iterdir()):
        raise QditError(f"{dst} exists and is not empty; choose a new output folder")
    inputs = None
    if calibration_prompts:
        from qdit.pipelines.load import load_pipeline

        pipe = load_pipeline(src, device=device, quantize="none")
        inputs = pipeline_calibration_inputs(pipe, calibration_prompts, height=height, width=width)
        del pipe
    quantize_checkpoint(src / "transformer", dst / "transformer", fmt, device=device, calibration_inputs=inputs,
                        quantize_layers=quantize_layers)
    for entry in src.iterdir():
        if entry.name == "transformer":
            continue
        if entry.is_dir():
            shutil.copytree(entry, dst / entry.name)
        else:
            shutil.copy2(entry, dst / entry.name)
    return dst
