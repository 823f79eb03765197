"""The one typed configuration shared by the CLI, the Python API and YAML files.

Every field is used: loading fields by qdit.load_pipeline, generation fields by qdit.generate (and
both by `qdit generate`). A YAML file holds a flat mapping of these fields; an unknown key is an error.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from qdit.errors import QditError

QUANTIZE_CHOICES = ("auto", "none", "fp8", "fp8_per_channel", "nvfp4", "w4a16_nvfp4", "nvfp4_svd",
                    "mixed_fp8_nvfp4", "svdq_int4", "svdq_nvfp4")
# Which Linears load-time quantization covers. "recipe": those the format's producer quantizes (ModelOpt's
# example recipe for the model, which keeps some large layers in BF16; Nunchaku's: every block Linear).
# "blocks": every Linear of the repeated blocks, as Nunchaku's checkpoints do; embedders and the output
# layers stay BF16 either way.
QUANTIZE_LAYERS_CHOICES = ("recipe", "blocks")
DTYPES = ("bfloat16", "float16", "float32")
ATTENTION_CHOICES = ("bf16", "fp8")
# How 4-bit layers that a GPU multiplies as FP8 (Hopper and Ada have no FP4 tensor cores) keep their weight:
# "packed" (4-bit codes resident, expanded to FP8 on every call: least memory) or "expanded_fp8" (expanded
# once at load, codes released: an FP8 checkpoint's memory, no expansion per call).
WEIGHTS_4BIT_CHOICES = ("packed", "expanded_fp8")


@dataclass(frozen=True)
class QditConfig:
    # loading
    quantize: str = "auto"  # auto: as the checkpoint says; none: BF16 checkpoint as is; else quantize at load
    quantize_layers: str = "recipe"  # with a load-time format: recipe (the producer's layers) or blocks
    backend: str | None = None  # force a kernel backend (default: chosen per layer)
    dtype: str = "bfloat16"  # compute dtype of the pipeline
    text_encoder_fp8: bool = False  # store text-encoder Linear weights in FP8
    vae_fp8: bool = False  # store VAE Linear/Conv weights in FP8
    compile: bool = False  # torch.compile each repeated transformer block (fullgraph)
    cuda_graph: bool = False  # replay the transformer's forward from CUDA graphs (GPU; one capture per shape)
    attention: str = "bf16"  # fp8: cuDNN's FP8 attention in the transformer (Qwen-Image, Z-Image, FLUX)
    weights_4bit: str = "packed"  # packed or expanded_fp8 (see WEIGHTS_4BIT_CHOICES)
    # generation
    steps: int = 20
    guidance: float | None = None  # None: the pipeline's default
    height: int = 512
    width: int = 512
    seed: int = 0
    negative_prompt: str | None = None
    num_images: int = 1

    def __post_init__(self):
        if self.quantize not in QUANTIZE_CHOICES:
            raise QditError(f"config: quantize={self.quantize!r} is not one of {', '.join(QUANTIZE_CHOICES)}")
        if self.quantize_layers not in QUANTIZE_LAYERS_CHOICES:
            raise QditError(f"config: quantize_layers={self.quantize_layers!r} is not one of "
                            f"{', '.join(QUANTIZE_LAYERS_CHOICES)}")
        if self.attention not in ATTENTION_CHOICES:
            raise QditError(f"config: attention={self.attention!r} is not one of {', '.join(ATTENTION_CHOICES)}")
        if self.weights_4bit not in WEIGHTS_4BIT_CHOICES:
            raise QditError(f"config: weights_4bit={self.weights_4bit!r} is not one of {', '.join(WEIGHTS_4BIT_CHOICES)}")
        if self.dtype not in DTYPES:
            raise QditError(f"config: dtype={self.dtype!r} is not one of {', '.join(DTYPES)}")
        for name in ("steps", "height", "width", "num_images"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise QditError(f"config: {name} must be a positive integer, got {getattr(self, name)!r}")
        if self.height % 16 or self.width % 16:
            raise QditError(f"config: height and width must be multiples of 16, got {self.height}x{self.width}")

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)

    def replace(self, **overrides: Any) -> "QditConfig":
        """A copy with the given fields changed; None values leave a field as it is."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise QditError(f"unknown option(s) {', '.join(unknown)}; known options: {', '.join(sorted(known))}")
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "QditConfig":
        p = Path(path)
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except OSError as e:
            raise QditError(f"cannot read config file {p}: {e}") from e
        except yaml.YAMLError as e:
            raise QditError(f"config file {p} is not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise QditError(f"config file {p} must hold a mapping of options, found {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise QditError(f"config file {p}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(known))}")
        try:
            return cls(**data)
        except TypeError as e:
            raise QditError(f"config file {p}: {e}") from e


def resolve_config(config: QditConfig | str | os.PathLike | None, overrides: dict[str, Any]) -> QditConfig:
    if config is None:
        base = QditConfig()
    elif isinstance(config, QditConfig):
        base = config
    else:
        base = QditConfig.from_yaml(config)
    return base.replace(**overrides)
