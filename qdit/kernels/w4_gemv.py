"""Products with 4-bit weights at a few rows (M = batch: the timestep-conditioning Linears), straight from
the packed codes. At one row a layer reads its whole weight for little arithmetic: cuBLAS BF16 reads 4x the
bytes of the codes, and the W4A8 route's FP8 expansion writes and re-reads an FP8 copy of the weight.

- GEMV (M <= GEMV_MAX_M): one row of x per program. It decodes each packed byte into two float32 values on
  the CUDA cores, multiplies by x, sums each group's products and scales the sum once per group; decoding,
  not the bytes read, bounds it. NVFP4: E2M1 codes, e4m3 scales per 16, the tensor scale applied at the
  end. AWQ: unsigned INT4, w = code * scale + zero per 64, the zero term being zero * sum(x over the group).
- AWQ above GEMV_MAX_M rows: a split-K kernel that decodes into bf16 in its main loop and multiplies on
  tensor cores (the GEMV's cost grows with M; this one's does not, up to 16 rows per tile).

Activations stay in the model dtype, unquantized: the weight is exactly the format's weight.
"""

from __future__ import annotations

import torch

from qdit.kernels.fp8_scaled_mm import triton
from qdit.kernels.w4_codes import E2M1_FP16_UNSCALE

if triton is not None:
    import triton.language as tl

    from qdit.kernels.w4_codes import E2M1_UNSCALE, e2m1_fp16_scaled, uint4_value

# Rows up to which the GEMV runs; NVFP4 layers above it take the W4A8 route, AWQ layers the tensor-core
# kernel. The GEMV is bound by decoding (with the same bytes read, a decode of fewer instructions ran
# faster), and each row decodes the weight again, so it serves one row: on the H200 at M = 1 it took
# 32.8 us on an 18432 x 3072 NVFP4 weight, cuBLAS BF16 40.3 us (benchmarks/kernels/gemv_variants.py,
# benchmarks/results/h200-2026-12-03c/). Two rows were not timed with this kernel.
GEMV_MAX_M = 1

