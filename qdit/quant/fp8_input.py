"""Linears fed an activation that is already E4M3 codes with one scale per tensor: the FP8 attention's
output (qdit.kernels.attention_fp8), which its output projection reads.

Dequantized to the model dtype, such an activation is quantized again by a quantized Linear: a pass over
it and a second rounding. A backend whose `takes_fp8_input(layer)` is true multiplies the codes as they
are (`apply_fp8_input(layer, codes, scale)`); any other layer, BF16 ones included, gets the dequantized
activation, which is what BF16 attention would have handed it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from qdit.quant.layer import QuantLinear


class FP8Activation(NamedTuple):
    """codes (float8_e4m3fn, [..., K]) times scale (float32, one element) is the activation; `dtype` is
    the model dtype it stands for."""

    codes: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype

    def dequantize(self) -> torch.Tensor:
        return (self.codes.float() * self.scale.reshape(())).to(self.dtype)


def take_rows(x: torch.Tensor | FP8Activation, start: int, stop: int | None) -> torch.Tensor | FP8Activation:
    """x[:, start:stop] (a [B, S, K] activation's tokens), contiguous, as a Linear reads it."""
    if isinstance(x, FP8Activation):
        return x._replace(codes=x.codes[:, start:stop].contiguous())
    return x[:, start:stop].contiguous()


def linear(layer: nn.Module, x: torch.Tensor | FP8Activation) -> torch.Tensor:
    """layer(x), x dequantized first unless the layer's backend takes FP8 codes."""
    if not isinstance(x, FP8Activation):
        return layer(x)
    backend = layer.backend if isinstance(layer, QuantLinear) else None
    takes = getattr(backend, "takes_fp8_input", None)
    if takes is not None and takes(layer):
        return backend.apply_fp8_input(layer, x.codes, x.scale)
    return layer(x.dequantize())
