"""Tile sweep of the 4-bit Hopper kernels on Qwen-Image's linear shapes; prints a table, writes it to --out.

- FP8 expansion (NVFP4 and INT4 codes -> e4m3), GB/s counting bytes read + written, next to the time of
  the FP8 GEMM it feeds at M = 4096 + 256 tokens;
- the 4-bit GEMV (NVFP4, AWQ) at M = 1..16 against the W4A8 route and torch's bf16 and FP8 GEMMs.

    python benchmarks/kernels/w4_sweep.py --out benchmarks/results/w4-sweep-h200.txt
"""

import argparse
import itertools

import torch
import triton
from triton.testing import do_bench

from qdit.kernels import nvfp4_hopper as k4
from qdit.kernels import w4_gemv as gemv
from qdit.quant import numerics

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


GEMV_SHAPES = [(18432, 3072), (6144, 3072), (9216, 3072), (15360, 256)]  # Qwen/FLUX modulation, norm_out, Z-Image adaLN


def sweep_gemv(lines):
    """The 4-bit GEMV (NVFP4 and AWQ codes) against the W4A8 route (expansion + FP8 GEMM), cuBLAS bf16 and FP8
    at M = 1..16; do_bench empties L2 between calls, as 121 distinct weights read in turn do. Each GEMV
    result is checked against the dequantized weight in float32."""
    lines.append("4-bit GEMV (tiles: BLOCK_N, BLOCK_B, warps, programs per SM) vs W4A8 route, bf16 and FP8 GEMMs")
    configs = list(itertools.product((8, 16, 32, 64), (128, 256), (4, 8), (4,)))
    for (n, k) in GEMV_SHAPES:
        w, s = packed_weight(n, k, int4=False)
        g = torch.ones(1, device="cuda")
        wq = numerics.nvfp4_dequantize(numerics.unpack_nibbles(w), s, g)
        aw, asc = packed_weight(n, k, int4=True)
        az = torch.randn_like(asc)
        awq_w = numerics.unpack_nibbles(aw).float() * asc.float().repeat_interleave(64, 1) + \
            az.float().repeat_interleave(64, 1)
        wb = wq.to(torch.bfloat16)
        w8, one = wq.to(torch.float8_e4m3fn), torch.ones(1, 1, device="cuda")
        rf, row_scale = torch.ones(n, device="cuda"), torch.ones(1, n, device="cuda")
        for m in (1, 2, 4, 8, 16):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            xq, ones_m = x.to(torch.float8_e4m3fn), torch.ones(m, 1, device="cuda")
            sweep = m in (1, 8)
            best = None
            for tiles in (configs if sweep else [gemv.GEMV_TILES]):
                t = bench(lambda: gemv._gemv(x, w, s, None, g, None, awq=False, tiles=tiles))
                best = min(best or (t, ()), (t, tiles))
            t_default = bench(lambda: gemv._gemv(x, w, s, None, g, None, awq=False))
            err = rel(gemv._gemv(x, w, s, None, g, None, awq=False).float(), x.float() @ wq.t())
            t_awq = bench(lambda: gemv._gemv(x, aw, asc, az, None, None, awq=True))
            err_awq = rel(gemv._gemv(x, aw, asc, az, None, None, awq=True).float(), x.float() @ awq_w.t())
            t_w4a8 = bench(lambda: torch._scaled_mm(xq, k4._expand_fp8(w, s, rf, False).t(), scale_a=ones_m,
                                                    scale_b=row_scale, out_dtype=torch.bfloat16))
            t_bf16 = bench(lambda: x @ wb.t())
            t_fp8 = bench(lambda: torch._scaled_mm(xq, w8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16))
            gbs = n * k * (0.5 + 1 / 16) / 1e3 / t_default
            lines.append(f"  N={n} K={k} M={m}: nvfp4 GEMV {t_default:.1f} us ({gbs:.0f} GB/s, rel err {err:.1e})"
                         + (f", best {best[0]:.1f} us {best[1]}" if sweep else "")
                         + f"; awq GEMV {t_awq:.1f} us (rel err {err_awq:.1e}); W4A8 route {t_w4a8:.1f} us; "
                         f"bf16 {t_bf16:.1f} us; fp8 {t_fp8:.1f} us")
            print(lines[-1], flush=True)


def rel(a, b):
    return ((a.float() - b).norm() / b.norm()).item()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="")
    parser.add_argument("--only", default="expand,gemv")
    args = parser.parse_args()
    lines = [f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}; triton {triton.__version__}"]
    if "expand" in args.only:
        sweep_expand(lines)
    if "gemv" in args.only:
        sweep_gemv(lines)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
