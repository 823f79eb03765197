"""How close a compiled transformer step's elementwise kernels come to the GPU's memory bandwidth: a
plain bf16 copy and a bf16 -> E4M3 cast of the same tensor (the roofline an elementwise pass can reach)
against the passes qdit's FP8 Qwen-Image step runs, compiled by inductor as in a compiled block:
the MLP's GELU + FP8 quantization (4096 x 12288) and the gated residual + LayerNorm + modulation + FP8
quantization (4096 x 3072), each as qdit wrote it (IEEE divisions by the scale and in the sigmoid) and
rewritten without per-element divisions (a product with the scale's reciprocal; the sigmoid's
reciprocal as rsqrt squared, which inductor lowers to the fast approximate rsqrt). GB/s counts the
bytes each pass must read and write; "codes differing" compares the rewritten pass's E4M3 bytes with
the original's.
Run: python benchmarks/kernels/elementwise_roofline.py [OUT_FILE]
"""
import sys

import torch
import torch.nn.functional as F

from qdit.bench import replay_ms
from qdit.models.activations import gelu_tanh
from qdit.quant import numerics

dev = torch.device("cuda")
gen = torch.Generator(device=dev).manual_seed(0)
hidden = torch.randn(4096, 12288, device=dev, generator=gen).bfloat16()
bias = torch.randn(12288, device=dev, generator=gen).bfloat16()
x = torch.randn(4096, 3072, device=dev, generator=gen).bfloat16()
attn = torch.randn(4096, 3072, device=dev, generator=gen).bfloat16()
gate, shift, scale_mod = (torch.randn(1, 3072, device=dev, generator=gen).bfloat16() for _ in range(3))
scale = torch.tensor(0.05, device=dev)
inv_scale = 1.0 / scale
SQRT_2_OVER_PI_X2 = 1.5957691216057308


def copy_bf16(t):
    return t.clone()


def cast_fp8(t):
    return numerics.fp8_quantize_static(t, scale)


def gelu_quant(h):
    return numerics.fp8_quantize_static(gelu_tanh(h + bias), scale)


def gelu_quant_no_div(h):
    hf = (h + bias).float()
    s = torch.rsqrt(1.0 + torch.exp(-SQRT_2_OVER_PI_X2 * (hf + 0.044715 * hf * hf * hf)))
    return numerics.to_e4m3((hf * (s * s)).to(h.dtype).float() * inv_scale)


def gelu_quant_recip_scale(h):
    return numerics.to_e4m3(gelu_tanh(h + bias).float() * inv_scale)


def _modulated(x):
    residual = x + gate * attn
    return residual, F.layer_norm(residual, (3072,), eps=1e-6) * (1 + scale_mod) + shift


def residual_norm_quant(x):
    residual, normed = _modulated(x)
    return residual, numerics.fp8_quantize_static(normed, scale)


def residual_norm_quant_recip_scale(x):
    residual, normed = _modulated(x)
    return residual, numerics.to_e4m3(normed.float() * inv_scale)


def residual_norm_quant_per_token(x):
    residual, normed = _modulated(x)
    return residual, numerics.fp8_quantize_per_token(normed)


def residual_norm_quant_per_token_recip(x):
    residual, normed = _modulated(x)
    amax = normed.abs().amax(dim=-1, keepdim=True).float()
    inv = torch.where(amax > 0, numerics.E4M3_MAX / amax, torch.ones_like(amax))
    return residual, (numerics.to_e4m3(normed.float() * inv), 1.0 / inv)


mb = 1e6
cases = [  # name, fn, input, bytes moved
    ("bf16 copy 4096x12288", copy_bf16, hidden, hidden.numel() * 4),
    ("bf16 -> e4m3 4096x12288", cast_fp8, hidden, hidden.numel() * 3),
    ("bias + GELU + e4m3 4096x12288", gelu_quant, hidden, hidden.numel() * 3),
    ("  the same, times 1/scale", gelu_quant_recip_scale, hidden, hidden.numel() * 3),
    ("  the same, times 1/scale, sigmoid via rsqrt^2", gelu_quant_no_div, hidden, hidden.numel() * 3),
    ("bf16 copy 4096x3072", copy_bf16, x, x.numel() * 4),
    ("gated residual + LayerNorm + modulation + e4m3 4096x3072", residual_norm_quant, x, x.numel() * (2 + 2 + 2 + 1)),
    ("  the same, times 1/scale", residual_norm_quant_recip_scale, x, x.numel() * (2 + 2 + 2 + 1)),
    ("gated residual + LayerNorm + modulation + per-token e4m3", residual_norm_quant_per_token, x, x.numel() * (2 + 2 + 2 + 1)),
    ("  the same, x * (448 / amax)", residual_norm_quant_per_token_recip, x, x.numel() * (2 + 2 + 2 + 1)),
]
tuning = torch._inductor.config.coordinate_descent_tuning
lines = [f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}; each pass compiled (fullgraph"
         f"{', coordinate-descent tuning' if tuning else ''}), time per call from a CUDA graph of 20 calls, median of 20 replays"]
for name, fn, arg, nbytes in cases:
    compiled = torch.compile(fn, fullgraph=True)
    compiled(arg)
    us = replay_ms(lambda: [compiled(arg) for _ in range(20)], iters=20) / 20 * 1e3
    out = compiled(arg)
    codes = out[1] if isinstance(out, tuple) else out  # (residual, codes[, scale]) or codes
    codes = codes[0] if isinstance(codes, tuple) else codes
    note = ""
    if codes.dtype == torch.float8_e4m3fn:
        if not name.startswith(" "):
            baseline = codes
        else:
            note = f"  codes differing: {(codes.view(torch.uint8) != baseline.view(torch.uint8)).float().mean().item():.1e}"
    lines.append(f"{name:60s} {us:7.1f} us  {nbytes / mb:7.1f} MB  {nbytes / us / 1e3:6.0f} GB/s{note}")
    print(lines[-1], flush=True)
if len(sys.argv) > 1:
    with open(sys.argv[1], "w") as f:
        f.write("\n".join(lines) + "\n")
