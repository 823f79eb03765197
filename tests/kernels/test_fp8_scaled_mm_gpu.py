"""The FP8 GPU backend against the reference backend, on the same quantized weights (run on the device)."""

import pytest
import torch

from torch._inductor.utils import run_and_get_code

from qdit.kernels import backend_by_name
from qdit.kernels.fp8_scaled_mm import PERSISTENT_ROW_MAX, quantize_per_token
from qdit.quant import numerics
from qdit.quant.layer import QuantLinear
from qdit.quant.scheme import ActivationScale, LayerQuant, Scheme

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

SHAPES = [(1, 64, 3072), (7, 3072, 3072), (333, 3072, 12288), (4096, 12288, 3072), (257, 3584, 3072)]
SCHEMES = [
    LayerQuant(Scheme.FP8, ActivationScale.STATIC),
    LayerQuant(Scheme.FP8, ActivationScale.DYNAMIC),
    LayerQuant(Scheme.FP8_PER_CHANNEL),
]


def make_layer(lq, k, n, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    layer = QuantLinear("test", k, n, True, lq, torch.bfloat16)
    w = torch.randn(n, k, device="cuda", generator=gen, dtype=torch.bfloat16) / k**0.5
    for name, t in layer.method.quantize_weight(layer, w).items():
        layer.set_tensor(name, t)
    layer.set_tensor("bias", torch.randn(n, device="cuda", generator=gen) * 0.1)
    if lq.activation_scale is ActivationScale.STATIC:
        layer.set_tensor("input_scale", torch.tensor(3.0 / 448, device="cuda"))
    return layer


@pytest.mark.parametrize("lq", SCHEMES, ids=lambda lq: lq.describe())
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_matches_reference(lq, m, k, n):
    layer = make_layer(lq, k, n, seed=m + k + n)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    fast, ref = backend_by_name("fp8-scaled-mm"), backend_by_name("reference")
    fast.prepare(layer)
    y_fast = fast.apply(layer, x).float()
    y_ref = ref.apply(layer, x).float()
    assert torch.isfinite(y_fast).all()
    rel = ((y_fast - y_ref).norm() / y_ref.norm()).item()
    print(f"{lq.describe()} M={m} K={k} N={n}: rel. error vs reference {rel:.2e}")
    # Same FP8 codes and scales; differences come from accumulation order and the bf16 output.
    assert rel < 5e-3


def test_compiles_without_graph_break():
    lq = LayerQuant(Scheme.FP8, ActivationScale.DYNAMIC)
    layer = make_layer(lq, 256, 512, seed=0)
    layer.backend = backend_by_name("fp8-scaled-mm")
    layer.backend.prepare(layer)
    block = torch.nn.Sequential(layer, torch.nn.GELU())
    compiled = torch.compile(block, fullgraph=True)
    x = torch.randn(33, 256, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(compiled(x), block(x), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("k", [3072, PERSISTENT_ROW_MAX, 12288])
def test_compiled_per_token_quantization(k):
    """Compiled, rows up to PERSISTENT_ROW_MAX wide are quantized by ops inductor fuses into the producer,
    wider ones by qdit's Triton op (inductor would loop over them twice); both give the reference's scales
    and codes (within one E4M3 step, from the Triton division) for the same activation."""
    x = (torch.randn(257, k, device="cuda") * torch.rand(257, 1, device="cuda") * 4).bfloat16()
    x[5] = 0  # a zero row keeps scale 1
    (q, s), codes = run_and_get_code(torch.compile(quantize_per_token, fullgraph=True), x)
    ref_q, ref_s = numerics.fp8_quantize_per_token(x)
    assert ("qdit.fp8_quant_per_token" in "\n".join(codes)) == (k > PERSISTENT_ROW_MAX)
    torch.testing.assert_close(s, ref_s, rtol=0, atol=0)
    differ = q.view(torch.uint8) != ref_q.view(torch.uint8)
    assert differ.float().mean().item() < 1e-3
    step = (q.float() - ref_q.float()).abs() / ref_q.float().abs().clamp_min(2.0**-6)
    assert step.max().item() <= 0.125


@pytest.mark.parametrize("gelu,biased", [(True, False), (True, True), (False, True), (False, False)])
@pytest.mark.parametrize("m,k,tiles", [(1, 12288, None), (256, 12288, None), (4096, 12288, None),
                                       (256, 12288, (16384, 16)), (33, 3072, None), (5, 200, None),
                                       (3, 20000, None)])
def test_per_token_pass_with_bias_and_gelu(gelu, biased, m, k, tiles):
    """The per-token pass (qdit::fp8_quant_per_token_gelu, and the plain one): t = gelu_tanh(x + bias)
    in float32 inside the pass; each code within one E4M3 rounding (plus the approximate tanh's error) of
    t / scale, scale = amax(t) / 448; the row in one block (up to ROW_IN_ONE_BLOCK) or in chunks."""
    from qdit.kernels.fp8_scaled_mm import fp8_quant_per_token_gelu, launch_quant_per_token
    from qdit.models.activations import gelu_tanh

    gen = torch.Generator(device="cuda").manual_seed(m + k)
    x = (torch.randn(m, k, device="cuda", generator=gen) * 3).bfloat16()
    x[0, : k // 2] = -20.0  # GELU's far negative tail
    bias = torch.randn(k, device="cuda", generator=gen).bfloat16() if biased else None
    pre = x.float() + (bias.float() if biased else 0.0)
    t = gelu_tanh(pre) if gelu else pre
    if gelu and tiles is None:
        q, s = fp8_quant_per_token_gelu(x, bias)
    else:
        q, s = launch_quant_per_token(x, bias, gelu=gelu, tiles=tiles)
    torch.testing.assert_close(s, t.abs().amax(dim=1, keepdim=True) / 448, rtol=2e-3, atol=0)
    err = (q.float() * s - t).abs()
    bound = (2.0**-4 + 2.0**-9) * t.abs() + s * 2.0**-9
    if gelu:  # tanh.approx's absolute error (~2**-11) times |x| / 2
        bound = bound + 2.5e-4 * pre.abs()
    assert (err <= bound).all(), (err - bound).max()
    zero = torch.zeros(2, k, device="cuda", dtype=torch.bfloat16)  # t = 0: scale 1, codes 0
    q0, s0 = launch_quant_per_token(zero, None, gelu=gelu, tiles=tiles)
    assert (s0 == 1).all() and (q0.float() == 0).all()
