"""The NVFP4 Hopper backend against the reference backend, on the same quantized weights (device)."""

import pytest
import torch

from qdit.kernels import backend_by_name
from qdit.kernels.w4_gemv import GEMV_MAX_M
from qdit.quant import numerics
from qdit.quant.layer import QuantLinear
from qdit.quant.scheme import ActivationScale, LayerQuant, Scheme

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

W4A16 = LayerQuant(Scheme.W4A16_NVFP4)
W4A4 = LayerQuant(Scheme.NVFP4, ActivationScale.STATIC)
SVD = LayerQuant(Scheme.NVFP4_SVD, ActivationScale.STATIC, pre_quant_scale=True, lora_rank=32)
SHAPES = [(3072, 3072), (3072, 12288), (12288, 3072), (3584, 3072), (96, 48)]  # (K, N)
MS = sorted({1, 2, 3, 7, GEMV_MAX_M, GEMV_MAX_M + 1, 333, 4096})


def make_layer(lq, k, n, x, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(n, k, device="cuda", generator=gen, dtype=torch.bfloat16) / k**0.5
    layer = QuantLinear("test", k, n, True, lq, torch.bfloat16)
    for name, t in layer.method.quantize_weight(layer, w).items():
        layer.set_tensor(name, t)
    if lq.pre_quant_scale:  # a non-trivial smoothing vector (quantize_weight without calibration uses ones)
        s = torch.rand(k, device="cuda", generator=gen) + 0.5
        layer.set_tensor("pre_quant_scale", s)
    layer.set_tensor("bias", torch.randn(n, device="cuda", generator=gen) * 0.1)
    if lq.activation_scale is ActivationScale.STATIC:
        xs = x * layer.tensor("pre_quant_scale") if lq.pre_quant_scale else x
        layer.set_tensor("input_scale", numerics.nvfp4_global_scale(xs.abs().amax()))
    return layer


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("lq", [W4A16, W4A4, SVD], ids=lambda lq: lq.describe())
@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("m", MS)
def test_matches_reference(lq, m, k, n):
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    layer = make_layer(lq, k, n, x, seed=m + k + n)
    fast, ref = backend_by_name("nvfp4-hopper"), backend_by_name("reference")
    fast.prepare(layer)
    y_fast, y_ref = fast.apply(layer, x), ref.apply(layer, x)
    assert torch.isfinite(y_fast).all()
    err = rel(y_fast, y_ref)
    gemv = m <= GEMV_MAX_M
    print(f"{lq.describe()} M={m} K={k} N={n} route={'gemv' if gemv else 'w4a8'}: rel. error vs reference {err:.2e}")
    if gemv:
        # The exact NVFP4 weight, activations unquantized: only float32 summation order and output rounding
        # separate it from the layer computed in float32.
        assert rel(y_fast, unquantized_activations(layer, x)) < 5e-3
    if lq.scheme is Scheme.W4A16_NVFP4:
        assert err < (5e-3 if gemv else 6e-2)  # W4A8: FP8 activations and the FP8 re-scaling of the weight
    else:
        assert err < 0.2  # the reference quantizes activations to NVFP4 (W4A4); the backend does not


def unquantized_activations(layer, x):
    """The layer in float32 with its exact NVFP4 weight and unquantized (smoothed) activations."""
    lq = layer.layer_quant
    xs = x.float() * layer.tensor("pre_quant_scale").float() if lq.pre_quant_scale else x.float()
    y = xs @ layer.method.dequantize(layer).t() + layer.bias.float()
    if lq.lora_rank:
        y = y + xs @ layer.tensor("svdquant_lora_a").float().t() @ layer.tensor("svdquant_lora_b").float().t()
    return y


@pytest.mark.parametrize("m", sorted({1, GEMV_MAX_M, GEMV_MAX_M + 1, 4096}))
def test_routes_at_least_as_close_to_bf16_as_w4a4(m):
    """The backend's routes (GEMV at M <= GEMV_MAX_M, W4A8 above) must not be worse than NVFP4's own W4A4 math
    against the unquantized layer."""
    k, n = 3072, 3072
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    layer = make_layer(W4A4, k, n, x, seed=1)
    dense = x.float() @ layer.method.dequantize(layer).t() + layer.bias.float()  # exact NVFP4 weight, BF16-free math
    fast, ref = backend_by_name("nvfp4-hopper"), backend_by_name("reference")
    fast.prepare(layer)
    e_fast, e_w4a4 = rel(fast.apply(layer, x), dense), rel(ref.apply(layer, x), dense)
    print(f"M={m}: error vs unquantized activations: nvfp4-hopper {e_fast:.3e}, W4A4 {e_w4a4:.3e}")
    assert e_fast <= e_w4a4


def test_compiles_without_graph_break():
    x = torch.randn(96, 256, device="cuda", dtype=torch.bfloat16)
    layer = make_layer(SVD, 256, 512, x, seed=0)
    layer.backend = backend_by_name("nvfp4-hopper")
    layer.backend.prepare(layer)
    block = torch.nn.Sequential(layer, torch.nn.GELU())
    compiled = torch.compile(block, fullgraph=True)
    # Compiled, the activation quantization is fused into the producing kernel, which keeps the smoothed
    # input in float32 where eager rounds it to bf16: a few FP8 codes differ by one step.
    for rows in (x, x[:5], x[:1]):  # W4A8 and (one row) the GEMV
        assert rel(compiled(rows), block(rows)) < 0.02


@pytest.mark.parametrize("lq", [W4A16, W4A4, SVD], ids=lambda lq: lq.describe())
def test_weight_expanded_at_load_gives_the_packed_routes_output(lq):
    """weights_4bit="expanded_fp8": the FP8 weight expanded once in prepare is the one each call expands, so
    the W4A8 route's output is bit-identical, compiled too; the packed codes are released."""
    x = torch.randn(333, 3072, device="cuda", dtype=torch.bfloat16)
    packed, expanded = make_layer(lq, 3072, 3072, x, seed=5), make_layer(lq, 3072, 3072, x, seed=5)
    expanded.expand_fp8_at_load = True
    for layer in (packed, expanded):
        layer.backend = backend_by_name("nvfp4-hopper")
        layer.backend.prepare(layer)
    assert expanded.released == {"weight", "weight_scale"}
    assert torch.equal(expanded(x), packed(x))
    assert torch.equal(torch.compile(expanded, fullgraph=True)(x), torch.compile(packed, fullgraph=True)(x))


@pytest.mark.parametrize("n,k", [(3072, 3072), (384, 256), (48, 12288)])
def test_fp8_expansion_is_the_torch_cast(n, k):
    """Both expansions (NVFP4 and INT4 codes) write exactly torch's saturating e4m3 cast of the scaled
    value, element 2j from the low nibble (compared as values: the kernel may write -0 as +0)."""
    from qdit.kernels.nvfp4_hopper import w4_expand_fp8
    from qdit.quant import numerics
    from qdit.quant.svdquant import int4_decode

    gen = torch.Generator(device="cuda").manual_seed(n + k)
    packed = torch.randint(0, 256, (n, k // 2), device="cuda", dtype=torch.uint8, generator=gen)
    codes = numerics.unpack_nibbles(packed)
    row_factor = torch.rand(n, device="cuda", generator=gen) * 4
    block = (torch.rand(n, k // 16, device="cuda", generator=gen) * 4 + 0.01).to(torch.float8_e4m3fn)
    want = numerics.to_e4m3(numerics.nvfp4_dequantize(codes, block, torch.ones((), device="cuda"))
                            * row_factor[:, None])
    assert torch.equal(w4_expand_fp8(packed, block, row_factor, False).float(), want.float())
    group = (torch.rand(n, k // 64, device="cuda", generator=gen) + 0.01).to(torch.bfloat16)
    want = numerics.to_e4m3(int4_decode(codes) * group.float().repeat_interleave(64, dim=1) * row_factor[:, None])
    assert torch.equal(w4_expand_fp8(packed, group, row_factor, True).float(), want.float())


@pytest.mark.parametrize("n,k,rank", [(3072, 3072, 32), (3072, 12288, 32), (384, 256, 16), (48, 12288, 128), (640, 1024, 40)])
def test_fp8_expansion_folds_the_low_rank_branch(n, k, rank):
    """With a low-rank term the expansion writes e4m3(code * scale * row_factor + up @ down). The kernel's
    tensor-core dot sums in another order than torch's matmul, which can move a value that lies on an
    e4m3 rounding boundary by one step; everything else must be torch's cast exactly."""
    from qdit.kernels.nvfp4_hopper import w4_expand_fp8
    from qdit.quant import numerics

    gen = torch.Generator(device="cuda").manual_seed(n + k + rank)
    packed = torch.randint(0, 256, (n, k // 2), device="cuda", dtype=torch.uint8, generator=gen)
    row_factor = torch.rand(n, device="cuda", generator=gen) * 4
    block = (torch.rand(n, k // 16, device="cuda", generator=gen) * 4 + 0.01).to(torch.float8_e4m3fn)
    up = (torch.randn(n, rank, device="cuda", generator=gen) * 4).to(torch.bfloat16)
    down = torch.randn(rank, k, device="cuda", generator=gen).to(torch.bfloat16)
    dense = numerics.nvfp4_dequantize(numerics.unpack_nibbles(packed), block, torch.ones((), device="cuda"))
    want = numerics.to_e4m3(dense * row_factor[:, None] + up.float() @ down.float()).float()
    got = w4_expand_fp8(packed, block, row_factor, False, up, down).float()
    differ = got != want
    assert differ.float().mean().item() < 1e-3
    assert ((got - want).abs()[differ] <= want.abs()[differ] * 2**-3 + 2**-9).all()
    without = w4_expand_fp8(packed, block, row_factor, False).float()
    assert (without != want).float().mean().item() > 0.5  # the low-rank term is not lost


@pytest.mark.parametrize("m", [2, 4096])
def test_fused_projections_of_per_token_layers_match_each_layer(m):
    """Weight-only NVFP4 layers (per-token FP8 activations on the W4A8 route) reading one input fuse;
    layers with calibrated per-tensor activation scales do not (each quantizes with its own scale)."""
    x = torch.randn(m, 3072, device="cuda", dtype=torch.bfloat16)
    backend = backend_by_name("nvfp4-hopper")
    for lq, fusable in ((W4A16, True), (W4A4, False)):
        layers = [make_layer(lq, 3072, n, x, seed=n) for n in (3072, 1024, 3072)]
        for layer in layers:
            layer.expand_fp8_at_load = True
            layer.backend = backend
            backend.prepare(layer)
        alone = [layer(x) for layer in layers]
        fused, reason = backend.fuse_shared_input(layers)
        if not fusable:
            assert (fused, reason) == (None, "their activation scales are calibrated per layer")
            continue
        for got, want in zip(fused(x), alone):
            assert got.shape == want.shape
            assert rel(got, want) < 5e-3, rel(got, want)  # bias: in the epilogue vs a bf16 add
