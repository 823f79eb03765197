"""Folding the SVDQuant low-rank branch into the 4-bit -> FP8 weight expansion: what it costs per
weight against the plain expansion, and what it replaces (the branch's two bf16 GEMMs and the add, at
M tokens). Tiles are (BLOCK_N, BLOCK_B packed bytes, warps, row tiles per program: each program loads
its slice of the low-rank `down` once for that many row tiles); every variant's output is checked
against the default tiles' output. NVFP4 (E4M3 scales per 16) and INT4 (bf16 scales per 64) codes.

    python benchmarks/kernels/expand_low_rank.py --out /tmp/expand-low-rank.txt
"""

import argparse
import itertools

import torch
from triton.testing import do_bench

from qdit.kernels import nvfp4_hopper as k4

SHAPES = [(3072, 12288), (12288, 3072), (3072, 3072)]  # (N, K)
TILES = [(16, 256, 4, 1), (64, 64, 8, 1), (16, 256, 4, 4), (16, 256, 4, 8), (16, 128, 4, 8), (32, 128, 4, 4),
         (32, 128, 8, 4), (32, 64, 4, 8), (64, 64, 8, 4), (64, 128, 8, 2)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    lines = [f"# {torch.cuda.get_device_name()}, rank {args.rank}, {args.tokens} tokens; us per call (do_bench, L2 "
             f"flushed); default tiles {k4.EXPAND_TILES}", "",
             "| codes | N x K | plain expansion | branch GEMMs + add | " + " | ".join(f"low-rank {t}" for t in TILES) + " |",
             "|---|---|---|---|" + "---|" * len(TILES)]
    totals: dict[str, dict[tuple, float]] = {}  # EXPAND_TILES kind -> tiles -> summed us over its shapes
    for (n, k), int4 in itertools.product(SHAPES, (False, True)):
        packed = torch.randint(0, 256, (n, k // 2), device="cuda", dtype=torch.uint8)
        scales = (torch.rand(n, k // (64 if int4 else 16), device="cuda") + 0.1).to(
            torch.bfloat16 if int4 else torch.float8_e4m3fn)
        row_factor = torch.rand(n, device="cuda")
        up = torch.randn(n, args.rank, device="cuda").to(torch.bfloat16)
        down = torch.randn(args.rank, k, device="cuda").to(torch.bfloat16)
        x = torch.randn(args.tokens, k, device="cuda", dtype=torch.bfloat16)
        y = torch.randn(args.tokens, n, device="cuda", dtype=torch.bfloat16)
        plain = do_bench(lambda: k4._expand_fp8(packed, scales, row_factor, int4, None, None)) * 1e3
        branch = do_bench(lambda: y + (x @ down.t()) @ up.t()) * 1e3
        reference = k4._expand_fp8(packed, scales, row_factor, int4, up, down).float()
        cells = []
        kind = "low_rank" if n * k > k4.LOW_RANK_LARGE else "low_rank_small"
        for tiles in TILES:
            out = k4._expand_fp8(packed, scales, row_factor, int4, up, down, tiles=tiles).float()
            mismatch = (out != reference).float().mean().item()
            us = do_bench(lambda: k4._expand_fp8(packed, scales, row_factor, int4, up, down, tiles=tiles)) * 1e3
            cells.append(f"{us:.1f}" + (f" (differs: {mismatch:.1e})" if mismatch > 1e-3 else ""))
            if mismatch <= 1e-3:
                totals.setdefault(kind, {}).setdefault(tiles, 0.0)
                totals[kind][tiles] += us
        lines.append(f"| {'int4' if int4 else 'nvfp4'} | {n} x {k} | {plain:.1f} | {branch:.1f} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    best = {kind: min(times, key=times.get) for kind, times in totals.items()}
    lines += ["", "Fastest tiles per EXPAND_TILES kind (summed over its shapes, NVFP4 and INT4): "
              + ", ".join(f"{kind} {tiles} {totals[kind][tiles]:.1f} us" for kind, tiles in best.items())]
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
