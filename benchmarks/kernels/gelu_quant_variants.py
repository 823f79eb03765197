"""The MLP's GELU(tanh) + FP8 quantization as inductor compiles it, written two ways: F.gelu (inductor
calls libdevice's tanhf) and x * sigmoid(2u) (the same function; inductor emits one fast exp). Also the
BF16 model's GELU alone. Shape: Qwen-Image's MLP hidden at 1024², batch 1 (4096 x 12288).

    python benchmarks/kernels/gelu_quant_variants.py --out /tmp/gelu-quant.txt
"""

import argparse

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from qdit.quant import numerics

SQRT_2_OVER_PI_X2 = 1.5957691216057308  # 2 * sqrt(2 / pi)


def gelu_tanh_quant(h, scale):
    return numerics.fp8_quantize_static(F.gelu(h, approximate="tanh"), scale)


def gelu_sigmoid_quant(h, scale):
    hf = h.float()
    g = (hf * torch.sigmoid(SQRT_2_OVER_PI_X2 * (hf + 0.044715 * hf * hf * hf))).to(h.dtype)
    return numerics.fp8_quantize_static(g, scale)


def gelu_bf16(h, scale):
    return F.gelu(h, approximate="tanh")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    h = torch.randn(4096, 12288, device="cuda", dtype=torch.bfloat16) * 3
    scale = torch.tensor(0.05, device="cuda")
    want = gelu_tanh_quant(h, scale).float()
    lines = [f"# {torch.cuda.get_device_name()}, 4096 x 12288 bf16, compiled; us per call (do_bench)", ""]
    for fn in (gelu_tanh_quant, gelu_sigmoid_quant, gelu_bf16):
        compiled = torch.compile(fn, fullgraph=True)
        out = compiled(h, scale)
        us = do_bench(lambda: compiled(h, scale)) * 1e3
        note = ""
        if out.dtype == torch.float8_e4m3fn:
            note = f"; codes differing from F.gelu's: {(out.float() != want).float().mean().item():.2e}"
        lines.append(f"{fn.__name__}: {us:.1f} us{note}")
        print(lines[-1], flush=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
