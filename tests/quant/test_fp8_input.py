"""qdit.quant.fp8_input: an E4M3 activation reaches a Linear as codes where its backend multiplies them, else
dequantized. The svdq-hopper arithmetic is checked on the GPU (tests/kernels/test_svdquant_hopper_gpu.py)."""

import torch
from torch import nn

from qdit.api import random_transformer
from qdit.kernels.attention_fp8 import quantize_per_tensor
from qdit.quant.fp8_input import FP8Activation, linear, take_rows
from qdit.quant.layer import QuantLinear


def activation(b=1, s=6, k=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    codes, scale = quantize_per_tensor(torch.randn(b, s, k, generator=gen).bfloat16())
    return FP8Activation(codes, scale, torch.bfloat16)


def test_dequantize_and_rows():
    act = activation(b=2)
    value = act.dequantize()
    assert value.dtype == torch.bfloat16
    assert torch.equal(value, (act.codes.float() * act.scale).to(torch.bfloat16).reshape(value.shape))
    part = take_rows(act, 2, 5)
    assert part.codes.is_contiguous() and part.scale is act.scale
    assert torch.equal(part.dequantize(), value[:, 2:5])
    assert torch.equal(take_rows(value, 2, None), value[:, 2:])


def test_a_bf16_linear_gets_the_dequantized_activation():
    layer = nn.Linear(32, 8).bfloat16()
    act = activation()
    assert torch.equal(linear(layer, act), layer(act.dequantize()))
    x = torch.randn(1, 3, 32).bfloat16()
    assert torch.equal(linear(layer, x), layer(x))


class CodesBackend:
    """Records what it was handed; takes FP8 input where told."""

    name = "codes"

    def __init__(self, takes):
        self.takes, self.calls = takes, []

    def takes_fp8_input(self, layer):
        return self.takes

    def apply_fp8_input(self, layer, codes, scale):
        self.calls.append(("codes", codes, scale))
        return torch.zeros(*codes.shape[:-1], layer.out_features)

    def apply(self, layer, x):
        self.calls.append(("value", x))
        return torch.ones(*x.shape[:-1], layer.out_features)


def test_a_quantized_linear_gets_codes_only_where_its_backend_takes_them():
    model = random_transformer("qwen-image", quantize="fp8", quantize_layers="blocks")
    layer = next(m for m in model.modules() if isinstance(m, QuantLinear))
    act = activation(k=layer.in_features)
    layer.backend = CodesBackend(takes=True)
    out = linear(layer, act)
    (kind, codes, scale), = layer.backend.calls
    assert kind == "codes" and codes is act.codes and scale is act.scale and not out.any()
    layer.backend = CodesBackend(takes=False)
    out = linear(layer, act)
    (kind, value), = layer.backend.calls
    assert kind == "value" and torch.equal(value, act.dequantize()) and out.all()
