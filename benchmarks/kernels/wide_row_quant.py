"""The MLP hidden's activation + FP8 quantization (Qwen-Image, 1024², batch 1: 4096 x 12288 bf16), as
inductor compiles it inside qdit's blocks and as one hand-written Triton pass, to see what the compiled
kernels leave on the table:
- static: bias + tanh-GELU + E4M3 with a calibrated per-tensor scale (qdit's FP8/NVFP4 `_static` formats);
- per token: bias + tanh-GELU + Nunchaku's GELU shift + smoothing + per-token E4M3 (the svdq formats'
  second MLP layer). Inductor loops over a 12288-wide row (reading it twice, recomputing the GELU) unless
  its persistent-row limit (qdit.compile.PERSISTENT_ROW_MAX) covers the row: both limits are timed.
Each pass computes the same roundings as the model (bf16 after the bias, after the GELU, after the shift
and smoothing); "codes differing" is against the inductor kernel with qdit's default heuristics.
Run: python benchmarks/kernels/wide_row_quant.py [OUT_FILE]
"""
import sys

import torch
import triton
import triton.language as tl

from qdit import compile as qdit_compile
from qdit.bench import replay_ms
from qdit.kernels.fp8_scaled_mm import fp8_quant_per_token
from qdit.models.activations import gelu_tanh
from qdit.quant import numerics
from qdit.quant.svdquant import GELU_SHIFT

M, N = 4096, 12288
dev = torch.device("cuda")
gen = torch.Generator(device=dev).manual_seed(0)
hidden = (torch.randn(M, N, device=dev, generator=gen) * 2).bfloat16()
bias = torch.randn(N, device=dev, generator=gen).bfloat16()
inv_smooth = (1.0 / (0.5 + torch.rand(N, device=dev, generator=gen))).bfloat16()
scale = torch.tensor(0.02, device=dev)


def static_model(h):
    return numerics.fp8_quantize_static(gelu_tanh(h + bias), scale)


def per_token_model(h):
    return numerics.fp8_quantize_per_token((gelu_tanh(h + bias) + GELU_SHIFT) * inv_smooth)


@triton.jit
def _gelu(h_ptr, b_ptr, offs, col, mask):
    t = (tl.load(h_ptr + offs, mask=mask, other=0.0) + tl.load(b_ptr + col, mask=mask, other=0.0)).to(tl.float32)
    u = (2 * 0.7978845608028654) * (t + 0.044715 * t * t * t)
    return (t * (1.0 / (1.0 + tl.exp(-u)))).to(tl.bfloat16)  # x * sigmoid(2u), as inductor computes it


