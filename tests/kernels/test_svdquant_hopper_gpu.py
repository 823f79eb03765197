"""The svdq-hopper backend against the reference backend, on the same canonical SVDQuant weights (device)."""

import pytest
import torch

from qdit.kernels import backend_by_name
from qdit.kernels.w4_gemv import GEMV_MAX_M
from qdit.quant.layer import QuantLinear
from qdit.quant.shared_input import FUSED_PREFIX
from qdit.quant.scheme import LayerQuant, Scheme
from qdit.quant.svdquant import GELU_SHIFT, svdq_reference_forward

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

SHAPES = [(256, 384), (3072, 3072), (3072, 12288), (12288, 3072)]  # (K, N)
MS = sorted({1, 7, GEMV_MAX_M, GEMV_MAX_M + 1, 333, 4096})


def make_layer(lq, k, n, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(n, k, device="cuda", generator=gen, dtype=torch.bfloat16) / k**0.5
    layer = QuantLinear("test", k, n, True, lq, torch.bfloat16)
    for name, t in layer.method.quantize_weight(layer, w).items():
        layer.set_tensor(name, t)
    if lq.scheme is not Scheme.AWQ_W4A16:  # non-trivial smoothing (load-time quantization uses ones)
        layer.set_tensor("smooth_factor", (torch.rand(k, device="cuda", generator=gen) + 0.5).to(torch.bfloat16))
    layer.set_tensor("bias", (torch.randn(n, device="cuda", generator=gen) * 0.1).to(torch.bfloat16))
    return layer


def int4_layer_and_input(k, n, m, gelu):
    """An INT4 layer (unsigned GELU-shift variant when gelu) and an input like the one it sees."""
    layer = make_layer(LayerQuant(Scheme.SVDQ_INT4, lora_rank=32, gelu_shift=gelu), k, n, seed=k + n + m)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    return layer, torch.nn.functional.gelu(x, approximate="tanh") if gelu else x


def run(layer, backend_name, x):
    backend = backend_by_name(backend_name)
    layer.backend = backend
    backend.prepare(layer)
    return layer(x)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("gelu", [False, True])
def test_int4_w4a4_matches_reference(k, n, m, gelu):
    """svdq-hopper-exact: W4A4 arithmetic on INT8 tensor cores; only float32 summation order and the bf16
    output differ from the reference."""
    layer, x = int4_layer_and_input(k, n, m, gelu)
    got = run(layer, "svdq-hopper-exact", x)
    ref = svdq_reference_forward(layer, x)
    assert rel(got, ref) < 1e-2, rel(got, ref)


def unquantized_activation_forward(layer, x):
    """The layer with its quantized weight and unquantized (smoothed, shifted) activations, float32."""
    shift = GELU_SHIFT if layer.layer_quant.gelu_shift else 0.0
    smooth = layer.tensor("smooth_factor").float()
    return (((x.float() + shift) / smooth) @ layer.method.dequantize(layer).t() + layer.bias.float()
            + (x.float() @ layer.tensor("proj_down").float()) @ layer.tensor("proj_up").float().t())


@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("gelu", [False, True])
def test_int4_default_routes_against_reference(k, n, m, gelu):
    """svdq-hopper: W4A8 at every M. It stays close to the reference and is at least as close to the
    unquantized-activation layer as W4A4 itself."""
    layer, x = int4_layer_and_input(k, n, m, gelu)
    got = run(layer, "svdq-hopper", x)
    ref = svdq_reference_forward(layer, x)
    exact_act = unquantized_activation_forward(layer, x)
    print(f"K={k} N={n} M={m} gelu={gelu}: vs unquantized activations W4A8 {rel(got, exact_act):.3e}, "
          f"W4A4 {rel(ref, exact_act):.3e}")
    assert rel(got, ref) < 0.2, rel(got, ref)
    assert rel(got, exact_act) <= rel(ref, exact_act) + 1e-3, (rel(got, exact_act), rel(ref, exact_act))


@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("m", MS)
def test_nvfp4_routes_against_reference(k, n, m):
    """Hopper has no FP4 MMA: W4A16 (small M) / W4A8 (large M) instead of W4A4. Both stay close to the
    reference, and closer to the unquantized-activation layer than W4A4 itself."""
    lq = LayerQuant(Scheme.SVDQ_NVFP4, lora_rank=32, wtscale=True)
    layer = make_layer(lq, k, n, seed=k * 3 + n + m)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    got = run(layer, "svdq-hopper", x)
    ref = svdq_reference_forward(layer, x)  # W4A4
    smooth = layer.tensor("smooth_factor").float()
    exact_act = (x.float() / smooth) @ layer.method.dequantize(layer).t() + layer.bias.float() \
        + (x.float() @ layer.tensor("proj_down").float()) @ layer.tensor("proj_up").float().t()
    assert rel(got, ref) < 0.2, rel(got, ref)
    assert rel(got, exact_act) <= rel(ref, exact_act) + 1e-3, (rel(got, exact_act), rel(ref, exact_act))


@pytest.mark.parametrize("k,n", [(3072, 18432), (256, 384), (192, 48)])
@pytest.mark.parametrize("m", sorted({1, 2, 7, GEMV_MAX_M, GEMV_MAX_M + 1, 100}))
def test_awq_w4a16_matches_reference(k, n, m):
    layer = make_layer(LayerQuant(Scheme.AWQ_W4A16), k, n, seed=m)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    got = run(layer, "svdq-hopper", x)
    ref = layer.method.dequantize(layer)
    ref = x.float() @ ref.t() + layer.bias.float()
    assert rel(got, ref) < 1e-2, rel(got, ref)


@pytest.mark.parametrize("m", [1, 2])  # the GEMV and the tensor-core kernel
def test_awq_compiles_without_graph_breaks(m):
    layer = make_layer(LayerQuant(Scheme.AWQ_W4A16), 256, 384, seed=m)
    x = torch.randn(m, 256, device="cuda", dtype=torch.bfloat16)
    eager = run(layer, "svdq-hopper", x)
    torch._dynamo.reset()
    assert torch.equal(torch.compile(layer, fullgraph=True)(x), eager)  # custom ops run as they do eagerly


@pytest.mark.parametrize("backend", ["svdq-hopper", "svdq-hopper-exact"])
@pytest.mark.parametrize("m", [1, 100])
def test_ops_compile_without_graph_breaks(backend, m):
    lq = LayerQuant(Scheme.SVDQ_INT4, lora_rank=32)
    layer = make_layer(lq, 256, 384, seed=0)
    gen = torch.Generator(device="cuda").manual_seed(m)
    x = torch.randn(m, 256, device="cuda", dtype=torch.bfloat16, generator=gen)
    eager = run(layer, backend, x)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)(x)
    if backend == "svdq-hopper-exact":
        assert torch.equal(eager, compiled)  # its custom ops run as they do eagerly
    else:
        # The FP8 quantization is fused under compile, with the shifted, smoothed input kept in float32
        # instead of bf16: some activations round to the neighbouring E4M3 value (one row of 256 moved
        # the output by 2.3% once). Compiled must be as close to the W4A4 reference as eager is.
        ref = svdq_reference_forward(layer, x)
        assert rel(compiled, ref) <= 1.1 * rel(eager, ref) + 5e-3, (rel(compiled, ref), rel(eager, ref))
        assert rel(compiled, eager) < 0.05


