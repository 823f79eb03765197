"""Queries/keys for FP8 attention at Qwen-Image's 1024² shape (text 256 + image 4096 tokens, 24 heads,
D=128, batch 1): the fused kernel writing E4M3 with a weight-bound scale (qdit::qk_norm_rope_cat_fp8)
against the path it replaced, the bf16 kernel followed by a per-tensor amax and a rounding pass (both
compiled by inductor, as in a compiled block), and the bf16 kernel alone. Time per call from a CUDA
graph of 50 calls (median of 20 replays); output written to the file given (default: stdout only).
Run: python benchmarks/kernels/qk_norm_rope_fp8.py [OUT_FILE]
"""
import sys

import torch

from qdit.bench import replay_ms
from qdit.kernels.attention_fp8 import quantize_per_tensor
from qdit.kernels.qk_norm_rope import qk_norm_rope_cat, qk_norm_rope_cat_fp8

dev = torch.device("cuda")
gen = torch.Generator(device=dev).manual_seed(0)
seqs, heads, d = (256, 4096), 24, 128
xs = [(torch.randn(1, s, heads, d, device=dev, generator=gen) * 3).bfloat16() for s in seqs]
weights = [(torch.rand(d, device=dev, generator=gen) + 0.5).bfloat16() for _ in seqs]
freqs = [torch.view_as_real(torch.polar(torch.ones(s, d // 2, device=dev), torch.rand(s, d // 2, device=dev) * 50))
         for s in seqs]
eps = [1e-6, 1e-6]


def bf16_only():
    return qk_norm_rope_cat(xs, weights, eps, freqs)


@torch.compile(fullgraph=True)
def bf16_then_amax_and_round():
    return quantize_per_tensor(qk_norm_rope_cat(xs, weights, eps, freqs))


def fused_fp8():
    return qk_norm_rope_cat_fp8(xs, weights, eps, freqs)


def time_us(fn, calls=50) -> float:
    """Per call: `calls` calls captured in one CUDA graph, median of 20 replays (qdit bench's timer)."""
    return replay_ms(lambda: [fn() for _ in range(calls)], iters=20) / calls * 1e3


lines = [f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}; q of Qwen-Image 1024² "
         f"(1 x {sum(seqs)} x {heads} x {d}), bf16 in"]
for name, fn in (("bf16 kernel alone", bf16_only), ("bf16 kernel + amax + rounding (compiled)", bf16_then_amax_and_round),
                 ("fused FP8 kernel", fused_fp8)):
    lines.append(f"{name:45s} {time_us(fn):8.1f} us per call")
(c_old, s_old), (c_new, s_new) = bf16_then_amax_and_round(), fused_fp8()
ref = bf16_only().float()
for name, c, s in (("amax scale", c_old, s_old), ("weight-bound scale", c_new, s_new)):
    err = ((c.float() * s - ref).norm() / ref.norm()).item()
    lines.append(f"rounding error vs bf16 result, {name:20s} {err:.4f} (scale {s.item():.5f})")
print("\n".join(lines))
if len(sys.argv) > 1:
    with open(sys.argv[1], "w") as f:
        f.write("\n".join(lines) + "\n")
