"""Side-by-side timing of FP8-expansion kernel variants (an experiment; the winner goes into
qdit/kernels/nvfp4_hopper.py). Each variant's output is checked equal in value to the current kernel's;
table=False decodes E2M1 from its bits, as qdit did before the table (tree 3eca7f4).

    python benchmarks/kernels/expand_variants.py --out benchmarks/results/h200-2026-12-03b/expand-variants.txt
"""

import argparse
import itertools

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

from qdit.kernels import nvfp4_hopper as k4

SHAPES = [(3072, 12288), (12288, 3072), (3072, 3072)]  # (N, K)
TILES = [(16, 256, 8), (8, 512, 8), (32, 128, 8), (16, 512, 8), (32, 256, 8), (8, 256, 4)]  # BLOCK_N, BLOCK_B, warps
E2M1_TWICE_TABLE = tl.constexpr(0xC8643210 - (1 << 32))  # nibble i = 2 * |e2m1 value of code i|, as an int32 constant


@triton.jit
def _e2m1_from_bits(code):
    """The decode qdit used before the table (tree 3eca7f4): the value computed from the code's bits."""
    m = code & 7
    e = (m >> 1).to(tl.int32)
    normal = (2 + (m & 1)).to(tl.float32) * (1 << tl.maximum(e - 1, 0)).to(tl.float32) * 0.5
    mag = tl.where(m < 2, m.to(tl.float32) * 0.5, normal)
    return tl.where((code & 8) != 0, -mag, mag)


@triton.jit
def _variant_kernel(w_ptr, s_ptr, rf_ptr, out_ptr, N, K, INT4: tl.constexpr, GROUP: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr, TABLE: tl.constexpr, GATHER: tl.constexpr):
    pid_n, pid_b = tl.program_id(0), tl.program_id(1)
    kb = K // 2
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    nmask = offs_n < N
    packed = tl.load(w_ptr + offs_n[:, None] * kb + offs_b[None, :],
                     mask=nmask[:, None] & (offs_b[None, :] < kb), other=0).to(tl.int32)
    row = tl.load(rf_ptr + offs_n, mask=nmask, other=0.0)
    if not INT4:
        if TABLE:
            row = row * 0.5  # the table holds twice the e2m1 magnitudes
    if GATHER:
        scale = tl.load(s_ptr + offs_n[:, None] * (K // GROUP) + offs_b[None, :] // (GROUP // 2),
                        mask=nmask[:, None] & (offs_b[None, :] < kb), other=0.0).to(tl.float32) * row[:, None]
    else:
        offs_s = pid_b * (BLOCK_B // (GROUP // 2)) + tl.arange(0, BLOCK_B // (GROUP // 2))
        s = tl.load(s_ptr + offs_n[:, None] * (K // GROUP) + offs_s[None, :],
                    mask=nmask[:, None] & (offs_s[None, :] < K // GROUP), other=0.0).to(tl.float32) * row[:, None]
        scale = tl.reshape(tl.broadcast_to(s[:, :, None], (BLOCK_N, BLOCK_B // (GROUP // 2), GROUP // 2)),
                           (BLOCK_N, BLOCK_B))
    lo_c, hi_c = packed & 0xF, (packed >> 4) & 0xF
    if INT4:
        lo = (lo_c - ((lo_c & 8) << 1)).to(tl.float32)
        hi = (hi_c - ((hi_c & 8) << 1)).to(tl.float32)
    elif TABLE:
        lo_m = (E2M1_TWICE_TABLE >> ((lo_c & 7) << 2)) & 0xF
        hi_m = (E2M1_TWICE_TABLE >> ((hi_c & 7) << 2)) & 0xF
        lo = tl.where(lo_c >= 8, -lo_m, lo_m).to(tl.float32)
        hi = tl.where(hi_c >= 8, -hi_m, hi_m).to(tl.float32)
    else:
        lo, hi = _e2m1_from_bits(lo_c), _e2m1_from_bits(hi_c)
    lo = tl.clamp(lo * scale, -448.0, 448.0)
    hi = tl.clamp(hi * scale, -448.0, 448.0)
    w = tl.reshape(tl.join(lo, hi), (BLOCK_N, 2 * BLOCK_B))
    offs_k = pid_b * 2 * BLOCK_B + tl.arange(0, 2 * BLOCK_B)
    tl.store(out_ptr + offs_n[:, None] * K + offs_k[None, :], w.to(tl.float8e4nv),
             mask=nmask[:, None] & (offs_k[None, :] < K))


def bench(fn) -> float:
    return do_bench(fn, warmup=5, rep=30, return_mode="median") * 1e3  # us


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    lines = [f"GPU {torch.cuda.get_device_name()}; torch {torch.__version__}; triton {triton.__version__}",
             "FP8 expansion variants, us (GB/s = packed bytes read + FP8 bytes written); 'current' = qdit's kernel"]
    for (n, k), int4 in itertools.product(SHAPES, (False, True)):
        group = 64 if int4 else 16
        w = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda")
        s = (torch.rand(n, k // group, device="cuda") + 0.5).to(torch.bfloat16 if int4 else torch.float8_e4m3fn)
        rf = torch.rand(n, device="cuda") * 20
        want = k4._expand_fp8(w, s, rf, int4).float()
        gb = n * k * 1.5 / 1e3
        results = [("current", bench(lambda: k4._expand_fp8(w, s, rf, int4)), "")]
        for table, gather in itertools.product((False, True) if not int4 else (False,), (False, True)):
            best = None
            for bn, bb, nw in TILES:
                out = torch.empty((n, k), dtype=torch.float8_e4m3fn, device="cuda")
                grid = (triton.cdiv(n, bn), triton.cdiv(k // 2, bb))

                def launch():
                    _variant_kernel[grid](w, s, rf, out, n, k, INT4=int4, GROUP=group, BLOCK_N=bn, BLOCK_B=bb,
                                          TABLE=table, GATHER=gather, num_warps=nw)
                launch()
                if not torch.equal(out.float(), want):
                    bad = (out.float() != want).sum().item()
                    lines.append(f"  MISMATCH table={table} gather={gather} tiles={bn, bb, nw}: {bad} elements")
                    print(lines[-1], flush=True)
                    continue
                t = bench(launch)
                best = min(best or (t, ()), (t, (bn, bb, nw)))
            if best:
                results.append((f"table={table} gather={gather}", best[0], f"tiles {best[1]}"))
        kind = "int4 " if int4 else "nvfp4"
        for name, t, extra in results:
            lines.append(f"  {kind} N={n} K={k} {name}: {t:.1f} us ({gb / t:.0f} GB/s) {extra}")
            print(lines[-1], flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
