"""Variants of the 4-bit NVFP4 GEMV at M = 1 on the conditioning Linears' shapes, each checked against the
dequantized weight in float32, next to cuBLAS bf16 / FP8 and qdit's kernel ('current'). do_bench empties
L2 between calls, as the model's distinct weights read in turn do.

    python benchmarks/kernels/gemv_variants.py --out benchmarks/results/<run>/gemv-variants.txt

Variants (M = 1, split-K partial sums as in qdit.kernels.w4_gemv):
- bytes: 2-D tiles of packed bytes, x's even/odd elements from one [B, 2] load split in registers, products
  summed per 16-group before the group scale: qdit.kernels.w4_gemv's kernel at M = 1, its decode switchable;
- decode: 'table' = a nibble table of twice the E2M1 magnitudes; 'f32bits' = e2m1 placed in float32's
  exponent/mantissa bits (0.5 a float32 subnormal), rescaled by 2**126; 'f16bits' (qdit's) = the same in
  fp16 (qdit.kernels.w4_codes), rescaled by 2**14.
The script's first version also timed products scaled per element instead of summed per group (within 6 %)
and a tensor-core variant (the decoded weight times x padded to 16 rows, bf16 MMA: 68.6 us on the
18432 x 3072 weight, 2.4x the best bytes variant), benchmarks/results/h200-2026-12-03c/gemv-variants-run1.txt.
"""

import argparse
import itertools

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

from qdit.kernels import w4_gemv
from qdit.kernels.w4_codes import E2M1_FP16_UNSCALE, e2m1_fp16_scaled
from qdit.quant import numerics

SHAPES = [(18432, 3072), (6144, 3072), (9216, 3072), (15360, 256)]  # (N, K)
E2M1_TWICE_TABLE = tl.constexpr(0xC8643210 - (1 << 32))  # nibble i = 2 * |e2m1 value of code i|


@triton.jit
def e2m1_twice(code):
    mag = (E2M1_TWICE_TABLE >> ((code & 7) << 2)) & 0xF
    return tl.where(code >= 8, -mag, mag).to(tl.float32)


def bench(fn) -> float:
    return do_bench(fn, warmup=5, rep=25, return_mode="median") * 1e3  # us


@triton.jit
def _decode(code, BITS: tl.constexpr):
    if BITS == 1:  # |e2m1| bits at float32 bits 22..24, sign at 31: value * 2**-126 (0.5 a float32 subnormal)
        bits = ((code & 7) << 22) | ((code & 8) << 28)
        return bits.to(tl.float32, bitcast=True)
    elif BITS == 2:  # qdit's: the same through fp16, value * 2**-14
        return e2m1_fp16_scaled(code)
    else:
        return e2m1_twice(code)


