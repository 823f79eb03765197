"""A/B of the 4-bit integer decode in qdit.kernels.w4_codes (codes OR-ed into 2**23's mantissa, no int ->
float conversion instruction) against the kernels of an earlier revision, on Qwen-Image's shapes: the AWQ
W4A16 GEMV at one row (the modulation Linears of a Nunchaku checkpoint) and the INT4 -> FP8 expansion
(plain and with the rank-32 low-rank fold). Outputs are compared bit for bit.

The earlier revision's kernel modules are copied from git into a folder first (their imports and custom-op
namespace renamed so they load next to the current ones):

    python benchmarks/kernels/decode_ab.py --make-baseline 930ed95 --baseline-dir /tmp/decode-base
    python benchmarks/kernels/decode_ab.py --baseline-dir /tmp/decode-base --out /tmp/decode-ab.txt
"""

import argparse
import importlib
import subprocess
import sys
from pathlib import Path

MODULES = ("w4_codes", "w4_gemv", "nvfp4_hopper")
SHAPES = [(18432, 3072), (3072, 3072), (12288, 3072), (3072, 12288)]  # (N, K); the first: img_mod / txt_mod


def make_baseline(rev: str, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in MODULES:
        text = subprocess.run(["git", "show", f"{rev}:qdit/kernels/{name}.py"], check=True, capture_output=True,
                              text=True).stdout
        for other in MODULES:
            text = text.replace(f"from qdit.kernels.{other} import", f"from base_{other} import")
        (folder / f"base_{name}.py").write_text(text.replace('"qdit::', '"qdit_base::'))
    (folder / "REVISION").write_text(rev + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline-dir", required=True, type=Path)
    parser.add_argument("--make-baseline", metavar="REV")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.make_baseline:
        make_baseline(args.make_baseline, args.baseline_dir)
        return
    import torch
    from triton.testing import do_bench

    from qdit.kernels import nvfp4_hopper, w4_gemv
    sys.path.insert(0, str(args.baseline_dir))
    base_gemv, base_expand = importlib.import_module("base_w4_gemv"), importlib.import_module("base_nvfp4_hopper")
    rev = (args.baseline_dir / "REVISION").read_text().strip()
    torch.manual_seed(0)
    lines = [f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; us per call (triton do_bench, L2 flushed); "
             f"baseline = kernels of {rev}", "", "| kernel | N x K | baseline us | current us | current / baseline | "
             "outputs |", "|---|---|---|---|---|---|"]

    def row(kernel, shape, base_fn, cur_fn):
        same = torch.equal(base_fn().float(), cur_fn().float())
        t_base, t_cur = do_bench(base_fn) * 1e3, do_bench(cur_fn) * 1e3
        lines.append(f"| {kernel} | {shape[0]} x {shape[1]} | {t_base:.1f} | {t_cur:.1f} | {t_cur / t_base:.2f} | "
                     f"{'bit-identical' if same else 'DIFFER'} |")
        print(lines[-1], flush=True)

    for n, k in SHAPES:
        packed = torch.randint(0, 256, (n, k // 2), device="cuda", dtype=torch.uint8)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        scales = (torch.rand(n, k // 64, device="cuda") * 0.02).to(torch.bfloat16)
        zeros = (torch.randn(n, k // 64, device="cuda") * 0.1).to(torch.bfloat16)
        bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        if (n, k) == SHAPES[0]:
            row("AWQ W4A16 GEMV, M = 1", (n, k), lambda: base_gemv.awq_w4a16_gemm(x, packed, scales, zeros, bias),
                lambda: w4_gemv.awq_w4a16_gemm(x, packed, scales, zeros, bias))
            continue
        row_factor = torch.rand(n, device="cuda")
        up = torch.randn(n, 32, device="cuda").to(torch.bfloat16) * 0.01
        down = torch.randn(32, k, device="cuda").to(torch.bfloat16)
        row("INT4 -> FP8 expansion", (n, k), lambda: base_expand._expand_fp8(packed, scales, row_factor, True),
            lambda: nvfp4_hopper._expand_fp8(packed, scales, row_factor, True))
        row("INT4 -> FP8 expansion + rank-32 fold", (n, k),
            lambda: base_expand._expand_fp8(packed, scales, row_factor, True, up, down),
            lambda: nvfp4_hopper._expand_fp8(packed, scales, row_factor, True, up, down))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