if triton is not None:

    @triton.jit
    def _w4_gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, global_scale_ptr, bias_ptr, M, N, K, stride_xm,
                        BYTES_PER_SPLIT, AWQ: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_B: tl.constexpr, EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr):
        """Partial sums over one K slice for one row m: out[split, m, n] = sum_k x[m, k] * w[n, k]
        (NVFP4: times 2**-14). EPILOGUE (one split): the layer's output, out[m, n] = that sum (NVFP4: times
        2**14 and the tensor scale) + bias[n], in out's dtype, so no separate kernels finish the layer."""
        pid_m, pid_n, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        kb = K // 2
        group_bytes: tl.constexpr = GROUP // 2
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = offs_n < N
        acc = tl.zeros((BLOCK_N, BLOCK_B // group_bytes), dtype=tl.float32)
        start = pid_s * BYTES_PER_SPLIT
        for b0 in range(start, tl.minimum(start + BYTES_PER_SPLIT, kb), BLOCK_B):
            offs_b = b0 + tl.arange(0, BLOCK_B)
            bmask = offs_b < kb
            packed = tl.load(w_ptr + offs_n[:, None] * kb + offs_b[None, :], mask=nmask[:, None] & bmask[None, :],
                             other=0).to(tl.int32)
            x2 = tl.load(x_ptr + pid_m * stride_xm + 2 * offs_b[:, None] + tl.arange(0, 2)[None, :],
                         mask=bmask[:, None], other=0.0)
            x_even, x_odd = tl.split(x2.to(tl.float32))  # element 2b from the low nibble of byte b
            if AWQ:
                p = uint4_value(packed) * x_even[None, :] + uint4_value(packed >> 4) * x_odd[None, :]
            else:
                p = e2m1_fp16_scaled(packed) * x_even[None, :] + e2m1_fp16_scaled(packed >> 4) * x_odd[None, :]
            offs_g = b0 // group_bytes + tl.arange(0, BLOCK_B // group_bytes)
            gmask = nmask[:, None] & (offs_g[None, :] < K // GROUP)
            scale = tl.load(s_ptr + offs_n[:, None] * (K // GROUP) + offs_g[None, :], mask=gmask, other=0.0)
            acc += tl.sum(tl.reshape(p, (BLOCK_N, BLOCK_B // group_bytes, group_bytes)), axis=2) * scale.to(tl.float32)
            if AWQ:
                zero = tl.load(z_ptr + offs_n[:, None] * (K // GROUP) + offs_g[None, :], mask=gmask, other=0.0)
                x_group = tl.sum(tl.reshape(x_even + x_odd, (BLOCK_B // group_bytes, group_bytes)), axis=1)
                acc += zero.to(tl.float32) * x_group[None, :]
        y = tl.sum(acc, axis=1)
        if EPILOGUE:
            if not AWQ:
                y = y * tl.load(global_scale_ptr) * E2M1_UNSCALE
            if HAS_BIAS:
                y = y + tl.load(bias_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)
            tl.store(out_ptr + pid_m * N + offs_n, y.to(out_ptr.dtype.element_ty), mask=nmask)
        else:
            tl.store(out_ptr + pid_s * M * N + pid_m * N + offs_n, y, mask=nmask)

    @triton.jit
    def _awq_dot_kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, M, N, K, stride_xm, K_PER_SPLIT,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """Partial sums over one K slice, one 64-group (32 packed bytes) per iteration:
        out[split, m, n] = sum_k x[m, k] * (code[n, k] * scale[n, k/64] + zero[n, k/64])."""
        pid_m, pid_n, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mmask, nmask = offs_m < M, offs_n < N
        offs_j = tl.arange(0, 32)
        groups = K // 64
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        g_start = pid_s * (K_PER_SPLIT // 64)
        for g in range(g_start, tl.minimum(g_start + K_PER_SPLIT // 64, groups)):
            packed = tl.load(w_ptr + offs_n[:, None] * (K // 2) + g * 32 + offs_j[None, :], mask=nmask[:, None],
                             other=0)
            scale = tl.load(s_ptr + offs_n * groups + g, mask=nmask, other=0.0).to(tl.float32)[:, None]
            zero = tl.load(z_ptr + offs_n * groups + g, mask=nmask, other=0.0).to(tl.float32)[:, None]
            codes = packed.to(tl.int32)
            w_even = (uint4_value(codes) * scale + zero).to(tl.bfloat16)
            w_odd = (uint4_value(codes >> 4) * scale + zero).to(tl.bfloat16)
            x_even = tl.load(x_ptr + offs_m[:, None] * stride_xm + g * 64 + 2 * offs_j[None, :], mask=mmask[:, None],
                             other=0.0)
            x_odd = tl.load(x_ptr + offs_m[:, None] * stride_xm + g * 64 + 2 * offs_j[None, :] + 1,
                            mask=mmask[:, None], other=0.0)
            acc = tl.dot(x_even.to(tl.bfloat16), tl.trans(w_even), acc)
            acc = tl.dot(x_odd.to(tl.bfloat16), tl.trans(w_odd), acc)
        tl.store(out_ptr + pid_s * M * N + offs_m[:, None] * N + offs_n[None, :], acc,
                 mask=mmask[:, None] & nmask[None, :])


# BLOCK_N, BLOCK_B (packed bytes along K), warps, programs per SM for the split-K plan: the fastest tiles of
# the fp16-bits decode on the 18432 x 3072 weight in the H200 sweep (benchmarks/kernels/gemv_variants.py).
GEMV_TILES = (8, 256, 4, 4)


def split_k_plan(m: int, n: int, k: int, block_m: int, block_n: int, k_step: int, per_sm: int,
                 device: torch.device) -> tuple[int, int]:
    """(splits, K per split, a multiple of k_step): enough programs to give each SM per_sm of them at
    small M, where the output tiles alone would leave most of the GPU idle."""
    count = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    steps = triton.cdiv(k, k_step)
    splits = max(1, min(steps, triton.cdiv(per_sm * sms, count)))
    k_per_split = triton.cdiv(steps, splits) * k_step
    return triton.cdiv(k, k_per_split), k_per_split


def _gemv(x, packed, scales, zeros, global_scale: torch.Tensor | None, bias: torch.Tensor | None, awq: bool,
          tiles=GEMV_TILES) -> torch.Tensor:
    """x [M, K] @ w^T (NVFP4: times its float32 [1] tensor scale) + bias, in x's dtype. One K split (the
    large conditioning weights) finishes in the kernel; several are summed after it."""
    m, k = x.shape
    n = packed.shape[0]
    block_n, block_b, warps, per_sm = tiles
    group = k // scales.shape[1]
    block_b = max(min(block_b, triton.next_power_of_2(k // 2)), group // 2)  # no wasted lanes on short rows
    splits, k_per_split = split_k_plan(m, n, k, 1, block_n, 2 * block_b, per_sm, x.device)
    epilogue = splits == 1
    out = torch.empty((m, n) if epilogue else (splits, m, n), dtype=x.dtype if epilogue else torch.float32,
                      device=x.device)
    if m:
        grid = (m, triton.cdiv(n, block_n), splits)
        _w4_gemv_kernel[grid](x, packed, scales, zeros, out, global_scale, bias, m, n, k, x.stride(0),
                              k_per_split // 2, AWQ=awq, GROUP=group, BLOCK_N=block_n, BLOCK_B=block_b,
                              EPILOGUE=epilogue, HAS_BIAS=bias is not None, num_warps=warps)
    if epilogue:
        return out
    y = out.sum(0) if awq else out.sum(0) * (global_scale * E2M1_FP16_UNSCALE)
    return _add_bias(y, bias, x.dtype)


def _awq_dot(x, qweight, wscales, wzeros) -> torch.Tensor:
    m, k = x.shape
    n = qweight.shape[0]
    block_m, block_n = 16, 64
    splits, k_per_split = split_k_plan(m, n, k, block_m, block_n, 64, 4, x.device)
    partial = torch.empty((splits, m, n), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), splits)
    _awq_dot_kernel[grid](x, qweight, wscales, wzeros, partial, m, n, k, x.stride(0), k_per_split,
                          BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4)
    return partial[0] if splits == 1 else partial.sum(0)


def _add_bias(y: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    return (y if bias is None else y + bias.float()).to(dtype)


@torch.library.custom_op("qdit::nvfp4_gemv", mutates_args=())
def nvfp4_gemv(x: torch.Tensor, weight: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] @ dequant(NVFP4 weight [N, K/2] packed, e4m3 scales [N, K/16], global_scale [1])^T
    (+ bias), in x's dtype."""
    return _gemv(x, weight, block_scale, None, global_scale, bias, awq=False)


@nvfp4_gemv.register_fake
def _(x, weight, block_scale, global_scale, bias):
    return torch.empty((x.shape[0], weight.shape[0]), dtype=x.dtype, device=x.device)


@torch.library.custom_op("qdit::awq_w4a16_gemm", mutates_args=())
def awq_w4a16_gemm(x: torch.Tensor, qweight: torch.Tensor, wscales: torch.Tensor, wzeros: torch.Tensor,
                   bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] @ (code * scale + zero)^T (+ bias), in x's dtype: AWQ W4A16, unsigned codes, 64-groups."""
    if x.shape[0] <= GEMV_MAX_M:
        return _gemv(x, qweight, wscales, wzeros, None, bias, awq=True)
    return _add_bias(_awq_dot(x, qweight, wscales, wzeros), bias, x.dtype)


@awq_w4a16_gemm.register_fake
def _(x, qweight, wscales, wzeros, bias):
    return torch.empty((x.shape[0], qweight.shape[0]), dtype=x.dtype, device=x.device)
