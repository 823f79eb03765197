"""The fused QK-norm + rotary + concat kernel against its torch definition, and a model using it (device)."""

import pytest
import torch

from qdit.kernels.qk_norm_rope import (qk_fp8_scale, qk_norm_rope_cat, qk_norm_rope_cat_fp8, qk_norm_rope_reference,
                                       quantize_by_reciprocal)

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)


def _freqs(*shape):
    return torch.polar(torch.ones(*shape, device="cuda"), torch.rand(*shape, device="cuda") * 50)


@pytest.mark.parametrize("batch,seqs,heads,shared_freqs,d,round_before_weight", [
    (1, (256, 4096), 24, True, 128, True),   # Qwen-Image at 1024²: [text, image], freqs [S, D/2]
    (2, (7, 333), 3, True, 128, True),
    (2, (7, 333), 3, True, 96, True),        # a head size that is not a power of two (padded in the kernel)
    (2, (4128,), 30, False, 128, True),      # Z-Image: one stream, freqs [B, S, D/2]
    (1, (512, 4096), 24, True, 128, False),  # FLUX: torch.nn.RMSNorm's rounding
])
def test_kernel_is_the_torch_definition(batch, seqs, heads, shared_freqs, d, round_before_weight):
    """Only the last bits of the variance (summation order) and of rsqrt may differ from torch's. That can
    move a normalized value (up to about 7 here) by one bf16 step, which the rotation carries into both
    outputs of the pair whatever their size: at most one step of the largest values (2**-5) plus the
    output's own rounding (2**-6)."""
    gen = torch.Generator(device="cuda").manual_seed(sum(seqs))
    xs = [(torch.randn(batch, s, heads, d, device="cuda", generator=gen) * 3).to(torch.bfloat16) for s in seqs]
    weights = [(torch.rand(d, device="cuda", generator=gen) + 0.5).to(torch.bfloat16) for _ in seqs]
    freqs = [torch.view_as_real(_freqs(s, d // 2) if shared_freqs else _freqs(batch, s, d // 2)) for s in seqs]
    got = qk_norm_rope_cat(xs, weights, [1e-6] * len(seqs), freqs, round_before_weight)
    want = torch.cat([qk_norm_rope_reference(x, w, 1e-6, f, round_before_weight)
                      for x, w, f in zip(xs, weights, freqs)], dim=1)
    assert got.shape == want.shape and got.dtype == torch.bfloat16
    differ = got != want
    assert differ.float().mean().item() < 0.02
    assert (got.float() - want.float()).abs().max().item() <= 2**-5 + 2**-6
    assert ((got.float() - want.float()).norm() / want.float().norm()).item() < 2e-3


@pytest.mark.parametrize("batch,seqs,heads,weighted,d,round_before_weight", [
    (1, (256, 4096), 24, (True, True), 128, True),   # Qwen-Image at 1024²
    (2, (7, 333), 3, (True, False), 128, True),      # a stream without a norm weight: bound of weight 1
    (2, (0, 333), 3, (True, True), 128, True),       # an empty first stream: the second launch writes the scale
    (2, (4128,), 30, (True,), 128, True),            # Z-Image
    (1, (512, 4096), 24, (True, True), 128, False),  # FLUX: torch.nn.RMSNorm's rounding
    (2, (7, 333), 3, (True, True), 96, True),        # a head size padded in the kernel
])
def test_fp8_kernel_is_the_torch_definition(batch, seqs, heads, weighted, d, round_before_weight):
    """The scale is bit-exact (the same float32 product of the same max). The codes are rounded from
    bf16 values that may differ from torch's as the test above allows: most codes are equal, and a
    code may be off by one E4M3 step of its own plus the bf16 deviation (one step of the largest
    normalized values, ~8, times the weight, rotated into small outputs too). A rounding mode other
    than torch's (truncation, double rounding through fp16) would change far more than 2% of codes."""
    gen = torch.Generator(device="cuda").manual_seed(7 + sum(seqs))
    xs = [(torch.randn(batch, s, heads, d, device="cuda", generator=gen) * 3).to(torch.bfloat16) for s in seqs]
    # the first stream's weights negative: the bound takes |w|
    weights = [((torch.rand(d, device="cuda", generator=gen) * 2 + 0.5) * (-1) ** (i + 1)).to(torch.bfloat16)
               if has else None for i, has in enumerate(weighted)]
    freqs = [torch.view_as_real(_freqs(s, d // 2)) for s in seqs]
    eps = [1e-6] * len(seqs)
    codes, scale = qk_norm_rope_cat_fp8(xs, weights, eps, freqs, round_before_weight)
    want_scale = qk_fp8_scale(weights, d)
    bf16 = torch.cat([qk_norm_rope_reference(x, w, 1e-6, f, round_before_weight)
                      for x, w, f in zip(xs, weights, freqs)], dim=1)
    want = quantize_by_reciprocal(bf16, want_scale)
    assert codes.dtype == torch.float8_e4m3fn and codes.shape == want.shape
    assert torch.equal(scale, want_scale)
    got_v, want_v = codes.float() * scale, want.float() * scale
    assert (got_v != want_v).float().mean().item() < 0.02
    wmax = max(w.float().abs().max().item() if w is not None else 1.0 for w in weights)
    assert ((got_v - want_v).abs() <= want_v.abs() / 8 + 2**-9 * scale + (2**-5 + 2**-6) * wmax).all()
    assert ((got_v - want_v).norm() / want_v.norm()).item() < 0.02


@pytest.mark.parametrize("d,peak_weight", [(64, -2.5), (96, 1.0)])
def test_fp8_kernel_worst_case_row_stays_within_448(d, peak_weight):
    """A row with all its mass on the largest |weight| reaches the bound (tests/kernels/test_qk_norm_rope.py)."""
    x = torch.zeros(1, 3, 2, d, device="cuda")
    x[0, :, :, 6] = torch.tensor([5.0, -0.01, 1e4], device="cuda").unsqueeze(-1)
    w = torch.ones(d, device="cuda")
    w[6] = peak_weight
    no_rotation = torch.zeros(3, d // 2, 2, device="cuda")
    no_rotation[..., 0] = 1.0
    args = ([x.bfloat16()], [w.bfloat16()], [1e-6], [no_rotation])
    codes, scale = qk_norm_rope_cat_fp8(*args)
    in_codes = (qk_norm_rope_cat(*args).float() / scale).abs().amax().item()
    assert 430 < in_codes <= 448 and codes.float().abs().amax().item() <= 448


@pytest.mark.parametrize("model", ["qwen-image", "z-image", "flux"])
def test_model_with_the_kernel_matches_diffusers_processors(model):
    from qdit.api import random_transformer
    from qdit.models import adapter_by_name

    adapter = adapter_by_name(model)
    ours = random_transformer(model, device="cuda", seed=2)
    theirs = random_transformer(model, device="cuda", seed=2, diffusers_modules=True)
    inputs = adapter.example_inputs(dict(ours.config), height=128, width=128, text_tokens=32, device="cuda")
    with torch.no_grad():
        out, expected = adapter.output_tensor(ours(**inputs)).float(), adapter.output_tensor(theirs(**inputs)).float()
        block = getattr(ours, adapter.block_lists[0])[0]
        block.compile(fullgraph=True)
        compiled = adapter.output_tensor(ours(**inputs)).float()
    torch._dynamo.reset()
    assert ((out - expected).norm() / expected.norm()).item() < 1e-2
    assert ((compiled - expected).norm() / expected.norm()).item() < 1e-2
