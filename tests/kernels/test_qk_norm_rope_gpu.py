"""The fused QK-norm + rotary + concat kernel against its torch definition, and a model using it (device)."""

import pytest
import torch

from qdit.kernels.qk_norm_rope import qk_fp8_scale, qk_norm_rope_cat, qk_norm_rope_cat_fp8, qk_norm_rope_reference
from qdit.quant.numerics import fp8_quantize_static

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)


def _freqs(*shape):
    return torch.polar(torch.ones(*shape, device="cuda"), torch.rand(*shape, device="cuda") * 50)


@pytest.mark.parametrize("batch,seqs,heads,shared_freqs", [
    (1, (256, 4096), 24, True),   # Qwen-Image at 1024²: [text, image], freqs [S, D/2]
    (2, (7, 333), 3, True),
    (2, (4128,), 30, False),      # Z-Image: one stream, freqs [B, S, D/2]
])
def test_kernel_is_the_torch_definition(batch, seqs, heads, shared_freqs):
    """Only the last bits of the variance (summation order) and of rsqrt may differ from torch's. That can
    move a normalized value (up to about 7 here) by one bf16 step, which the rotation carries into both
    outputs of the pair whatever their size: at most one step of the largest values (2**-5) plus the
    output's own rounding (2**-6)."""
    d = 128
    gen = torch.Generator(device="cuda").manual_seed(sum(seqs))
    xs = [(torch.randn(batch, s, heads, d, device="cuda", generator=gen) * 3).to(torch.bfloat16) for s in seqs]
    weights = [(torch.rand(d, device="cuda", generator=gen) + 0.5).to(torch.bfloat16) for _ in seqs]
    freqs = [torch.view_as_real(_freqs(s, d // 2) if shared_freqs else _freqs(batch, s, d // 2)) for s in seqs]
    got = qk_norm_rope_cat(xs, weights, [1e-6] * len(seqs), freqs)
    want = torch.cat([qk_norm_rope_reference(x, w, 1e-6, f) for x, w, f in zip(xs, weights, freqs)], dim=1)
    assert got.shape == want.shape and got.dtype == torch.bfloat16
    differ = got != want
    assert differ.float().mean().item() < 0.02
    assert (got.float() - want.float()).abs().max().item() <= 2**-5 + 2**-6
    assert ((got.float() - want.float()).norm() / want.float().norm()).item() < 2e-3


@pytest.mark.parametrize("batch,seqs,heads,weighted", [
    (1, (256, 4096), 24, (True, True)),  # Qwen-Image at 1024²
    (2, (7, 333), 3, (True, False)),     # a stream without a norm weight: bound of weight 1
    (2, (4128,), 30, (True,)),           # Z-Image
])
def test_fp8_kernel_is_the_torch_definition(batch, seqs, heads, weighted):
    """The scale is bit-exact (same float32 product of the same max). The codes come from the bf16
    values, which may differ by one bf16 step (test above): that can move a code by one E4M3 step."""
    d = 128
    gen = torch.Generator(device="cuda").manual_seed(7 + sum(seqs))
    xs = [(torch.randn(batch, s, heads, d, device="cuda", generator=gen) * 3).to(torch.bfloat16) for s in seqs]
    weights = [(torch.rand(d, device="cuda", generator=gen) * 2 + 0.5).to(torch.bfloat16) if has else None
               for has in weighted]
    freqs = [torch.view_as_real(_freqs(s, d // 2)) for s in seqs]
    eps = [1e-6] * len(seqs)
    codes, scale = qk_norm_rope_cat_fp8(xs, weights, eps, freqs)
    want_scale = qk_fp8_scale(weights, d)
    want = fp8_quantize_static(
        torch.cat([qk_norm_rope_reference(x, w, 1e-6, f) for x, w, f in zip(xs, weights, freqs)], dim=1), want_scale)
    assert codes.dtype == torch.float8_e4m3fn and codes.shape == want.shape
    assert torch.equal(scale, want_scale)
    got_f, want_f = codes.float(), want.float()
    assert (got_f != want_f).float().mean().item() < 0.02
    assert ((got_f - want_f).abs() <= want_f.abs() / 8 + 2**-9).all()  # at most one E4M3 step
    assert ((got_f - want_f).norm() / want_f.norm()).item() < 0.02
    # and the fp8 codes are the bf16 kernel's output rounded
    same = fp8_quantize_static(qk_norm_rope_cat(xs, weights, eps, freqs), scale)
    assert torch.equal(codes.view(torch.uint8), same.view(torch.uint8))


@pytest.mark.parametrize("model", ["qwen-image", "z-image"])
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
