"""Tile sweep of the 4-bit Hopper kernels on Qwen-Image's linear shapes; prints a table, writes it to --out.

- FP8 expansion (NVFP4 and INT4 codes -> e4m3), GB/s counting bytes read + written, next to the time of
  the FP8 GEMM it feeds at M = 4096 + 256 tokens;
- the NVFP4 W4A16 GEMM at M = 1 and 16 against torch's bf16 matmul on the same shape.

    python benchmarks/kernels/w4_sweep.py --out benchmarks/results/w4-sweep-h200.txt
"""

import argparse
import itertools

import torch
import triton
from triton.testing import do_bench

from qdit.kernels import nvfp4_hopper as k4

SHAPES = [(3072, 12288), (12288, 3072), (18432, 3072), (3072, 3072)]  # (N, K)
TOKENS = 4096 + 256


def bench(fn) -> float:
    return do_bench(fn, warmup=5, rep=25, return_mode="median") * 1e3  # us


def packed_weight(n, k, int4):
    w = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda")
    if int4:
        return w, (torch.rand(n, k // 64, device="cuda") + 0.5).to(torch.bfloat16)
    return w, (torch.rand(n, k // 16, device="cuda") + 0.5).to(torch.float8_e4m3fn)


def sweep_expand(lines):
    lines.append(f"FP8 expansion (GB/s = bytes read + written); the FP8 GEMM it feeds at M={TOKENS}")
    for (n, k), int4 in itertools.product(SHAPES, (False, True)):
        w, s = packed_weight(n, k, int4)
        rf = torch.rand(n, device="cuda")
        out = torch.empty((n, k), dtype=torch.float8_e4m3fn, device="cuda")
        best = None
        for bn, bb, nw in itertools.product((8, 16, 32), (64, 128, 256, 512), (4, 8)):
            grid = (triton.cdiv(n, bn), triton.cdiv(k // 2, bb))
            t = bench(lambda: k4._expand_fp8_kernel[grid](w, s, rf, out, n, k, INT4=int4, GROUP=64 if int4 else 16,
                                                          BLOCK_N=bn, BLOCK_B=bb, num_warps=nw))
            best = min(best or (t, ()), (t, (bn, bb, nw)))
        default = bench(lambda: k4._expand_fp8(w, s, rf, int4))
        xq = torch.randn(TOKENS, k, device="cuda").to(torch.float8_e4m3fn)
        w8 = torch.randn(n, k, device="cuda").to(torch.float8_e4m3fn)
        one = torch.ones(1, 1, device="cuda")
        gemm = bench(lambda: torch._scaled_mm(xq, w8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16))
        gb = n * k * 1.5 / 1e3
        lines.append(f"  {'int4 ' if int4 else 'nvfp4'} N={n} K={k}: best {best[0]:.1f} us ({gb / best[0]:.0f} GB/s, "
                     f"BLOCK_N, BLOCK_B, warps={best[1]}); EXPAND_TILES {default:.1f} us ({gb / default:.0f} GB/s); "
                     f"FP8 GEMM {gemm:.1f} us")
        print(lines[-1], flush=True)


def sweep_w4a16(lines):
    lines.append("NVFP4 W4A16 GEMM vs bf16 matmul (tiles: BLOCK_M, BLOCK_N, BLOCK_B, warps, programs per SM)")
    for (n, k), m in itertools.product(SHAPES[:3], (1, 16)):
        w, s = packed_weight(n, k, int4=False)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        g = torch.ones(1, device="cuda")
        wb = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        t_bf16 = bench(lambda: x @ wb.t())
        best = None
        for bn, bb, nw, per_sm in itertools.product((32, 64, 128), (64, 128), (4, 8), (2, 4, 8)):
            tiles = (16, bn, bb, nw, per_sm)
            t = bench(lambda: k4._w4a16(x, w, s, g, None, tiles))
            best = min(best or (t, ()), (t, tiles))
        default = bench(lambda: k4._w4a16(x, w, s, g, None, k4.W4A16_TILES))
        lines.append(f"  M={m} N={n} K={k}: best {best[0]:.1f} us {best[1]}; W4A16_TILES {default:.1f} us; "
                     f"bf16 {t_bf16:.1f} us (W4A16_TILES / bf16 {default / t_bf16:.2f}x)")
        print(lines[-1], flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="")
    parser.add_argument("--only", default="expand,w4a16")
    args = parser.parse_args()
    lines = [f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}; triton {triton.__version__}"]
    if "expand" in args.only:
        sweep_expand(lines)
    if "w4a16" in args.only:
        sweep_w4a16(lines)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