@pytest.mark.parametrize("precision", ["int4", "nvfp4"])
def test_converted_tiny_qwen_image_runs_on_the_gpu_backend(tmp_path, precision):
    """A Nunchaku checkpoint packed by DeepCompressor, converted, loaded on the GPU: every quantized layer
    on svdq-hopper, output close to the reference backend's."""
    import qdit
    from qdit.api import random_transformer
    from qdit.models import adapter_by_name
    from qdit.tools.convert_nunchaku import convert_nunchaku_checkpoint
    from tests.helpers.nunchaku_models import CONFIGS, nunchaku_state_dict, write_merged_file

    bf16 = random_transformer("qwen-image", config=CONFIGS["qwen-image"], dtype=torch.bfloat16, seed=1)
    state = nunchaku_state_dict("qwen-image", {k: v for k, v in bf16.state_dict().items()}, precision, 32)
    merged = write_merged_file(tmp_path / "m.safetensors", "qwen-image", state, precision, 32)
    folder = convert_nunchaku_checkpoint(merged, tmp_path / "conv")
    fast = qdit.load_transformer(folder, device="cuda")  # chosen automatically
    slow = qdit.load_transformer(folder, device="cuda", backend="reference")
    assert set(fast.qdit_load_report.backends) == {"svdq-hopper"}
    inputs = adapter_by_name("qwen-image").example_inputs(fast.config, batch=1, height=256, width=256, device="cuda")
    inputs = {k: v.to("cuda") if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    with torch.no_grad():
        a, b = fast(**inputs)[0], slow(**inputs)[0]
    assert rel(a, b) < 0.1, rel(a, b)  # W4A8 / W4A16 routes against W4A4
    expanded = qdit.load_transformer(folder, device="cuda", weights_4bit="expanded_fp8")
    quantized = [m for m in expanded.modules() if getattr(m, "layer_quant", None) is not None]
    assert {frozenset(m.released) for m in quantized} == {frozenset({"qweight", "wscales"}), frozenset()}
    # Expanded, each attention's q/k/v (and text q/k/v) are fused: one quantization, one GEMM.
    fused = [(parent, name) for parent in expanded.modules() for name in list(parent._modules)
             if name.startswith(FUSED_PREFIX)]
    assert len(fused) == 2 * expanded.config.num_layers
    with torch.no_grad():
        c = expanded(**inputs)[0]
        assert rel(c, a) < 0.01, rel(c, a)  # only the fused GEMMs' accumulation order differs
        for parent, name in fused:
            del parent._modules[name]
        # unfused: the FP8 weight each call would expand, built once: the same output
        assert torch.equal(expanded(**inputs)[0], a)
    # FP8 attention: the output projections multiply the attention's E4M3 codes as they are
    # (qdit.quant.fp8_input), eager and compiled.
    fp8_attention = qdit.load_transformer(folder, device="cuda", weights_4bit="expanded_fp8", attention="fp8")
    with torch.no_grad():
        d = fp8_attention(**inputs)[0]
        assert rel(d, c) < 0.05, rel(d, c)
        for block in fp8_attention.transformer_blocks:
            block.compile(fullgraph=True)
        assert rel(fp8_attention(**inputs)[0], d) < 0.02
    torch._dynamo.reset()
    if precision == "int4":  # Nunchaku's own arithmetic, forced
        exact = qdit.load_transformer(folder, device="cuda", backend="svdq-hopper-exact")
        with torch.no_grad():
            c = exact(**inputs)[0]
        assert rel(c, b) < 0.02, rel(c, b)


def qkv_layers(precision, k, n, seed, expanded=True, same_smoothing=True):
    """Three SVDQuant layers as a converted Nunchaku q/k/v: one smoothing vector, prepared on svdq-hopper."""
    lq = (LayerQuant(Scheme.SVDQ_INT4, lora_rank=32) if precision == "int4"
          else LayerQuant(Scheme.SVDQ_NVFP4, lora_rank=32, wtscale=True))
    layers = [make_layer(lq, k, n, seed=seed + i) for i in range(3)]
    for layer in layers[1:]:
        if same_smoothing:
            layer.set_tensor("smooth_factor", layers[0].tensor("smooth_factor").clone())
    backend = backend_by_name("svdq-hopper")
    for layer in layers:
        layer.expand_fp8_at_load = expanded
        layer.backend = backend
        backend.prepare(layer)
    return layers, backend


@pytest.mark.parametrize("precision", ["int4", "nvfp4"])
@pytest.mark.parametrize("m", [1, 256, 4096])
def test_fused_projections_match_each_layer(precision, m):
    """q, k and v fused (qdit.quant.shared_input): one per-token quantization (the same codes each layer
    makes) and one GEMM over the stacked weights; each output as the layer's own up to the GEMM's
    accumulation order; the layers' weights become views of the stacked one and still run alone."""
    layers, backend = qkv_layers(precision, 3072, 3072, seed=m)
    x = torch.randn(m, 3072, device="cuda", dtype=torch.bfloat16)
    alone = [layer(x) for layer in layers]
    fused, reason = backend.fuse_shared_input(layers)
    assert fused is not None, reason
    outs = fused(x.unsqueeze(0))
    for got, want in zip(outs, alone):
        assert got.shape == (1, m, 3072)
        assert rel(got[0], want) < 5e-3, rel(got[0], want)  # bias: in the epilogue vs a bf16 add
    for layer, want in zip(layers, alone):
        assert layer.w4a8_weight.untyped_storage().data_ptr() == fused.weight.untyped_storage().data_ptr()
        assert torch.equal(layer(x), want)
    torch._dynamo.reset()
    compiled = torch.compile(fused, fullgraph=True)(x)
    for got, layer in zip(compiled, layers):  # compiled, the quantization is fused alike in both
        want = torch.compile(layer, fullgraph=True)(x)
        assert rel(got, want) < 5e-3, rel(got, want)


def test_projections_fuse_whatever_their_smoothing_but_not_when_packed():
    """The W4A8 route folds each layer's smoothing into its weight, so q/k/v with different smoothing
    vectors (a checkpoint whose projections were calibrated apart) still share one quantized input."""
    layers, backend = qkv_layers("int4", 256, 384, seed=0, same_smoothing=False)
    packed, _ = qkv_layers("int4", 256, 384, seed=0, expanded=False, same_smoothing=False)  # the same layers
    x = torch.randn(300, 256, device="cuda", dtype=torch.bfloat16)
    fused, reason = backend.fuse_shared_input(layers)
    assert fused is not None, reason
    for got, layer, twin in zip(fused(x), layers, packed):
        assert rel(got, layer(x)) < 5e-3
        assert rel(got, svdq_reference_forward(twin, x)) < 0.2
    layers, backend = qkv_layers("int4", 256, 384, seed=0, expanded=False)
    assert backend.fuse_shared_input(layers) == (None, "their 4-bit weights are expanded per call "
                                                       "(weights_4bit='packed')")


@pytest.mark.parametrize("precision", ["int4", "nvfp4"])
@pytest.mark.parametrize("m", [1, 256, 4096])
@pytest.mark.parametrize("expanded", [False, True])
def test_deferred_gelu_is_the_layer_on_the_gelu_output(precision, m, expanded):
    """An MLP's output Linear with input_gelu (qdit.models.activations.defer_gelu_to_next_linear) takes the
    pre-activation without the first Linear's bias and applies bias and GELU in its quantization pass: as
    close to the reference on the GELU's output as the layer run on that output itself; eager and compiled
    alike."""
    from qdit.models.activations import gelu_tanh

    lq = (LayerQuant(Scheme.SVDQ_INT4, lora_rank=32, gelu_shift=True) if precision == "int4"
          else LayerQuant(Scheme.SVDQ_NVFP4, lora_rank=32, wtscale=True))
    layer, twin = make_layer(lq, 12288, 3072, seed=m), make_layer(lq, 12288, 3072, seed=m)  # twin stays packed
    layer.expand_fp8_at_load = expanded
    backend = backend_by_name("svdq-hopper")
    assert backend.fuse_input_gelu(layer).ok
    layer.backend = backend
    backend.prepare(layer)
    h = torch.randn(m, 12288, device="cuda", dtype=torch.bfloat16) * 2
    fc1_bias = (torch.randn(12288, device="cuda") * 0.5).bfloat16()
    g = gelu_tanh(h + fc1_bias)
    on_gelu = layer(g)
    ref = svdq_reference_forward(twin, g)
    layer.input_gelu, layer.input_gelu_bias = True, fc1_bias
    deferred = layer(h)
    assert "GELU applied as it is quantized" in repr(layer)
    # Two FP8 roundings of nearly the same values (one of the bf16 GELU output, one of the float32 GELU),
    # each ~1-2 % in norm: they differ by about as much (0.011-0.015 on an H100).
    assert rel(deferred, on_gelu) < 3e-2, rel(deferred, on_gelu)
    assert rel(deferred, ref) <= 1.1 * rel(on_gelu, ref) + 2e-3, (rel(deferred, ref), rel(on_gelu, ref))
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)(h)
    assert rel(compiled, deferred) < 1e-3, rel(compiled, deferred)


