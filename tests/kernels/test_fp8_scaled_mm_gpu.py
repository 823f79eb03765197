"""The FP8 GPU backend against the reference backend, on the same quantized weights (run on the device)."""

import pytest
import torch

from qdit.kernels import backend_by_name
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
