"""FP8 backend for Ada/Hopper/Blackwell: the activation is quantized by one Triton pass (eager) or by
ops inductor fuses into the producing kernel (compiled); cuBLASLt's FP8 GEMM (torch._scaled_mm)
multiplies. The Triton passes are torch custom ops with fake implementations, so a transformer block
compiles with torch.compile(fullgraph=True) without graph breaks.

Math is the reference backend's (qdit.kernels.reference), up to the GEMM's accumulation order:
  FP8, static:   xq = e4m3_sat(x / input_scale);   y = (xq @ Wq^T) * input_scale * weight_scale + b
  FP8, dynamic / FP8_PER_CHANNEL: per-token s_m = amax(x[m]) / 448;  y = (xq @ Wq^T) * s_m * ws + b

The per-token pass also serves the W4A8 routes (qdit.kernels.nvfp4_hopper, svdquant_hopper), and in the
variant qdit::fp8_quant_per_token_gelu it adds a bias and applies an MLP's tanh-GELU to the row before
quantizing it.
"""

from __future__ import annotations

import torch

from qdit.kernels.registry import YES, Verdict
from qdit.quant import numerics
from qdit.quant.scheme import ActivationScale, LayerQuant, Scheme

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs (the CPU torch wheel ships without Triton)
    triton = None

E4M3_MAX = 448.0

