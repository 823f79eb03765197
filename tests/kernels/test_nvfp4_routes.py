"""The NVFP4 routes' host-side plumbing (per-row FP8 scales, tensor and channel scales, smoothing, bias,
low-rank branch), shared by nvfp4-hopper and svdq-hopper, checked on the CPU: the Triton kernels are
replaced by plain-torch equivalents of what they compute (the GPU tests check the kernels themselves)."""

import pytest
import torch

from qdit.errors import QditError
from qdit.kernels import nvfp4_hopper, svdquant_hopper, w4_codes
from qdit.kernels.nvfp4_hopper import NVFP4HopperBackend
from qdit.kernels.svdquant_hopper import SVDQuantHopperBackend
from qdit.kernels.w4_gemv import GEMV_MAX_M
from qdit.models.activations import gelu_tanh
from qdit.quant import numerics
from qdit.quant.layer import QuantLinear
from qdit.quant.scheme import ActivationScale, LayerQuant, Scheme
from qdit.quant.svdquant import GELU_SHIFT, int4_decode

K, N = 256, 384


def _dequantize(packed, block_scale, global_scale):
    return numerics.nvfp4_dequantize(numerics.unpack_nibbles(packed), block_scale, global_scale)


def _gemv(x, weight, block_scale, global_scale, bias):
    y = x.float() @ _dequantize(weight, block_scale, global_scale).t()
    return (y if bias is None else y + bias.float()).to(x.dtype)


def _expand(weight, scales, row_factor, int4, lr_up=None, lr_down=None, col_factor=None):
    if int4:
        codes = int4_decode(numerics.unpack_nibbles(weight))
        w = codes * scales.float().repeat_interleave(64, dim=1) * row_factor[:, None]
    else:
        w = _dequantize(weight, scales, torch.ones(())) * row_factor[:, None]
    if lr_up is not None:
        w = w + lr_up.float() @ lr_down.float()
    if col_factor is not None:
        w = w * col_factor.float()
    return numerics.to_e4m3(w)


def _quant_gelu(x, bias):
    return numerics.fp8_quantize_per_token(gelu_tanh(x.float() + (bias.float() if bias is not None else 0.0)))


@pytest.fixture(autouse=True)
def torch_kernels(monkeypatch):
    monkeypatch.setattr(nvfp4_hopper, "nvfp4_gemv", _gemv)
    monkeypatch.setattr(nvfp4_hopper, "w4_expand_fp8", _expand)
    monkeypatch.setattr(nvfp4_hopper, "quantize_per_token", numerics.fp8_quantize_per_token)
    monkeypatch.setattr(nvfp4_hopper, "quantize_static", numerics.fp8_quantize_static)
    monkeypatch.setattr(svdquant_hopper, "quantize_per_token", numerics.fp8_quantize_per_token)
    monkeypatch.setattr(svdquant_hopper, "fp8_quant_per_token_gelu", _quant_gelu)


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
@pytest.mark.parametrize("m", [1, GEMV_MAX_M + 1, 200])
def test_int4_w4a8_route_computes_the_layer(make, m):
    """svdq-hopper's INT4 route (every M): FP8 activations times the INT4 weight expanded to FP8 with the
    smoothing, the low-rank branch and (in the bias) the GELU shift folded in; only FP8 rounding separates
    it from the unquantized-activation layer."""
    gen = torch.Generator().manual_seed(m)
    backend, layer, exact = make(gen)
    backend.prepare(layer)
    x = torch.randn(m, K, generator=gen).to(torch.bfloat16)
    if layer.layer_quant.gelu_shift:
        x = torch.nn.functional.gelu(x, approximate="tanh")
    want = exact(x)
    assert ((backend.apply(layer, x).float() - want).norm() / want.norm()).item() < 0.06


