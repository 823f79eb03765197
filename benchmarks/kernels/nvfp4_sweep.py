"""Tile sweep of the NVFP4 kernels on the shapes of Qwen-Image's linears (prints a table)."""

import itertools
import sys

import torch
import triton

from qdit.kernels import nvfp4_hopper as k4

SHAPES = [(3072, 12288), (12288, 3072), (18432, 3072), (3072, 3072)]


def rand_layer(n, k):
    w = torch.randint(0, 255, (n, k // 2), dtype=torch.uint8, device="cuda")
    bs = (torch.rand(n, k // 16, device="cuda") + 0.5).to(torch.float8_e4m3fn)
    return w, bs


def main():
    if "--w4a16-only" in sys.argv:
        return sweep_w4a16()
    print("expansion (GB/s counts bytes read + written)")
    for n, k in SHAPES:
        w, bs = rand_layer(n, k)
        rf = torch.rand(n, device="cuda")
        out = torch.empty((n, k), dtype=torch.float8_e4m3fn, device="cuda")
        best = None
        for bn, bb, nw in itertools.product((8, 16, 32, 64), (64, 128, 256, 512), (4, 8)):
            grid = (triton.cdiv(n, bn), triton.cdiv(k // 2, bb))
            fn = lambda: k4._expand_fp8_kernel[grid](w, bs, rf, out, n, k, BLOCK_N=bn, BLOCK_B=bb, num_warps=nw)  # noqa: E731
            t = triton.testing.do_bench(fn, return_mode="median")
            if best is None or t < best[0]:
                best = (t, bn, bb, nw)
        t, bn, bb, nw = best
        print(f"  N={n} K={k}: {t * 1e3:.1f} us, {n * k * 1.5 / t / 1e6:.0f} GB/s  (BLOCK_N={bn} BLOCK_B={bb} warps={nw})")
    sweep_w4a16()


def sweep_w4a16():
    print("W4A16 GEMM vs BF16 matmul (best tiles: BLOCK_M, BLOCK_N, BLOCK_B, warps, programs per SM)")
    for (n, k), m in itertools.product(SHAPES, (1, 64)):
        w, bs = rand_layer(n, k)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        g = torch.ones(1, device="cuda")
        wb = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        tb = triton.testing.do_bench(lambda: x @ wb.t(), return_mode="median")
        best = None
        for bn, bb, nw, per_sm in itertools.product((32, 64, 128), (64, 128, 256), (4, 8), (2, 4, 8)):
            tiles = (16 if m <= 16 else 64, bn, bb, nw, per_sm)
            t = triton.testing.do_bench(lambda: k4._w4a16(x, w, bs, g, None, tiles), return_mode="median")
            if best is None or t < best[0]:
                best = (t, tiles)
        t4, tiles = best
        print(f"  M={m} N={n} K={k}: w4a16 {t4 * 1e3:.1f} us {tiles}, bf16 {tb * 1e3:.1f} us ({t4 / tb:.2f}x)")


if __name__ == "__main__":
    main()