if triton is not None:

    @triton.jit
    def _tanh_approx(x):
        # One special-function instruction instead of exp + an IEEE division (two of them, and the
        # special-function units run at 1/8 the FP32 rate). Its error, ~2**-11 absolute near |tanh| = 1
        # (so up to ~2.5e-4 |x| on the GELU's small negative outputs), is far below the FP8 quantization's
        # noise on the row the value is quantized with.
        return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)

    @triton.jit
    def _input_transform(x, bias_ptr, k_offs, mask, HAS_BIAS: tl.constexpr, GELU: tl.constexpr):
        """gelu_tanh(x + bias[k]) (each part where asked), float32 throughout."""
        if HAS_BIAS:
            x = x + tl.load(bias_ptr + k_offs, mask=mask, other=0.0).to(tl.float32)
        if GELU:  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
            x = x * (0.5 + 0.5 * _tanh_approx(x * (0.7978845608028654 + 0.03567740813636141 * x * x)))
        return x

    @triton.jit
    def _quant_per_token_kernel(x_ptr, bias_ptr, q_ptr, s_ptr, K, stride_x, stride_q, BLOCK_K: tl.constexpr,
                                HAS_BIAS: tl.constexpr, GELU: tl.constexpr):
        """Per-token E4M3 of t = transform(x) (see _input_transform), one row per program."""
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK_K)
        if BLOCK_K >= K:  # the row in one block: read and transformed once
            m = offs < K
            x = tl.load(x_ptr + row * stride_x + offs, mask=m, other=0.0).to(tl.float32)
            t = _input_transform(x, bias_ptr, offs, m, HAS_BIAS, GELU)
            row_amax = tl.max(tl.where(m, tl.abs(t), 0.0), axis=0)
            scale = tl.where(row_amax > 0, row_amax / 448.0, 1.0)
            tl.store(s_ptr + row, scale)
            q = tl.clamp(t / scale, -448.0, 448.0)
            tl.store(q_ptr + row * stride_q + offs, q.to(tl.float8e4nv), mask=m)
        else:
            # Pass 1: row amax (the row is read twice; the second read mostly hits L2).
            amax = tl.zeros([BLOCK_K], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                m = (k0 + offs) < K
                x = tl.load(x_ptr + row * stride_x + k0 + offs, mask=m, other=0.0).to(tl.float32)
                t = _input_transform(x, bias_ptr, k0 + offs, m, HAS_BIAS, GELU)
                amax = tl.maximum(amax, tl.where(m, tl.abs(t), 0.0))
            row_amax = tl.max(amax, axis=0)
            scale = tl.where(row_amax > 0, row_amax / 448.0, 1.0)
            tl.store(s_ptr + row, scale)
            for k0 in range(0, K, BLOCK_K):
                m = (k0 + offs) < K
                x = tl.load(x_ptr + row * stride_x + k0 + offs, mask=m, other=0.0).to(tl.float32)
                t = _input_transform(x, bias_ptr, k0 + offs, m, HAS_BIAS, GELU)
                q = tl.clamp(t / scale, -448.0, 448.0)
                tl.store(q_ptr + row * stride_q + k0 + offs, q.to(tl.float8e4nv), mask=m)

    @triton.jit
    def _quant_static_kernel(x_ptr, q_ptr, scale_ptr, numel, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < numel
        scale = tl.load(scale_ptr)
        x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
        q = tl.clamp(x / scale, -448.0, 448.0)
        tl.store(q_ptr + offs, q.to(tl.float8e4nv), mask=m)


# The per-token pass holds a row of up to ROW_IN_ONE_BLOCK values in one block (read and transformed once);
# wider rows go in CHUNK_TILES = (BLOCK_K, warps) chunks, read twice (the second time mostly from L2). On an
# H100, bias + GELU + quantization of the MLP hidden (4096 x 12288) took 69.5 us in 4096-wide chunks of 8
# warps and 82.4 us with the row in one 16384-wide block of 16 warps (without the bias: 61.3 and 56.1 us)
# (benchmarks/results/h100-2026-12-06b/run2-gelu-quant.txt, run1-gelu-quant.txt).
ROW_IN_ONE_BLOCK = 4096
CHUNK_TILES = (4096, 8)


def launch_quant_per_token(x: torch.Tensor, bias: torch.Tensor | None = None, gelu: bool = False,
                           tiles: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-token Triton pass over x [M, K] (contiguous rows); see fp8_quant_per_token_gelu. tiles:
    (BLOCK_K, warps), for benchmarks; a BLOCK_K >= K holds the row in one block."""
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m:
        if tiles is None:
            whole = triton.next_power_of_2(k)
            tiles = (whole, 8 if whole >= 2048 else 4) if whole <= ROW_IN_ONE_BLOCK else CHUNK_TILES
        block, warps = tiles
        _quant_per_token_kernel[(m,)](x, bias, q, s, k, x.stride(0), q.stride(0), BLOCK_K=block,
                                      HAS_BIAS=bias is not None, GELU=gelu, num_warps=warps)
    return q, s


@torch.library.custom_op("qdit::fp8_quant_per_token", mutates_args=())
def fp8_quant_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (contiguous rows) -> (e4m3 [M, K], float32 scales [M, 1])."""
    return launch_quant_per_token(x)


@fp8_quant_per_token.register_fake
def _(x):
    return (torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device),
            torch.empty((x.shape[0], 1), dtype=torch.float32, device=x.device))


@torch.library.custom_op("qdit::fp8_quant_per_token_gelu", mutates_args=())
def fp8_quant_per_token_gelu(x: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token E4M3 codes and float32 scales [M, 1] of t = gelu_tanh(x + bias) (bias [K] optional),
    computed in float32 in the quantization pass itself: an MLP's hidden activation (the first Linear's
    output before its bias) costs no pass of its own, and t is never written. The GELU's tanh is the GPU's
    approximate instruction (absolute error ~2**-11, see _tanh_approx)."""
    return launch_quant_per_token(x, bias, gelu=True)


@fp8_quant_per_token_gelu.register_fake
def _(x, bias):
    return (torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device),
            torch.empty((x.shape[0], 1), dtype=torch.float32, device=x.device))


@torch.library.custom_op("qdit::fp8_quant_static", mutates_args=())
def fp8_quant_static(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    q = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    n = x.numel()
    if n:
        _quant_static_kernel[(triton.cdiv(n, 4096),)](x, q, scale, n, BLOCK=4096, num_warps=8)
    return q


@fp8_quant_static.register_fake
def _(x, scale):
    return torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)


# Widest row that qdit's compile heuristics (qdit.compile.PersistentRowReductions) have inductor reduce
# with the row held in registers. The DiTs' hidden sizes (3072, 3840) are below it; their MLP hidden
# (12288, 15360) is above.
PERSISTENT_ROW_MAX = 4096


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token E4M3 codes and float32 scales [M, 1] of x [M, K]. Eager: one Triton pass. Under
    torch.compile, rows up to PERSISTENT_ROW_MAX wide use the reference's tensor ops, which inductor fuses
    into the kernel that produced x (norm + modulation), so the activation is not read again. Wider rows
    use the Triton pass too: inductor loops over such a row twice, recomputing the producer (GELU, shift,
    smoothing) for the second loop, and that kernel took 138 us where the producer's own kernel plus this
    pass took 99 us (4096 x 12288, H200; benchmarks/kernels/wide_row_quant.py)."""
    if torch.compiler.is_compiling() and x.shape[-1] <= PERSISTENT_ROW_MAX:
        return numerics.fp8_quantize_per_token(x)
    return fp8_quant_per_token(x)


def quantize_static(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """E4M3 codes of x / scale (a calibrated per-tensor scale); fused like quantize_per_token."""
    return numerics.fp8_quantize_static(x, scale) if torch.compiler.is_compiling() else fp8_quant_static(x, scale)


def fp8_gpu_verdict(device: torch.device) -> Verdict:
    """Whether a device can run Triton kernels and FP8 tensor-core GEMMs (Ada, Hopper, Blackwell)."""
    if device.type != "cuda":
        return Verdict(False, f"needs a CUDA device, the model is on {device.type}")
    if triton is None:
        return Verdict(False, "Triton is not installed")
    cap = torch.cuda.get_device_capability(device)
    if cap < (8, 9):
        return Verdict(False, f"FP8 tensor cores need compute capability >= 8.9, this GPU has {cap[0]}.{cap[1]}")
    return YES


class FP8ScaledMMBackend:
    name = "fp8-scaled-mm"

    def supports_device(self, device: torch.device) -> Verdict:
        return fp8_gpu_verdict(device)

    def can_implement(self, layer_quant: LayerQuant, in_features: int, out_features: int) -> Verdict:
        if layer_quant.scheme not in (Scheme.FP8, Scheme.FP8_PER_CHANNEL):
            return Verdict(False, f"computes FP8 layers only, not {layer_quant.scheme.value}")
        if in_features % 16 or out_features % 16:
            return Verdict(False, f"cuBLASLt FP8 needs K and N multiples of 16, got K={in_features} N={out_features}")
        return YES

    def prepare(self, layer) -> None:
        # cuBLASLt's row-wise mode wants the weight scale as a [1, N] float32 row, built once here.
        w_scale = layer.tensor("weight_scale").float()
        row = w_scale.reshape(1, -1) if w_scale.ndim == 1 else w_scale.reshape(1, 1).expand(1, layer.out_features)
        layer.register_buffer("fp8_weight_scale_row", row.contiguous(), persistent=False)

    def apply(self, layer, x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, x.shape[-1])
        if not x2d.is_contiguous():
            x2d = x2d.contiguous()
        lq = layer.layer_quant
        w_t = layer.tensor("weight").t()  # [K, N] column-major view, what cuBLASLt wants
        w_scale = layer.tensor("weight_scale")
        if lq.scheme is Scheme.FP8 and lq.activation_scale is ActivationScale.STATIC:
            input_scale = layer.tensor("input_scale")
            xq = quantize_static(x2d, input_scale)
            y = torch._scaled_mm(xq, w_t, scale_a=input_scale, scale_b=w_scale, out_dtype=x.dtype,
                                 bias=layer.bias)
        else:
            xq, token_scale = quantize_per_token(x2d)
            y = torch._scaled_mm(xq, w_t, scale_a=token_scale, scale_b=layer.fp8_weight_scale_row, out_dtype=x.dtype)
            if layer.bias is not None:
                y = y + layer.bias
        return y.reshape(*x.shape[:-1], y.shape[-1])