@triton.jit
def _bytes_kernel(x_ptr, w_ptr, s_ptr, out_ptr, N, K, BYTES_PER_SPLIT, BITS: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr):
    pid_n, pid_s = tl.program_id(0), tl.program_id(1)
    kb = K // 2
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    acc = tl.zeros((BLOCK_N, BLOCK_B // 8), dtype=tl.float32)
    start = pid_s * BYTES_PER_SPLIT
    for b0 in range(start, tl.minimum(start + BYTES_PER_SPLIT, kb), BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        bmask = offs_b < kb
        packed = tl.load(w_ptr + offs_n[:, None] * kb + offs_b[None, :], mask=nmask[:, None] & bmask[None, :],
                         other=0).to(tl.int32)
        x2 = tl.load(x_ptr + 2 * offs_b[:, None] + tl.arange(0, 2)[None, :], mask=bmask[:, None], other=0.0)
        x_even, x_odd = tl.split(x2.to(tl.float32))
        p = _decode(packed & 0xF, BITS) * x_even[None, :] + _decode(packed >> 4, BITS) * x_odd[None, :]
        offs_g = b0 // 8 + tl.arange(0, BLOCK_B // 8)
        s = tl.load(s_ptr + offs_n[:, None] * (K // 16) + offs_g[None, :],
                    mask=nmask[:, None] & (offs_g[None, :] < K // 16), other=0.0).to(tl.float32)
        acc += tl.sum(tl.reshape(p, (BLOCK_N, BLOCK_B // 8, 8)), axis=2) * s
    tl.store(out_ptr + pid_s * N + offs_n, tl.sum(acc, axis=1), mask=nmask)


def run_variant(kernel, x, w, s, block_n, block_b, warps, per_sm, **meta):
    n, k = w.shape[0], w.shape[1] * 2
    splits, k_per_split = w4_gemv.split_k_plan(1, n, k, 1, block_n, 2 * block_b, per_sm, x.device)
    partial = torch.empty((splits, n), dtype=torch.float32, device=x.device)
    kernel[(triton.cdiv(n, block_n), splits)](x, w, s, partial, n, k, k_per_split // 2, BLOCK_N=block_n,
                                              BLOCK_B=block_b, num_warps=warps, **meta)
    return partial.sum(0)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    lines = [f"GPU {torch.cuda.get_device_name()}; torch {torch.__version__}; triton {triton.__version__}",
             "NVFP4 GEMV variants at M = 1, us (GB/s = packed codes + e4m3 scales read)"]

    def emit(line):
        lines.append(line)
        print(line, flush=True)
        if args.out:
            with open(args.out, "w") as f:
                f.write("\n".join(lines) + "\n")

    tiles = list(itertools.product((8, 16, 32, 64), (128, 256), (4, 8), (4,)))
    for n, k in SHAPES:
        w = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda")
        s = (torch.rand(n, k // 16, device="cuda") + 0.5).to(torch.float8_e4m3fn)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        want = x.float() @ numerics.nvfp4_dequantize(numerics.unpack_nibbles(w), s, torch.ones((), device="cuda")).t()
        gb = n * k * (0.5 + 1 / 16) / 1e3
        wb = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        w8, one = wb.to(torch.float8_e4m3fn), torch.ones(1, 1, device="cuda")
        xq = x.to(torch.float8_e4m3fn)
        results = [("cuBLAS bf16", bench(lambda: x @ wb.t()), ""),
                   ("cuBLAS fp8", bench(lambda: torch._scaled_mm(xq, w8.t(), scale_a=one, scale_b=one,
                                                                out_dtype=torch.bfloat16)), ""),
                   ("current", bench(lambda: w4_gemv._gemv(x, w, s, None, one.reshape(1), None, awq=False)),
                    str(w4_gemv.GEMV_TILES))]
        decodes = {0: ("table", 0.5), 1: ("f32bits", 2.0 ** 126), 2: ("f16bits", E2M1_FP16_UNSCALE)}
        variants = [(f"bytes decode={name}", _bytes_kernel, dict(BITS=bits), factor)
                    for bits, (name, factor) in decodes.items()]
        for name, kernel, meta, factor in variants:
            best = None
            for bn, bb, nw, per_sm in tiles:
                try:
                    y = run_variant(kernel, x, w, s, bn, bb, nw, per_sm, **meta) * factor
                except Exception as e:  # a tile the compiler rejects (registers, shapes): skipped, named
                    emit(f"  N={n} K={k} {name} tiles {(bn, bb, nw, per_sm)}: not compiled ({type(e).__name__})")
                    continue
                err = ((y - want).norm() / want.norm()).item()
                if not err < 1e-5:
                    emit(f"  N={n} K={k} {name} tiles {(bn, bb, nw, per_sm)}: WRONG, rel err {err:.2e}")
                    continue
                t = bench(lambda: run_variant(kernel, x, w, s, bn, bb, nw, per_sm, **meta))
                best = min(best or (t, ()), (t, (bn, bb, nw, per_sm)))
            if best:
                results.append((name, best[0], f"tiles (BLOCK_N, BLOCK_B, warps, per SM) {best[1]}"))
        for name, t, extra in results:
            emit(f"  N={n} K={k} {name}: {t:.1f} us ({gb / t:.0f} GB/s) {extra}")


if __name__ == "__main__":
    main()