@triton.jit
def _static_kernel(h_ptr, b_ptr, s_ptr, q_ptr, numel, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    g = _gelu(h_ptr, b_ptr, offs, offs % N, mask).to(tl.float32)
    q = tl.clamp(g / tl.load(s_ptr), -448.0, 448.0)
    tl.store(q_ptr + offs, q.to(tl.float8e4nv), mask=mask)


@triton.jit
def _per_token_kernel(h_ptr, b_ptr, inv_ptr, q_ptr, s_ptr, N, SHIFT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    col = tl.arange(0, BLOCK)
    mask = col < N
    g = _gelu(h_ptr + row * N, b_ptr, col, col, mask)
    xs = ((g.to(tl.float32) + SHIFT).to(tl.bfloat16) * tl.load(inv_ptr + col, mask=mask, other=0.0)).to(tl.float32)
    amax = tl.max(tl.where(mask, tl.abs(xs), 0.0), axis=0)
    s = tl.where(amax > 0, amax / 448.0, 1.0)
    tl.store(s_ptr + row, s)
    tl.store(q_ptr + row * N + col, tl.clamp(xs / s, -448.0, 448.0).to(tl.float8e4nv), mask=mask)


@triton.jit
def _row_quant_kernel(x_ptr, q_ptr, s_ptr, N, BLOCK: tl.constexpr):
    """Per-token E4M3 of a materialized row, the whole row held in registers (one read)."""
    row = tl.program_id(0)
    col = tl.arange(0, BLOCK)
    mask = col < N
    x = tl.load(x_ptr + row * N + col, mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=0)
    s = tl.where(amax > 0, amax / 448.0, 1.0)
    tl.store(s_ptr + row, s)
    tl.store(q_ptr + row * N + col, tl.clamp(x / s, -448.0, 448.0).to(tl.float8e4nv), mask=mask)


@torch.library.custom_op("qdit_bench::row_quant", mutates_args=())
def row_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    q = torch.empty_like(x, dtype=torch.float8_e4m3fn)
    s = torch.empty((x.shape[0], 1), device=x.device, dtype=torch.float32)
    _row_quant_kernel[(x.shape[0],)](x, q, s, x.shape[1], BLOCK=triton.next_power_of_2(x.shape[1]), num_warps=16)
    return q, s


@row_quant.register_fake
def _(x):
    return torch.empty_like(x, dtype=torch.float8_e4m3fn), x.new_empty((x.shape[0], 1), dtype=torch.float32)


def per_token_producer_then_qdit_op(h):
    """The activation compiled by inductor into a bf16 tensor, then qdit's per-token op (a custom op: the
    row is read twice in 4096-wide chunks, the second read mostly from L2)."""
    return fp8_quant_per_token((gelu_tanh(h + bias) + GELU_SHIFT) * inv_smooth)


def per_token_producer_then_row_op(h):
    return row_quant((gelu_tanh(h + bias) + GELU_SHIFT) * inv_smooth)


def static_triton(h, block=4096, warps=8):
    q = torch.empty_like(h, dtype=torch.float8_e4m3fn)
    _static_kernel[(triton.cdiv(h.numel(), block),)](h, bias, scale, q, h.numel(), N, BLOCK=block, num_warps=warps)
    return q


def per_token_triton(h, warps=16):
    q = torch.empty_like(h, dtype=torch.float8_e4m3fn)
    s = torch.empty((M, 1), device=dev, dtype=torch.float32)
    _per_token_kernel[(M,)](h, bias, inv_smooth, q, s, N, SHIFT=GELU_SHIFT, BLOCK=triton.next_power_of_2(N),
                            num_warps=warps)
    return q, s


def compiled(fn, row_max, **patches):
    """Compiled on its first call, with inductor's persistent-row limit set to row_max for that compile
    (and inductor config patches)."""
    state = {}

    def run(h):
        if "fn" not in state:
            torch._dynamo.reset()
            qdit_compile.PERSISTENT_ROW_MAX = row_max
            with torch._inductor.config.patch(patches):
                state["fn"] = torch.compile(fn, fullgraph=True, backend=qdit_compile.inductor_with_qdit_heuristics)
                state["fn"](h)
            qdit_compile.PERSISTENT_ROW_MAX = default_row_max
        return state["fn"](h)
    return run


def codes_of(out):
    return (out[0] if isinstance(out, tuple) else out).view(torch.uint8)


nbytes = M * N * 3  # bf16 read, e4m3 written
default_row_max = qdit_compile.PERSISTENT_ROW_MAX
lines = [f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
         f"{M} x {N} bf16 -> e4m3, time per call from a CUDA graph of 20 calls, median of 20 replays"]
cases = [
    ("static: inductor, qdit heuristics", compiled(static_model, default_row_max), "static"),
    ("static: inductor, qdit heuristics, max_autotune_pointwise",
     compiled(static_model, default_row_max, max_autotune_pointwise=True), "static"),
    *[(f"static: hand Triton, BLOCK {b}, {w} warps", lambda h, b=b, w=w: static_triton(h, b, w), "static")
      for b, w in ((1024, 4), (2048, 4), (4096, 8), (8192, 8))],
    (f"per token: inductor, qdit heuristics (row limit {default_row_max})", compiled(per_token_model, default_row_max),
     "token"),
    ("per token: inductor, row limit 16384 (persistent)", compiled(per_token_model, 16384), "token"),
    ("per token: inductor activation, then qdit::fp8_quant_per_token",
     compiled(per_token_producer_then_qdit_op, default_row_max), "token"),
    ("per token: inductor activation, then a one-read row kernel",
     compiled(per_token_producer_then_row_op, default_row_max), "token"),
    *[(f"per token: hand Triton, one row per program, {w} warps", lambda h, w=w: per_token_triton(h, w), "token")
      for w in (8, 16, 32)],
]
baseline = {}
for name, fn, kind in cases:
    out = fn(hidden)
    us = replay_ms(lambda: [fn(hidden) for _ in range(20)], iters=20) / 20 * 1e3
    codes = codes_of(fn(hidden))
    baseline.setdefault(kind, codes)
    differing = (codes != baseline[kind]).float().mean().item()
    lines.append(f"{name:62s} {us:7.1f} us  {nbytes / us / 1e3:6.0f} GB/s  codes differing: {differing:.1e}")
    print(lines[-1], flush=True)
if len(sys.argv) > 1:
    with open(sys.argv[1], "w") as f:
        f.write("\n".join(lines) + "\n")
