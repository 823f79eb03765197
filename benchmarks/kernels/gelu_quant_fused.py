"""The input of an SVDQuant MLP's second Linear (Qwen-Image, 1024², batch 1: 4096 x 12288 image rows, 256
text rows): fc1's bias + tanh-GELU + per-token E4M3, from fc1's bare GEMM output.
- "inductor + op": what ran before the GELU deferral: inductor adds the bias, computes the GELU (and
  Nunchaku's GELU shift and smoothing, since folded into the weight) and writes them in bf16, then
  qdit::fp8_quant_per_token reads that back;
- "fused op": the pass behind qdit::fp8_quant_per_token_gelu (bias and GELU inside the quantization
  pass), at several (BLOCK_K, warps) tiles; a BLOCK_K >= 12288 holds the whole row in one block (one read,
  one GELU), smaller ones go in chunks (the row read twice, the GELU computed twice); "default" is the
  tile qdit picks.
A bf16 copy of the same tensor gives the bandwidth ceiling. Codes are compared with the first fused tile's.
Run: python benchmarks/kernels/gelu_quant_fused.py [OUT_FILE]
"""
import sys

import torch
import triton

from qdit import compile as qdit_compile
from qdit.bench import replay_ms
from qdit.kernels.fp8_scaled_mm import fp8_quant_per_token, launch_quant_per_token
from qdit.models.activations import gelu_tanh
from qdit.quant.svdquant import GELU_SHIFT

TILES = [None, (4096, 8), (2048, 8), (4096, 16), (16384, 8), (16384, 16), (16384, 32)]
dev = torch.device("cuda")


def unfused(h, bias, inv_smooth):
    return fp8_quant_per_token((gelu_tanh(h + bias) + GELU_SHIFT) * inv_smooth)


def main(out_path=None):
    lines = [f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
             "time per call from a CUDA graph of 20 calls, median of 20 replays; GB/s counts bf16 read + e4m3 written"
             " (the copy: bf16 read + bf16 written)"]
    compiled = torch.compile(unfused, fullgraph=True, backend=qdit_compile.inductor_with_qdit_heuristics)
    for m in (4096, 256):
        k = 12288
        gen = torch.Generator(device=dev).manual_seed(m)
        h = (torch.randn(m, k, device=dev, generator=gen) * 2).bfloat16()
        inv_smooth = (1.0 / (0.5 + torch.rand(k, device=dev, generator=gen))).bfloat16()
        bias = torch.randn(k, device=dev, generator=gen).bfloat16()
        cases = [("bf16 copy (ceiling; 4 bytes per element)", lambda: h.clone(), "copy"),
                 ("inductor + op (no deferral)", lambda: compiled(h, bias, inv_smooth), None)]
        cases += [(f"fused op, {'default tile' if t is None else f'BLOCK_K {t[0]}, {t[1]} warps'}",
                   lambda t=t: launch_quant_per_token(h, bias, gelu=True, tiles=t), "fused")
                  for t in TILES]
        first = None
        for name, fn, kind in cases:
            out = fn()
            us = replay_ms(lambda: [fn() for _ in range(20)], iters=20) / 20 * 1e3
            note = ""
            if kind == "fused":
                codes = out[0].view(torch.uint8)
                first = codes if first is None else first
                note = f"  codes differing from the first tile's: {(codes != first).float().mean().item():.1e}"
            nbytes = m * k * (4 if kind == "copy" else 3)
            lines.append(f"M={m:5d} {name:44s} {us:7.1f} us  {nbytes / us / 1e3:6.0f} GB/s{note}")
            print(lines[-1], flush=True)
    if out_path:
        with open(out_path, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
