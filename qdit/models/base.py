"""What qdit needs to know about a diffusers DiT class: one small adapter per model."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from qdit.config import ATTENTION_CHOICES
from qdit.errors import QditError
from qdit.kernels.attention_fp8 import check_fp8_attention
from qdit.models.activations import defer_gelu_to_next_linear, install_tanh_gelu
from qdit.quant.shared_input import fuse_shared_inputs


@dataclass(frozen=True)
class ModelAdapter:
    """Facts about one diffusers transformer class.

    name: short name used by the CLI and configs ("qwen-image").
    class_name: the diffusers class, as written in config.json's "_class_name".
    is_excluded_by_default: (layer name, model config) -> True for Linears kept in BF16 when qdit
        quantizes a BF16 checkpoint; follows ModelOpt's diffusers example recipe for the model.
    tiny_config: a small config of the same architecture, for tests and the embedded default.
    full_config: the published model's config (for benchmarks with random weights).
    example_inputs: builds the forward's keyword arguments for a batch / resolution / text length.
    """

    name: str
    class_name: str
    is_excluded_by_default: Callable[[str, dict[str, Any]], bool]
    tiny_config: dict[str, Any]
    full_config: dict[str, Any]
    example_inputs: Callable[..., dict[str, Any]]
    # Modules repeated along the depth of the model (compiled one by one when asked).
    block_lists: tuple[str, ...] = field(default=())
    # The diffusers pipeline class and the name of its classifier-free-guidance argument.
    pipeline_class: str = ""
    guidance_argument: str = "guidance_scale"
    # Linears fed only the conditioning vector (timestep embedding, and for FLUX the pooled text and
    # guidance): one row per image, whatever the resolution, so at batch 1 they are matrix-vector
    # products that read their whole weight every step. `qdit bench` reports their share of a step.
    conditioning_linears: str = r"(?!)"
    # The text length `qdit bench` uses unless told otherwise: the model's usual prompt embedding length.
    bench_text_tokens: int = 256
    # Builds qdit's attention processor for the model's Attention modules (diffusers' math, written so
    # that torch.compile fuses it: qdit.models.rotary); None keeps diffusers' own.
    attention_processor: Callable[..., Any] | None = None

    def install_compile_friendly_modules(self, model: torch.nn.Module, attention: str = "bf16") -> None:
        """qdit's attention processor and tanh-GELU modules on a loaded transformer: diffusers' math,
        written so that torch.compile fuses it (qdit.models.rotary, qdit.models.activations); the MLPs'
        GELU deferred to the output Linear's input quantization where its backend can.
        attention="fp8": the processor computes attention in FP8 (qdit.kernels.attention_fp8)."""
        if attention not in ATTENTION_CHOICES:
            raise QditError(f"attention={attention!r} is not one of {', '.join(ATTENTION_CHOICES)}")
        if attention == "fp8":
            if self.attention_processor is None:
                raise QditError(f"attention='fp8' is not available for {self.class_name} yet (qdit has no "
                                f"attention processor of its own for it); use attention='bf16'")
            check_fp8_attention(next(model.parameters()).device, self.class_name)
        if self.attention_processor is not None:
            self.attention_processor.check_model(model)
        install_tanh_gelu(model)
        defer_gelu_to_next_linear(model)
        if self.attention_processor is None:
            return
        # Per Attention module, through diffusers' set_processor (Z-Image's model class has no
        # set_attn_processor); one processor instance is shared, as set_attn_processor would.
        processor = self.attention_processor(fp8=attention == "fp8")
        attention_modules = [m for m in model.modules() if hasattr(m, "set_processor") and hasattr(m, "processor")]
        for module in attention_modules:
            module.set_processor(processor)
        # The processor computes each group of projections reading one input through
        # qdit.quant.shared_input.project, which uses the fused module where a backend made one.
        fuse_shared_inputs(attention_modules, processor.shared_input_groups)

    def is_kept_in_bf16(self, layer_name: str, config: dict[str, Any], quantize_layers: str) -> bool:
        """Whether load-time quantization leaves a Linear in BF16: by the model's recipe
        (is_excluded_by_default), or with quantize_layers="blocks" when it is outside the repeated blocks."""
        if quantize_layers == "blocks":
            return not layer_name.startswith(tuple(f"{b}." for b in self.block_lists))
        return self.is_excluded_by_default(layer_name, config)

    def is_conditioning_linear(self, layer_name: str) -> bool:
        return re.search(self.conditioning_linears, layer_name) is not None

    def model_class(self):
        import diffusers

        return getattr(diffusers, self.class_name)

    def output_tensor(self, output) -> torch.Tensor:
        """The forward's sample tensor, whatever container diffusers returned."""
        sample = output[0] if isinstance(output, (tuple, list)) else output.sample
        if isinstance(sample, (list, tuple)):  # Z-Image returns one tensor per batch item
            return torch.stack(list(sample))
        return sample
