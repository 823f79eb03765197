"""Static activation scales from calibration: run inputs through the model, record each layer's input amax."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Iterable

import torch
from torch import nn

from qdit.quant import numerics
from qdit.quant.layer import QuantLinear
from qdit.quant.methods import method_for
from qdit.quant.scheme import ActivationScale, Scheme


def _quantizer_input(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """What the layer's activation quantizer sees: the input, smoothed where the scheme smooths."""
    if layer.layer_quant.pre_quant_scale:
        return x * layer.pre_quant_scale.to(x.dtype)
    return x


@torch.no_grad()
def calibrate_static_input_scales(model: nn.Module, forward, batches: Iterable[dict[str, Any]]) -> int:
    """Turn every dynamic-activation QuantLinear into a static one with input_scale from observed amax.

    `forward(model, inputs)` runs one calibration batch. Returns how many layers were calibrated.
    """
    layers = [m for m in model.modules()
              if isinstance(m, QuantLinear) and m.layer_quant.activation_scale is ActivationScale.DYNAMIC]
    amax: dict[QuantLinear, torch.Tensor] = {}

    def observe(layer, args):
        seen = _quantizer_input(layer, args[0]).abs().amax().float()
        amax[layer] = torch.maximum(amax[layer], seen) if layer in amax else seen

    handles = [layer.register_forward_pre_hook(observe) for layer in layers]
    try:
        for inputs in batches:
            forward(model, inputs)
    finally:
        for h in handles:
            h.remove()
    for layer in layers:
        if layer not in amax:
            raise RuntimeError(f"calibration never reached layer {layer.name}; give inputs that run the whole model")
        top = numerics.E4M3_MAX if layer.layer_quant.scheme is Scheme.FP8 else numerics.E2M1_MAX * numerics.E4M3_MAX
        scale = torch.where(amax[layer] > 0, amax[layer] / top, torch.ones_like(amax[layer]))
        static = replace(layer.layer_quant, activation_scale=ActivationScale.STATIC)
        layer.layer_quant = static
        layer.method = method_for(static, layer.in_features, layer.out_features, layer.bias is not None)
        layer.set_tensor("input_scale", scale)
        layer.backend.prepare(layer)
    return len(layers)
