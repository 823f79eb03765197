"""The QK-norm + rotary op's FP8 form (qdit::qk_norm_rope_cat_fp8): its scale is fixed by the norm
weights alone and bounds every value it can produce. CPU; the Triton kernel against this is in
test_qk_norm_rope_gpu.py."""

import math

import pytest
import torch

from qdit.kernels.qk_norm_rope import qk_fp8_scale, qk_norm_rope_cat, qk_norm_rope_cat_fp8
from qdit.quant.numerics import E4M3_MAX


def _pairs(*shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.view_as_real(torch.polar(torch.ones(*shape), torch.rand(*shape, generator=gen) * 50))


def test_scale_is_sqrt_head_dim_times_largest_weight_with_margin():
    d = 128
    w_txt, w_img = torch.full((d,), 0.5), torch.linspace(-3.0, 2.0, d)
    assert qk_fp8_scale([w_txt, w_img], d).item() == pytest.approx(3.0 * math.sqrt(d) * (1 + 2**-6) / E4M3_MAX,
                                                                   rel=1e-6)
    assert qk_fp8_scale([w_txt, None], d).item() == pytest.approx(math.sqrt(d) * (1 + 2**-6) / E4M3_MAX, rel=1e-6)
    assert qk_fp8_scale([torch.zeros(d)], d).item() == 1.0  # nothing to scale: codes are all 0
    assert qk_fp8_scale([w_img], d).shape == (1, 1, 1, 1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("d,peak_weight", [(64, -2.5), (96, 1.0)])
def test_the_worst_case_row_reaches_the_bound_and_no_further(dtype, d, peak_weight):
    # All of a row's mass on the element with the largest weight: |y| = sqrt(D) * max|w|, which is the
    # bound up to roundings, so y / scale lands just under 448 (448 / (1 + 2^-6) ~ 441), never beyond.
    # At D = 96, bf16 rounds sqrt(D) = 9.798 up to 9.8125: the margin is what keeps that under 448.
    heads = 2
    x = torch.zeros(1, 3, heads, d)
    # 5 and 1e4 normalize to sqrt(D); -0.01 is small enough for eps to pull it under (6.25 at D = 64)
    x[0, :, :, 6] = torch.tensor([5.0, -0.01, 1e4]).unsqueeze(-1)
    w = torch.ones(d)
    w[6] = peak_weight
    no_rotation = torch.zeros(3, d // 2, 2)
    no_rotation[..., 0] = 1.0
    rotation_45 = torch.full((3, d // 2, 2), math.sqrt(0.5))
    for freqs, low in ((no_rotation, 430), (rotation_45, 300)):  # at 45 degrees each half is 1/sqrt(2)
        args = ([x.to(dtype)], [w.to(dtype)], [1e-6], [freqs])
        codes, scale = qk_norm_rope_cat_fp8(*args)
        in_codes = (qk_norm_rope_cat(*args).float() / scale).abs().amax().item()
        assert codes.dtype == torch.float8_e4m3fn and low < in_codes <= E4M3_MAX


def test_codes_are_the_bf16_result_rounded_to_e4m3_on_two_streams():
    d, heads = 32, 3
    gen = torch.Generator().manual_seed(1)
    xs = [(torch.randn(2, s, heads, d, generator=gen) * 4).bfloat16() for s in (5, 11)]
    weights = [(torch.rand(d, generator=gen) + 0.5).bfloat16(), (torch.rand(d, generator=gen) * 3).bfloat16()]
    freqs = [_pairs(5, d // 2, seed=2), _pairs(11, d // 2, seed=3)]
    codes, scale = qk_norm_rope_cat_fp8(xs, weights, [1e-6, 1e-6], freqs)
    bf16 = qk_norm_rope_cat(xs, weights, [1e-6, 1e-6], freqs).float()
    assert codes.shape == (2, 16, heads, d)
    back = codes.float() * scale
    # E4M3 keeps 3 mantissa bits: half a step is 2^-4 relative, for values above its subnormal range
    normal = bf16.abs() >= 2**-6 * scale
    assert ((back - bf16).abs() <= 2**-4 * bf16.abs())[normal].all()
    assert ((back - bf16).norm() / bf16.norm()).item() < 0.04


def test_the_op_compiles_with_fullgraph():
    d = 16
    x = torch.randn(1, 7, 2, d).bfloat16()
    w = torch.rand(d).bfloat16() + 0.5
    freqs = _pairs(7, d // 2)

    def f(x):
        codes, scale = qk_norm_rope_cat_fp8([x], [w], [1e-6], [freqs])
        return codes.float() * scale

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x), f(x))
    torch._dynamo.reset()


def _streams(seqs, d=16, heads=2, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(2, s, heads, d, generator=gen) * 2).bfloat16() for s in seqs]


@pytest.mark.parametrize("seqs,weighted", [
    ((3, 9), (True, True)),
    ((3, 9), (True, False)),   # one stream without a norm weight
    ((0, 9), (True, True)),    # an empty first stream (no program takes its rows)
    ((5,), (True,)),
])
def test_op_passes_torch_library_checks(seqs, weighted):
    """Schema, fake implementation (shapes and dtypes under compile) and the real one agree."""
    d = 16
    gen = torch.Generator().manual_seed(len(seqs))
    xs = _streams(seqs, d)
    weights = [(torch.rand(d, generator=gen) * 4 - 2).bfloat16() if has else None for has in weighted]
    freqs = [_pairs(s, d // 2, seed=s) for s in seqs]
    args = (xs, weights, [1e-6] * len(seqs), freqs)
    torch.library.opcheck(qk_norm_rope_cat_fp8, args)
    codes, scale = qk_norm_rope_cat_fp8(*args)
    assert codes.shape == (2, sum(seqs), 2, d) and torch.equal(scale, qk_fp8_scale(weights, d))


def test_more_norm_weights_than_the_kernel_takes_are_refused_on_every_device():
    d = 16
    xs = _streams((2, 3, 4), d)
    weights = [torch.rand(d).bfloat16() for _ in xs]
    with pytest.raises(ValueError, match="at most 2 distinct norm weights, got 3"):
        qk_norm_rope_cat_fp8(xs, weights, [1e-6] * 3, [_pairs(x.shape[1], d // 2) for x in xs])


def test_more_streams_than_the_kernel_takes_are_refused_on_every_device():
    d = 16
    xs = _streams((2, 3, 4), d)
    weight = torch.rand(d).bfloat16()
    args = (xs, [weight] * 3, [1e-6] * 3, [_pairs(x.shape[1], d // 2) for x in xs])
    for op in (qk_norm_rope_cat, qk_norm_rope_cat_fp8):
        with pytest.raises(ValueError, match="one or two streams"):
            op(*args)


@pytest.mark.parametrize("round_before_weight", [True, False])
def test_reference_rounds_as_diffusers_or_torch_rmsnorm(round_before_weight):
    """diffusers' RMSNorm rounds the normalized row before the weight, torch's RMSNorm (FLUX) once after
    it; in bf16 the two differ in many elements, so each mode must equal its own module bit for bit."""
    from diffusers.models.normalization import RMSNorm

    from qdit.kernels.qk_norm_rope import qk_norm_rope_reference

    d = 64
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(2, 9, 3, d, generator=gen) * 3).bfloat16()
    w = (torch.rand(d, generator=gen) + 0.5).bfloat16()
    module = RMSNorm(d, eps=1e-6) if round_before_weight else torch.nn.RMSNorm(d, eps=1e-6)
    module = module.bfloat16()
    with torch.no_grad():
        module.weight.copy_(w)
        normalized = module(x)
    no_rotation = torch.zeros(9, d // 2, 2)
    no_rotation[..., 0] = 1.0
    got = qk_norm_rope_reference(x, w, 1e-6, no_rotation, round_before_weight)
    other = qk_norm_rope_reference(x, w, 1e-6, no_rotation, not round_before_weight)
    assert torch.equal(got, normalized)
    assert (other != normalized).float().mean().item() > 0.05
