"""The quantization scheme of one Linear: what its tensors are and how its activations are quantized."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Scheme(str, Enum):
    BF16 = "bf16"  # unquantized, model dtype
    FP8 = "fp8"  # FP8 weight, per-tensor scale; FP8 activations, per-tensor scale
    FP8_PER_CHANNEL = "fp8_per_channel"  # FP8 weight, per-channel scale; FP8 activations per token (dynamic)
    NVFP4 = "nvfp4"  # NVFP4 weight and activations (W4A4)
    W4A16_NVFP4 = "w4a16_nvfp4"  # NVFP4 weight, activations in model dtype
    NVFP4_SVD = "nvfp4_svd"  # NVFP4 W4A4 residual + BF16 low-rank branch + smoothing
    # Nunchaku SVDQuant checkpoints in qdit's canonical layout (docs/nunchaku.md)
    SVDQ_INT4 = "svdq_int4"  # INT4 W4A4, per-64 group scales, smoothing divisor, low-rank on the raw input
    SVDQ_NVFP4 = "svdq_nvfp4"  # NVFP4 W4A4, per-16 E4M3 group scales, no per-tensor activation scale
    AWQ_W4A16 = "awq_w4a16"  # unsigned 4-bit weight with per-64 scales and zeros, activations unquantized


FOUR_BIT_SCHEMES = frozenset({Scheme.NVFP4, Scheme.W4A16_NVFP4, Scheme.NVFP4_SVD, Scheme.SVDQ_INT4, Scheme.SVDQ_NVFP4,
                              Scheme.AWQ_W4A16})


class ActivationScale(str, Enum):
    """Where an activation's per-tensor scale comes from."""

    NONE = "none"  # activations are not quantized, or use per-token scales computed at run time
    STATIC = "static"  # calibrated, stored in the checkpoint as input_scale
    # Computed at run time (qdit's load-time quantization without calibration): FP8 uses per-token
    # scales, NVFP4 a per-tensor global scale from the call's amax.
    DYNAMIC = "dynamic"


@dataclass(frozen=True)
class LayerQuant:
    """Everything a method needs to know to create a layer's tensors."""

    scheme: Scheme
    activation_scale: ActivationScale = ActivationScale.NONE
    pre_quant_scale: bool = False  # NVFP4 family: input multiplied by a per-channel vector first
    lora_rank: int = 0  # NVFP4_SVD / SVDQ_*: rank of the low-rank branch
    # SVDQ_*: which optional per-tensor (wtscale) / per-row (wcscales) weight scales the layer stores,
    # and whether its input is a GELU output quantized shifted and unsigned (INT4 only).
    wtscale: bool = False
    wcscales: bool = False
    gelu_shift: bool = False
    # A part of a diffusers Linear split along its inputs (FLUX single blocks' proj_out in Nunchaku
    # checkpoints): this layer reads inputs [start, stop) of its parent; the parent sums its parts.
    k_slice: tuple[int, int] | None = None

    @property
    def quantized(self) -> bool:
        return self.scheme is not Scheme.BF16

    def describe(self) -> str:
        parts = [self.scheme.value]
        if self.activation_scale is ActivationScale.DYNAMIC:
            parts.append("dynamic-act")
        if self.pre_quant_scale and self.scheme is not Scheme.NVFP4_SVD:
            parts.append("smoothed")
        if self.lora_rank:
            parts.append(f"r{self.lora_rank}")
        if self.gelu_shift:
            parts.append("gelu-shift")
        if self.k_slice is not None:
            parts.append(f"k{self.k_slice[0]}:{self.k_slice[1]}")
        return "+".join(parts)


UNQUANTIZED = LayerQuant(Scheme.BF16)


def default_layer_quant(scheme: Scheme, *, static: bool, lora_rank: int = 32) -> LayerQuant:
    """The LayerQuant a whole-model format implies (before per-layer refinements)."""
    if scheme is Scheme.BF16:
        return UNQUANTIZED
    act = ActivationScale.STATIC if static else ActivationScale.DYNAMIC
    if scheme is Scheme.FP8:
        return LayerQuant(scheme, act)
    if scheme is Scheme.FP8_PER_CHANNEL:
        return LayerQuant(scheme, ActivationScale.NONE)
    if scheme is Scheme.NVFP4:
        return LayerQuant(scheme, act)
    if scheme is Scheme.W4A16_NVFP4:
        return LayerQuant(scheme, ActivationScale.NONE)
    if scheme is Scheme.NVFP4_SVD:
        return LayerQuant(scheme, act, pre_quant_scale=True, lora_rank=lora_rank)
    if scheme in (Scheme.SVDQ_INT4, Scheme.SVDQ_NVFP4):  # Nunchaku's layout, made at load
        return LayerQuant(scheme, lora_rank=lora_rank, wtscale=scheme is Scheme.SVDQ_NVFP4)
    if scheme is Scheme.AWQ_W4A16:
        return LayerQuant(scheme)
    raise ValueError(scheme)
