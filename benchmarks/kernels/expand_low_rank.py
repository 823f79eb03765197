"""Folding the SVDQuant low-rank branch into the 4-bit -> FP8 weight expansion: what it costs per
weight against the plain expansion, and what it replaces (the branch's two bf16 GEMMs and the add, at
M tokens). Tiles are (BLOCK_N, BLOCK_B packed bytes, warps); every variant's output is checked
against the default tiles' output.

    python benchmarks/kernels/expand_low_rank.py --out /tmp/expand-low-rank.txt
"""

import argparse

import torch
from triton.testing import do_bench

from qdit.kernels import nvfp4_hopper as k4

SHAPES = [(3072, 12288), (12288, 3072), (3072, 3072)]  # (N, K)
TILES = [(16, 256, 4), (32, 128, 8), (64, 64, 8), (64, 128, 8), (128, 64, 8)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    lines = [f"# {torch.cuda.get_device_name()}, rank {args.rank}, {args.tokens} tokens; us per call (do_bench, L2 "
             f"flushed); default tiles {k4.EXPAND_TILES}", "",
             "| N x K | plain expansion | branch GEMMs + add | " + " | ".join(f"low-rank {t}" for t in TILES) + " |",
             "|---|---|---|" + "---|" * len(TILES)]
    for n, k in SHAPES:
        packed = torch.randint(0, 256, (n, k // 2), device="cuda", dtype=torch.uint8)
        scales = (torch.rand(n, k // 16, device="cuda") + 0.1).to(torch.float8_e4m3fn)
        row_factor = torch.rand(n, device="cuda")
        up = torch.randn(n, args.rank, device="cuda").to(torch.bfloat16)
        down = torch.randn(args.rank, k, device="cuda").to(torch.bfloat16)
        x = torch.randn(args.tokens, k, device="cuda", dtype=torch.bfloat16)
        y = torch.randn(args.tokens, n, device="cuda", dtype=torch.bfloat16)
        plain = do_bench(lambda: k4._expand_fp8(packed, scales, row_factor, False, None, None)) * 1e3
        branch = do_bench(lambda: y + (x @ down.t()) @ up.t()) * 1e3
        reference = k4._expand_fp8(packed, scales, row_factor, False, up, down).float()
        cells = []
        for tiles in TILES:
            out = k4._expand_fp8(packed, scales, row_factor, False, up, down, tiles=tiles).float()
            mismatch = (out != reference).float().mean().item()
            us = do_bench(lambda: k4._expand_fp8(packed, scales, row_factor, False, up, down, tiles=tiles)) * 1e3
            cells.append(f"{us:.1f}" + (f" (differs: {mismatch:.1e})" if mismatch > 1e-3 else ""))
        lines.append(f"| {n} x {k} | {plain:.1f} | {branch:.1f} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