@pytest.mark.parametrize("make", [nunchaku_int4_gelu_layer, nunchaku_nvfp4_layer])
@pytest.mark.parametrize("m", [1, 200])
def test_deferred_gelu_computes_the_layer_on_the_gelu_output(make, m):
    """With input_gelu the layer takes the MLP's pre-activation (without the first Linear's bias, which it
    adds) and applies the GELU in its quantization: the same output as the layer on the GELU's output (here,
    where the torch stand-in of the op rounds nothing in between, equal)."""
    gen = torch.Generator().manual_seed(m)
    backend, layer, exact = make(gen)
    backend.prepare(layer)
    h = torch.randn(m, K, generator=gen).to(torch.bfloat16) * 2
    fc1_bias = torch.randn(K, generator=gen).to(torch.bfloat16)
    on_gelu = backend.apply(layer, gelu_tanh(h.float() + fc1_bias.float()))
    assert backend.fuse_input_gelu(layer).ok
    layer.input_gelu, layer.input_gelu_bias = True, fc1_bias
    assert torch.equal(backend.apply(layer, h.float()), on_gelu)
    want = exact(gelu_tanh(h.float() + fc1_bias.float()))
    assert ((on_gelu.float() - want).norm() / want.norm()).item() < W4A8_BOUND


def test_gelu_shift_becomes_a_bias_term():
    """The INT4 GELU-shift layer's shift, folded: w4a8_bias = bias + 0.171875 * sum_k W[n, k] / smooth[k]."""
    backend, layer, _ = nunchaku_int4_gelu_layer(torch.Generator().manual_seed(1))
    backend.prepare(layer)
    smooth = layer.tensor("smooth_factor").float()
    want = layer.bias.float() + GELU_SHIFT * (layer.method.dequantize(layer).float() @ (1.0 / smooth))
    torch.testing.assert_close(layer.w4a8_bias.float(), want, rtol=2**-8, atol=1e-6)


def test_a_layer_hands_its_bias_to_the_next_one():
    """release_output_bias: the W4A8 layer stops adding its bias and returns it (for the next layer's GELU
    input); its output is then the bare product."""
    gen = torch.Generator().manual_seed(0)
    backend, layer, _ = nunchaku_nvfp4_layer(gen)
    backend.prepare(layer)
    x = torch.randn(5, K, generator=gen).to(torch.bfloat16)
    with_bias = backend.apply(layer, x)
    bias = backend.release_output_bias(layer)
    assert bias is not None and layer.w4a8_bias is None
    torch.testing.assert_close(backend.apply(layer, x) + bias, with_bias, rtol=1e-2, atol=1e-2)
    assert backend.release_output_bias(layer) is None
    backend.prepare(layer)  # prepared again: the bias stays with the layer it was handed to
    assert layer.w4a8_bias is None


def modelopt_w4a16_layer(gen):
    layer = _layer(LayerQuant(Scheme.W4A16_NVFP4), gen)

    def exact(x):
        return x.float() @ layer.method.dequantize(layer).t() + layer.bias.float()
    return NVFP4HopperBackend(), layer, exact


W4A8_BOUND = 0.06  # FP8 activation and weight rounding


GEMV_BOUND = 0.01  # the exact NVFP4 weight, activations unquantized: bf16 rounding only


@pytest.mark.parametrize("make,m,bound", [
    *[(make, m, GEMV_BOUND) for make in (modelopt_w4a16_layer, modelopt_svd_layer) for m in sorted({1, GEMV_MAX_M})],
    *[(make, GEMV_MAX_M + 1, W4A8_BOUND) for make in (modelopt_w4a16_layer, modelopt_svd_layer)],
    (modelopt_svd_layer, 200, W4A8_BOUND),
    *[(nunchaku_nvfp4_layer, m, W4A8_BOUND) for m in (1, GEMV_MAX_M + 1, 200)],  # svdq-hopper: W4A8 at every M
])
def test_routes_compute_the_layer(make, m, bound):
    """nvfp4-hopper's GEMV (every NVFP4 layer at M <= GEMV_MAX_M) differs from the unquantized-activation
    layer only by bf16 rounding; W4A8 by FP8 activation and weight rounding. A lost channel scale, bias,
    smoothing or low-rank branch costs far more."""
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
    x = torch.randn(GEMV_MAX_M + 8, K, generator=gen).to(torch.bfloat16) * 4  # W4A8; beyond the calibrated amax
    smooth = layer.tensor("pre_quant_scale").float()
    xs = (x.float() * smooth).to(torch.bfloat16)
    fp8_scale = torch.tensor(CALIBRATED_AMAX / 448)
    w8 = _expand(layer.tensor("weight"), layer.tensor("weight_scale"), layer.w4a8_row_factor, False,
                 layer.w4a8_lr_up, layer.w4a8_lr_down)  # the low-rank branch folded in
    want = ((numerics.fp8_quantize_static(xs, fp8_scale).float() * fp8_scale)
            @ (w8.float() * layer.w4a8_row_scale.reshape(-1, 1)).t()).to(torch.bfloat16).float()
    want = want + layer.bias.float()
    got = backend.apply(layer, x).float()
    assert ((got - want).norm() / want.norm()).item() < 0.01


