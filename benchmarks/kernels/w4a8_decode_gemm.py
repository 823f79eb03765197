"""An experiment, rejected (benchmarks/results/rejected/w4a8-decode-gemm/): a W4A8 GEMM that decodes the
packed 4-bit weight into FP8 in its main loop, against qdit's W4A8 route (FP8 expansion of the whole
weight + cuBLASLt, qdit.kernels.nvfp4_hopper) at a few hundred rows (the text stream), where the
expansion is a large share of the route's time. Qwen-Image's linear shapes, with a rank-32 low-rank term
(SVDQuant) and without (NVFP4), over a tile sweep; each output is checked against the expansion route's.

The kernel decodes with the expansion's formula and rounding and computes its tile transposed ([N, M]),
the decoded weight being the MMA's A operand in registers; each program decodes its weight tile once per
M tile, and K is split across programs to fill the GPU. On the H200, with its fastest tiles, it took 3.4x
(M = 256) and 5.8x (M = 512) the expansion route's time summed over the shapes and kinds: decoding a
weight tile on the CUDA cores costs more than the FP8 MMAs it feeds, and the expansion does it once per
weight, not once per M tile and split.

    python benchmarks/kernels/w4a8_decode_gemm.py --out benchmarks/results/rejected/w4a8-decode-gemm/sweep.txt
"""

import argparse
import itertools

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

from qdit.kernels import nvfp4_hopper as k4
from qdit.kernels.w4_codes import E2M1_UNSCALE, e2m1_fp16_scaled, int4_value

SHAPES = [(3072, 12288), (12288, 3072), (3072, 3072)]  # (N, K)
KINDS = {"svdq_int4": (True, 32), "svdq_nvfp4": (False, 32), "nvfp4": (False, 0)}  # int4, rank
# BLOCK_N, BLOCK_M, warps, stages, programs per SM
TILES = [(64, 256, 8, 3, 1), (64, 256, 8, 3, 2), (128, 256, 8, 3, 1), (32, 256, 4, 3, 1), (64, 128, 4, 3, 1),
         (128, 128, 8, 3, 2)]