def test_exact_backend_keeps_the_gelu_in_the_mlp():
    layer = make_layer(LayerQuant(Scheme.SVDQ_INT4, lora_rank=32, gelu_shift=True), 256, 384, seed=0)
    verdict = backend_by_name("svdq-hopper-exact").fuse_input_gelu(layer)
    assert not verdict.ok and "INT4 in its own pass" in verdict.reason


@pytest.mark.parametrize("precision", ["int4", "nvfp4"])
@pytest.mark.parametrize("m", [1, 256, 4096])
def test_fp8_input_is_the_layer_on_its_dequantized_value(precision, m):
    """An E4M3 activation with one scale (the FP8 attention's output) multiplied as it is: the layer's
    output on the dequantized activation, up to that path's second (per-token) rounding, and at least as
    close to the unquantized-activation layer."""
    from qdit.kernels.attention_fp8 import quantize_per_tensor
    from qdit.quant.fp8_input import FP8Activation, linear

    layers, backend = qkv_layers(precision, 3072, 3072, seed=m, expanded=False)  # packed: the reference reads it
    layer = layers[0]
    # as the processors hand it over: [B, S, H, D] codes with one scale, heads flattened
    codes, scale = quantize_per_tensor(torch.randn(1, m, 24, 128, device="cuda", dtype=torch.bfloat16))
    activation = FP8Activation(codes.flatten(2, 3), scale, torch.bfloat16)
    assert backend.takes_fp8_input(layer)
    got = linear(layer, activation)
    want = layer(activation.dequantize())
    assert got.shape == want.shape == (1, m, 3072)
    # The requantized path rounds the activation a second time (per token): the two differ by about one
    # FP8 rounding (0.028-0.030 on an H100), and the codes taken as they are lose nothing more.
    value = activation.dequantize()[0]
    exact = unquantized_activation_forward(layer, value)
    assert rel(got, want) < 5e-2, rel(got, want)
    assert rel(got[0], exact) <= rel(want[0], exact) + 1e-3, (rel(got[0], exact), rel(want[0], exact))
    assert rel(got[0], svdq_reference_forward(layer, value)) < 0.2