def test_e2m1_fp16_bits_hold_each_code_value_times_2_to_the_minus_14():
    """The expansion and GEMV kernels decode E2M1 codes by moving their bits into an fp16 (0.5 becoming the
    subnormal 2**-15) and undoing the 2**-14 with the scales."""
    bits = torch.tensor([w4_codes.e2m1_fp16_bits(c) for c in range(16)], dtype=torch.int32).to(torch.int16)
    decoded = bits.view(torch.float16).float() * w4_codes.E2M1_FP16_UNSCALE
    assert decoded.tolist() == numerics.e2m1_table().tolist()


EXPANDING = [(modelopt_svd_layer, ("weight", "weight_scale")), (modelopt_w4a16_layer, ("weight", "weight_scale")),
             (nunchaku_nvfp4_layer, ("qweight", "wscales")), (nunchaku_int4_gelu_layer, ("qweight", "wscales"))]


@pytest.mark.parametrize("make,released", EXPANDING, ids=lambda v: getattr(v, "__name__", None))
@pytest.mark.parametrize("m", [1, 200])
def test_weight_expanded_at_load_computes_what_the_packed_route_does(make, released, m):
    """weights_4bit="expanded_fp8": the FP8 weight every call would expand is built once in prepare and
    the packed codes and scales are freed; the layer's output is bit-identical to the packed route's at
    the rows the packed route multiplies in FP8 too (at one row nvfp4-hopper's packed route is the GEMV;
    the expanded layer stays within the W4A8 bound of the layer)."""
    gen = torch.Generator().manual_seed(m)
    backend, packed_layer, exact = make(gen)
    backend.prepare(packed_layer)
    gen = torch.Generator().manual_seed(m)
    _, layer, _ = make(gen)
    layer.expand_fp8_at_load = True
    backend.prepare(layer)
    assert layer.released == set(released)
    assert all(name not in dict(layer.named_buffers()) for name in released)
    assert layer.w4a8_weight.dtype == torch.float8_e4m3fn and layer.w4a8_weight.shape == (N, K)
    x = torch.randn(m, K, generator=gen).to(torch.bfloat16)
    got = backend.apply(layer, x)
    if m > GEMV_MAX_M or isinstance(backend, SVDQuantHopperBackend):
        assert torch.equal(got, backend.apply(packed_layer, x))
    want = exact(x)
    assert ((got.float() - want).norm() / want.norm()).item() < W4A8_BOUND
    backend.prepare(layer)  # prepared again (static scales calibrated after loading): the FP8 weight stays
    assert torch.equal(backend.apply(layer, x), got)


def test_a_released_tensor_says_why_it_is_gone():
    backend, layer, _ = nunchaku_int4_layer(torch.Generator().manual_seed(0))
    layer.expand_fp8_at_load = True
    backend.prepare(layer)
    with pytest.raises(QditError, match=r"layer test: tensor 'qweight' was released .*weights_4bit='packed'"):
        layer.tensor("qweight")
    assert "weight expanded to FP8 at load" in repr(layer)


def test_4bit_decoding_constants_give_each_code_its_value():
    """The kernels' integer-to-float decode (qdit.kernels.w4_codes): a 4-bit value OR-ed into 2**23's
    mantissa, minus 2**23, is the value; two's-complement codes flip bit 3 first and subtract 8 more."""
    codes = torch.arange(16, dtype=torch.int32)
    as_float = (codes | w4_codes.MAGIC_2_23_BITS).view(torch.float32)
    assert (as_float - w4_codes.MAGIC_2_23).tolist() == list(range(16))
    signed = ((codes ^ 8) | w4_codes.MAGIC_2_23_BITS).view(torch.float32) - (w4_codes.MAGIC_2_23 + 8)
    assert signed.tolist() == int4_decode(codes.to(torch.uint8)).float().tolist()
