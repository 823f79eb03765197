"""Decoding 4-bit weight codes inside Triton kernels: NVFP4's E2M1 and two's-complement INT4. Shared by the
FP8 weight expansion (qdit.kernels.nvfp4_hopper) and the GEMV (qdit.kernels.w4_gemv)."""

from __future__ import annotations

from qdit.kernels.fp8_scaled_mm import triton

if triton is not None:
    import triton.language as tl

# e2m1 * 2**-14 is exactly an fp16 whose bits are the code's, moved (E2M1_FP16_SHIFT): its two exponent
# bits land on fp16's lowest two, its mantissa bit on fp16's top one, so 0.5 becomes fp16's subnormal
# 2**-15, and the sign bit moves to bit 15. Two shifts and a mask per code, where a table lookup took
# five operations; on the H200 the GEMV ran 1.6x faster with a float32 variant of this decode than with
# the table (benchmarks/kernels/gemv_variants.py). Kernels multiply by E2M1_FP16_UNSCALE with a scale.
E2M1_FP16_SHIFT = 9
E2M1_FP16_UNSCALE = 2.0 ** 14


def e2m1_fp16_bits(code: int) -> int:
    """The fp16 bit pattern the kernels build for a code 0..15 (checked on the CPU against E2M1)."""
    return ((code & 7) << E2M1_FP16_SHIFT) | ((code & 8) << 12)


if triton is not None:

    FP16_SHIFT = tl.constexpr(E2M1_FP16_SHIFT)

    @triton.jit
    def e2m1_fp16_scaled(code):
        """e2m1 * 2**-14 as float32, from the low 4 bits of int32 codes (see e2m1_fp16_bits)."""
        bits = ((code & 7) << FP16_SHIFT) | ((code & 8) << 12)
        return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)

    @triton.jit
    def int4_value(code):
        """Float value of two's-complement 4-bit codes (-8..7)."""
        c = code.to(tl.int32)
        return (c - ((c & 8) << 1)).to(tl.float32)
