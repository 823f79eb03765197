"""The reference backend: plain PyTorch, any device, written for clarity and exactness.

It reproduces the producer's quantized math (ModelOpt's fake-quant forward): activations are
quantized exactly as the producer's input quantizer does, weights are dequantized exactly, and the
product is taken in float32. Every fast backend is tested against it.
"""

from __future__ import annotations

import torch

from qdit.kernels.registry import YES, Verdict
from qdit.quant import numerics, svdquant
from qdit.quant.scheme import ActivationScale, LayerQuant, Scheme


def _fp8_per_tensor(layer, x2d: torch.Tensor) -> torch.Tensor:
    if layer.layer_quant.activation_scale is not ActivationScale.STATIC:
        # qdit's load-time FP8 without calibration: dynamic per-token activation scales.
        xq, token_scale = numerics.fp8_quantize_per_token(x2d)
        return (xq.float() @ layer.tensor("weight").float().t()) * token_scale * layer.tensor("weight_scale").float()
    input_scale = layer.tensor("input_scale").float()
    xq = numerics.fp8_quantize_static(x2d, input_scale)
    return (xq.float() @ layer.tensor("weight").float().t()) * (input_scale * layer.tensor("weight_scale").float())


def _fp8_per_channel(layer, x2d: torch.Tensor) -> torch.Tensor:
    xq, token_scale = numerics.fp8_quantize_per_token(x2d)
    return (xq.float() @ layer.tensor("weight").float().t()) * token_scale * layer.tensor("weight_scale").float()[None, :]


def _nvfp4(layer, x2d: torch.Tensor) -> torch.Tensor:
    lq = layer.layer_quant
    x = x2d.float()
    if lq.pre_quant_scale:
        # ModelOpt multiplies in the model dtype before its input quantizer.
        x = (x2d * layer.pre_quant_scale.to(x2d.dtype)).float()
    w = layer.method.dequantize(layer)
    if lq.activation_scale is ActivationScale.NONE:
        xq = x
    else:
        if lq.activation_scale is ActivationScale.STATIC:
            input_scale = layer.tensor("input_scale").float()
        else:
            input_scale = numerics.nvfp4_global_scale(x.abs().amax())
        xq = numerics.nvfp4_fake_quantize_activation(x, input_scale)
    y = xq @ w.t()
    if lq.lora_rank:
        y = y + (x @ layer.svdquant_lora_a.float().t()) @ layer.svdquant_lora_b.float().t()
    return y


class ReferenceBackend:
    name = "reference"

    def supports_device(self, device: torch.device) -> Verdict:
        return YES

    def can_implement(self, layer_quant: LayerQuant, in_features: int, out_features: int) -> Verdict:
        return YES

    def prepare(self, layer) -> None:
        return None

    def apply(self, layer, x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, x.shape[-1])
        scheme = layer.layer_quant.scheme
        if scheme in (Scheme.SVDQ_INT4, Scheme.SVDQ_NVFP4, Scheme.AWQ_W4A16):  # bias added inside
            fwd = svdquant.awq_reference_forward if scheme is Scheme.AWQ_W4A16 else svdquant.svdq_reference_forward
            y = fwd(layer, x2d)
            return y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])
        if scheme is Scheme.FP8:
            y = _fp8_per_tensor(layer, x2d)
        elif scheme is Scheme.FP8_PER_CHANNEL:
            y = _fp8_per_channel(layer, x2d)
        else:
            y = _nvfp4(layer, x2d)
        if layer.bias is not None:
            y = y + layer.bias.float()
        return y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])