@triton.jit
def _w4a8_decode_gemm_kernel(x_ptr, sa_ptr, w_ptr, s_ptr, rf_ptr, rs_ptr, up_ptr, down_ptr, out_ptr,
                             M, N, K, RANK, K_PER_SPLIT: tl.constexpr, INT4: tl.constexpr, GROUP: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                             PARTIAL: tl.constexpr):
    """out[m, n] = sa[m] * rs[n] * sum_k x[m, k] * w8[n, k] over one K slice (PARTIAL: float32 partial
    sums out[split, m, n]). 64 elements (32 packed bytes) of K per step: the even elements (low nibbles)
    and the odd ones (high nibbles) are two MMAs against the matching activation columns."""
    pid, pid_s = tl.program_id(0), tl.program_id(1)
    n_m = tl.cdiv(M, BLOCK_M)
    pid_m, pid_n = pid % n_m, pid // n_m
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    nmask, mmask = offs_n < N, offs_m < M
    offs_j = tl.arange(0, 32)
    groups_per_step: tl.constexpr = 64 // GROUP
    row_factor = tl.load(rf_ptr + offs_n, mask=nmask, other=0.0)
    if not INT4:
        row_factor = row_factor * E2M1_UNSCALE  # e2m1_fp16_scaled decodes value * 2**-14
    if BLOCK_R > 0:
        offs_r = tl.arange(0, BLOCK_R)
        up = tl.load(up_ptr + offs_n[:, None] * RANK + offs_r[None, :],
                     mask=nmask[:, None] & (offs_r < RANK)[None, :], other=0.0)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for step in range(0, K_PER_SPLIT, 64):
        k0 = pid_s * K_PER_SPLIT + step
        packed = tl.load(w_ptr + offs_n[:, None] * (K // 2) + k0 // 2 + offs_j[None, :], mask=nmask[:, None],
                         other=0).to(tl.int32)
        offs_g = k0 // GROUP + tl.arange(0, groups_per_step)
        scale = tl.load(s_ptr + offs_n[:, None] * (K // GROUP) + offs_g[None, :], mask=nmask[:, None],
                        other=0.0).to(tl.float32) * row_factor[:, None]
        scale = tl.reshape(tl.broadcast_to(scale[:, :, None], (BLOCK_N, groups_per_step, 32 // groups_per_step)),
                           (BLOCK_N, 32))
        if INT4:
            w_even, w_odd = int4_value(packed & 0xF) * scale, int4_value(packed >> 4) * scale
        else:
            w_even, w_odd = e2m1_fp16_scaled(packed) * scale, e2m1_fp16_scaled(packed >> 4) * scale
        if BLOCK_R > 0:
            rmask = (offs_r < RANK)[:, None]
            down_even = tl.load(down_ptr + offs_r[:, None] * K + k0 + 2 * offs_j[None, :], mask=rmask, other=0.0)
            down_odd = tl.load(down_ptr + offs_r[:, None] * K + k0 + 1 + 2 * offs_j[None, :], mask=rmask,
                               other=0.0)
            w_even += tl.dot(up, down_even)
            w_odd += tl.dot(up, down_odd)
        w_even = tl.clamp(w_even, -448.0, 448.0).to(tl.float8e4nv)
        w_odd = tl.clamp(w_odd, -448.0, 448.0).to(tl.float8e4nv)
        x_even = tl.load(x_ptr + offs_m[None, :] * K + k0 + 2 * offs_j[:, None], mask=mmask[None, :], other=0.0)
        x_odd = tl.load(x_ptr + offs_m[None, :] * K + k0 + 1 + 2 * offs_j[:, None], mask=mmask[None, :],
                        other=0.0)
        acc = tl.dot(w_even, x_even, acc)
        acc = tl.dot(w_odd, x_odd, acc)
    rs = tl.load(rs_ptr + offs_n, mask=nmask, other=0.0)
    sa = tl.load(sa_ptr + offs_m, mask=mmask, other=0.0)
    acc = acc * rs[:, None] * sa[None, :]
    omask = nmask[:, None] & mmask[None, :]
    if PARTIAL:
        tl.store(out_ptr + pid_s * M * N + offs_m[None, :] * N + offs_n[:, None], acc, mask=omask)
    else:
        tl.store(out_ptr + offs_m[None, :] * N + offs_n[:, None], acc.to(out_ptr.dtype.element_ty), mask=omask)


# The tiles the kernel was first written with (reported beside the fastest in the sweep).
DEFAULT_TILES = (64, 256, 8, 3, 1)


def even_split(steps: int, tiles: int, per_sm: int, device: torch.device) -> int:
    """K splits that give each SM about per_sm programs, as qdit.kernels.w4_gemv.split_k_plan plans them,
    but dividing the steps evenly: the kernel's K loop has no bound check."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    splits = max(1, min(steps, triton.cdiv(per_sm * sms, tiles)))
    while steps % splits:
        splits -= 1
    return splits


def decode_gemm(xq: torch.Tensor, scale_a: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor,
                row_factor: torch.Tensor, row_scale: torch.Tensor, int4: bool, lr_up: torch.Tensor | None,
                lr_down: torch.Tensor | None, out_dtype: torch.dtype, tiles=DEFAULT_TILES) -> torch.Tensor:
    m, k = xq.shape
    n = weight.shape[0]
    xq, scale_a = xq.contiguous(), scale_a.reshape(-1).contiguous()  # the kernel indexes both by row
    block_n, block_m, warps, stages, per_sm = tiles
    block_m = max(16, min(block_m, triton.next_power_of_2(m)))
    splits = even_split(k // 64, triton.cdiv(m, block_m) * triton.cdiv(n, block_n), per_sm, xq.device)
    k_per_split = k // splits
    partial = splits > 1
    out = torch.empty((splits, m, n) if partial else (m, n), dtype=torch.float32 if partial else out_dtype,
                      device=xq.device)
    if m:
        low_rank = lr_up is not None
        rank = lr_up.shape[1] if low_rank else 0
        grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n), splits)
        _w4a8_decode_gemm_kernel[grid](
            xq, scale_a, weight, scales, row_factor, row_scale, lr_up, lr_down, out, m, n, k, rank, k_per_split,
            INT4=int4, GROUP=k // scales.shape[1], BLOCK_N=block_n, BLOCK_M=block_m,
            BLOCK_R=max(16, triton.next_power_of_2(rank)) if low_rank else 0, PARTIAL=partial,
            num_warps=warps, num_stages=stages)
    return out.sum(0).to(out_dtype) if partial else out


def operands(n, k, m, int4, rank):
    packed = torch.randint(0, 256, (n, k // 2), device="cuda", dtype=torch.uint8)
    scales = (torch.rand(n, k // (64 if int4 else 16), device="cuda") + 0.1).to(
        torch.bfloat16 if int4 else torch.float8_e4m3fn)
    row_factor = torch.rand(n, device="cuda") / 16
    row_scale = (torch.rand(1, n, device="cuda") + 0.5) / 100
    up = torch.randn(n, rank, device="cuda").to(torch.bfloat16) if rank else None
    down = torch.randn(rank, k, device="cuda").to(torch.bfloat16) if rank else None
    xq = torch.randn(m, k, device="cuda").clamp(-400, 400).to(torch.float8_e4m3fn)
    scale_a = torch.rand(m, 1, device="cuda") + 0.5
    return packed, scales, row_factor, row_scale, up, down, xq, scale_a


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--ms", default="256,512")
    args = parser.parse_args()
    ms = [int(v) for v in args.ms.split(",")]
    lines = [f"# {torch.cuda.get_device_name()}; torch {torch.__version__}; us per call (do_bench median)", "",
             "| kind | N x K | M | expand + cuBLASLt | " + " | ".join(str(t) for t in TILES) + " |",
             "|---|---|---|---|" + "---|" * len(TILES)]
    totals: dict[int, dict[tuple, float]] = {}  # M -> tiles -> summed us over kinds and shapes
    baseline: dict[int, float] = {}
    for (kind, (int4, rank)), (n, k), m in itertools.product(KINDS.items(), SHAPES, ms):
        packed, scales, row_factor, row_scale, up, down, xq, scale_a = operands(n, k, m, int4, rank)

        def expand_route():
            w8 = k4._expand_fp8(packed, scales, row_factor, int4, up, down)
            return torch._scaled_mm(xq, w8.t(), scale_a=scale_a, scale_b=row_scale, out_dtype=torch.bfloat16)

        reference = expand_route().float()
        base = do_bench(expand_route, return_mode="median") * 1e3
        baseline[m] = baseline.get(m, 0.0) + base
        cells = []
        for tiles in TILES:
            def decode_route():
                return decode_gemm(xq, scale_a, packed, scales, row_factor, row_scale, int4, up, down,
                                   torch.bfloat16, tiles=tiles)
            err = ((decode_route().float() - reference).norm() / reference.norm()).item()
            us = do_bench(decode_route, return_mode="median") * 1e3
            ok = err < 1e-2
            cells.append(f"{us:.1f}" + ("" if ok else f" (rel. error {err:.1e})"))
            if ok:
                totals.setdefault(m, {}).setdefault(tiles, 0.0)
                totals[m][tiles] += us
        lines.append(f"| {kind} | {n} x {k} | {m} | {base:.1f} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
        with open(args.out, "w") as f:  # partial results survive a time limit
            f.write("\n".join(lines) + "\n")
    lines.append("")
    for m, times in totals.items():
        best = min(times, key=times.get)
        lines.append(f"M={m}: expand + cuBLASLt {baseline[m]:.1f} us summed over kinds and shapes; fastest decode "
                     f"tiles {best}: {times[best]:.1f} us; default {DEFAULT_TILES}: "
                     f"{times.get(DEFAULT_TILES, float('nan')):.1f} us")
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines[-len(totals):]))


if __name__ == "__main__":
    main()
