"""The NVFP4 routes' host-side plumbing (per-row FP8 scales, tensor and channel scales, smoothing, bias,
low-rank branch), shared by nvfp4-hopper and svdq-hopper, checked on the CPU: the Triton kernels are
replaced by plain-torch equivalents of what they compute (the GPU tests check the kernels themselves)."""

import pytest
import torch

from qdit.kernels import nvfp4_hopper
from qdit.kernels.nvfp4_hopper import NVFP4HopperBackend, SMALL_M
from qdit.kernels.svdquant_hopper import SVDQuantHopperBackend
from qdit.quant import numerics
from qdit.quant.layer import QuantLinear
from qdit.quant.scheme import ActivationScale, LayerQuant, Scheme

K, N = 256, 384


def _dequantize(packed, block_scale, global_scale):
    return numerics.nvfp4_dequantize(numerics.unpack_nibbles(packed), block_scale, global_scale)


def _w4a16(x, weight, block_scale, global_scale, bias):
    y = x.float() @ _dequantize(weight, block_scale, global_scale).t()
    return (y if bias is None else y + bias.float()).to(x.dtype)


def _expand(weight, block_scale, row_factor):
    return numerics.to_e4m3(_dequantize(weight, block_scale, torch.ones(())) * row_factor[:, None])


@pytest.fixture(autouse=True)
def torch_kernels(monkeypatch):
    monkeypatch.setattr(nvfp4_hopper, "nvfp4_w4a16_gemm", _w4a16)
    monkeypatch.setattr(nvfp4_hopper, "nvfp4_expand_fp8", _expand)
    monkeypatch.setattr(nvfp4_hopper, "fp8_quant_per_token", numerics.fp8_quantize_per_token)


def _layer(lq, gen):
    layer = QuantLinear("test", K, N, True, lq, torch.bfloat16)
    w = torch.randn(N, K, generator=gen).to(torch.bfloat16) / K**0.5
    for name, t in layer.method.quantize_weight(layer, w).items():
        layer.set_tensor(name, t)
    layer.set_tensor("bias", (torch.randn(N, generator=gen) * 0.5).to(torch.bfloat16))
    return layer


def modelopt_svd_layer(gen):
    layer = _layer(LayerQuant(Scheme.NVFP4_SVD, ActivationScale.STATIC, pre_quant_scale=True, lora_rank=32), gen)
    layer.set_tensor("pre_quant_scale", torch.rand(K, generator=gen) + 0.5)
    layer.set_tensor("input_scale", torch.tensor(1.0))
    smooth = layer.tensor("pre_quant_scale").float()

    def exact(x):  # x * s through the NVFP4 weight and the low-rank branch, activations unquantized
        xs = x.float() * smooth
        return (xs @ layer.method.dequantize(layer).t() + layer.bias.float()
                + xs @ layer.tensor("svdquant_lora_a").float().t() @ layer.tensor("svdquant_lora_b").float().t())
    return NVFP4HopperBackend(), layer, exact


def nunchaku_nvfp4_layer(gen):
    layer = _layer(LayerQuant(Scheme.SVDQ_NVFP4, lora_rank=32, wtscale=True, wcscales=True), gen)
    layer.set_tensor("wcscales", (torch.rand(N, generator=gen) + 0.5).to(torch.bfloat16))
    layer.set_tensor("smooth_factor", (torch.rand(K, generator=gen) + 0.5).to(torch.bfloat16))

    def exact(x):  # x / smooth through the weight (wcscales included), the low-rank branch on x itself
        return ((x.float() / layer.tensor("smooth_factor").float()) @ layer.method.dequantize(layer).t()
                + layer.bias.float()
                + x.float() @ layer.tensor("proj_down").float() @ layer.tensor("proj_up").float().t())
    return SVDQuantHopperBackend(), layer, exact


@pytest.mark.parametrize("make", [modelopt_svd_layer, nunchaku_nvfp4_layer])
@pytest.mark.parametrize("m,bound", [(1, 0.01), (SMALL_M, 0.01), (SMALL_M + 1, 0.06), (200, 0.06)])
def test_routes_compute_the_layer(make, m, bound):
    """W4A16 (M <= SMALL_M) differs from the unquantized-activation layer only by bf16 rounding; W4A8 by
    FP8 activation and weight rounding. A lost channel scale, bias or smoothing costs far more."""
    gen = torch.Generator().manual_seed(m)
    backend, layer, exact = make(gen)
    backend.prepare(layer)
    x = torch.randn(m, K, generator=gen).to(torch.bfloat16)
    got = backend.apply(layer, x).float()
    want = exact(x)
    assert ((got - want).norm() / want.norm()).item() < bound
