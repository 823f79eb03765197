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
from qdit.quant.svdquant import GELU_SHIFT, int4_decode

K, N = 256, 384


def _dequantize(packed, block_scale, global_scale):
    return numerics.nvfp4_dequantize(numerics.unpack_nibbles(packed), block_scale, global_scale)


def _w4a16(x, weight, block_scale, global_scale, bias):
    y = x.float() @ _dequantize(weight, block_scale, global_scale).t()
    return (y if bias is None else y + bias.float()).to(x.dtype)


def _expand(weight, scales, row_factor, int4):
    if int4:
        codes = int4_decode(numerics.unpack_nibbles(weight))
        return numerics.to_e4m3(codes * scales.float().repeat_interleave(64, dim=1) * row_factor[:, None])
    return numerics.to_e4m3(_dequantize(weight, scales, torch.ones(())) * row_factor[:, None])


@pytest.fixture(autouse=True)
def torch_kernels(monkeypatch):
    monkeypatch.setattr(nvfp4_hopper, "nvfp4_w4a16_gemm", _w4a16)
    monkeypatch.setattr(nvfp4_hopper, "w4_expand_fp8", _expand)
    monkeypatch.setattr(nvfp4_hopper, "quantize_per_token", numerics.fp8_quantize_per_token)
    monkeypatch.setattr(nvfp4_hopper, "quantize_static", numerics.fp8_quantize_static)


def _layer(lq, gen):
    layer = QuantLinear("test", K, N, True, lq, torch.bfloat16)
    w = torch.randn(N, K, generator=gen).to(torch.bfloat16) / K**0.5
    for name, t in layer.method.quantize_weight(layer, w).items():
        layer.set_tensor(name, t)
    layer.set_tensor("bias", (torch.randn(N, generator=gen) * 0.5).to(torch.bfloat16))
    return layer


CALIBRATED_AMAX = 7.0  # about the amax of the smoothed test inputs (randn * smoothing up to 1.5)


def modelopt_svd_layer(gen):
    layer = _layer(LayerQuant(Scheme.NVFP4_SVD, ActivationScale.STATIC, pre_quant_scale=True, lora_rank=32), gen)
    layer.set_tensor("pre_quant_scale", torch.rand(K, generator=gen) + 0.5)
    layer.set_tensor("input_scale", torch.tensor(CALIBRATED_AMAX / (6 * 448)))
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


def nunchaku_int4_layer(gen, gelu_shift=False):
    layer = _layer(LayerQuant(Scheme.SVDQ_INT4, lora_rank=32, gelu_shift=gelu_shift), gen)
    layer.set_tensor("smooth_factor", (torch.rand(K, generator=gen) + 0.5).to(torch.bfloat16))
    shift = GELU_SHIFT if gelu_shift else 0.0

    def exact(x):  # (x [+ GELU shift]) / smooth through the weight, the low-rank branch on x itself
        return (((x.float() + shift) / layer.tensor("smooth_factor").float()) @ layer.method.dequantize(layer).t()
                + layer.bias.float()
                + x.float() @ layer.tensor("proj_down").float() @ layer.tensor("proj_up").float().t())
    return SVDQuantHopperBackend(), layer, exact


def nunchaku_int4_gelu_layer(gen):
    return nunchaku_int4_layer(gen, gelu_shift=True)


@pytest.mark.parametrize("make", [nunchaku_int4_layer, nunchaku_int4_gelu_layer])
@pytest.mark.parametrize("m", [1, SMALL_M + 1, 200])
def test_int4_w4a8_route_computes_the_layer(make, m):
    """svdq-hopper's INT4 route (every M): FP8 activations (shift and smoothing applied first) times the
    INT4 weight expanded to FP8; only FP8 rounding separates it from the unquantized-activation layer."""
    gen = torch.Generator().manual_seed(m)
    backend, layer, exact = make(gen)
    backend.prepare(layer)
    x = torch.randn(m, K, generator=gen).to(torch.bfloat16)
    if layer.layer_quant.gelu_shift:
        x = torch.nn.functional.gelu(x, approximate="tanh")
    want = exact(x)
    assert ((backend.apply(layer, x).float() - want).norm() / want.norm()).item() < 0.06


def modelopt_w4a16_layer(gen):
    layer = _layer(LayerQuant(Scheme.W4A16_NVFP4), gen)

    def exact(x):
        return x.float() @ layer.method.dequantize(layer).t() + layer.bias.float()
    return NVFP4HopperBackend(), layer, exact


W4A8_BOUND = 0.06  # FP8 activation and weight rounding


@pytest.mark.parametrize("make,m,bound", [
    (modelopt_w4a16_layer, 1, 0.01), (modelopt_w4a16_layer, SMALL_M, 0.01),  # W4A16: bf16 rounding only
    (modelopt_w4a16_layer, SMALL_M + 1, W4A8_BOUND),
    *[(make, m, W4A8_BOUND) for make in (modelopt_svd_layer, nunchaku_nvfp4_layer) for m in (1, SMALL_M + 1, 200)],
])
def test_routes_compute_the_layer(make, m, bound):
    """W4A16 (weight-only layers, M <= SMALL_M) differs from the unquantized-activation layer only by bf16
    rounding; W4A8 by FP8 activation and weight rounding. A lost channel scale, bias or smoothing costs
    far more."""
    gen = torch.Generator().manual_seed(m)
    backend, layer, exact = make(gen)
    backend.prepare(layer)
    x = torch.randn(m, K, generator=gen).to(torch.bfloat16)
    got = backend.apply(layer, x).float()
    want = exact(x)
    assert ((got - want).norm() / want.norm()).item() < bound


def test_calibrated_layers_quantize_activations_per_tensor():
    """A W4A4 layer with a calibrated input_scale (amax / (6 * 448)) takes FP8 activations scaled by
    amax / 448 on the W4A8 route; inputs beyond the calibrated amax saturate, as in the format's W4A4."""
    gen = torch.Generator().manual_seed(3)
    backend, layer, _ = modelopt_svd_layer(gen)
    backend.prepare(layer)
    x = torch.randn(8, K, generator=gen).to(torch.bfloat16) * 4  # beyond the calibrated amax
    smooth = layer.tensor("pre_quant_scale").float()
    xs = (x.float() * smooth).to(torch.bfloat16)
    fp8_scale = torch.tensor(CALIBRATED_AMAX / 448)
    w8 = _expand(layer.tensor("weight"), layer.tensor("weight_scale"), layer.w4a8_row_factor, int4=False)
    want = ((numerics.fp8_quantize_static(xs, fp8_scale).float() * fp8_scale)
            @ (w8.float() * layer.w4a8_row_scale.reshape(-1, 1)).t()).to(torch.bfloat16).float()
    want = want + layer.bias.float() + (x.float() @ layer.lora_down.float()) @ layer.tensor("svdquant_lora_b").float().t()
    got = backend.apply(layer, x).float()
    assert ((got - want).norm() / want.norm()).item() < 0.01


def test_e2m1_nibble_table_holds_twice_each_code_value():
    """The expansion kernel decodes E2M1 codes through this constant (shift, mask, sign from bit 3)."""
    table = nvfp4_hopper.E2M1_TWICE_NIBBLES
    decoded = [((table >> (4 * (c & 7))) & 0xF) * (-1 if c & 8 else 1) / 2 for c in range(16)]
    assert decoded == numerics.e2m1_table().tolist()
