"""Decoding 4-bit weight codes inside Triton kernels: NVFP4's E2M1 and two's-complement INT4. Shared by the
FP8 weight expansion (qdit.kernels.nvfp4_hopper) and the GEMV (qdit.kernels.w4_gemv)."""

from __future__ import annotations

from qdit.kernels.fp8_scaled_mm import triton

if triton is not None:
    import triton.language as tl

# e2m1 * 2**-14 is exactly the fp16 whose bits are the code's, moved: its two exponent bits land on fp16's
# lowest two, its mantissa bit on fp16's top one (so 0.5 becomes fp16's subnormal 2**-15), its sign on bit
# 15. On the H200 this decode made the NVFP4 -> FP8 expansion 1.45x faster than a nibble-table lookup
# (29.0 -> 20.0 us on 3072 x 12288, bit-identical output) and the GEMV 1.4x (46.5 -> 32.8 us on
# 18432 x 3072), benchmarks/results/h200-2026-12-03c/. A float32 variant (0.5 a float32 subnormal) ran the
# GEMV in 28.2 us but leaves the products of small activations subnormal, losing precision.
# Kernels multiply by E2M1_FP16_UNSCALE along with a scale.
E2M1_FP16_SHIFT = 9
E2M1_FP16_UNSCALE = 2.0 ** 14

# Integer codes become floats without a conversion instruction (int -> float runs at a fraction of the
# FP32 rate on the CUDA cores): OR-ing a 4-bit value n into the mantissa of 2**23 gives the float 2**23 + n
# exactly, and one subtraction leaves n. Two's-complement codes flip their sign bit first (c ^ 8 = c + 8).
MAGIC_2_23_BITS = 0x4B000000
MAGIC_2_23 = 2.0 ** 23


def e2m1_fp16_bits(code: int) -> int:
    """The fp16 bit pattern the kernels build for a code 0..15 (checked on the CPU against E2M1)."""
    return ((code & 7) << E2M1_FP16_SHIFT) | ((code & 8) << 12)


if triton is not None:

    FP16_SHIFT = tl.constexpr(E2M1_FP16_SHIFT)
    E2M1_UNSCALE = tl.constexpr(E2M1_FP16_UNSCALE)  # for kernels' scales

    @triton.jit
    def e2m1_fp16_scaled(code):
        """e2m1 * 2**-14 as float32, from the low 4 bits of int32 codes (see e2m1_fp16_bits)."""
        bits = ((code & 7) << FP16_SHIFT) | ((code & 8) << 12)
        return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)

    MAGIC_BITS = tl.constexpr(MAGIC_2_23_BITS)
    MAGIC = tl.constexpr(MAGIC_2_23)
    MAGIC_PLUS_8 = tl.constexpr(MAGIC_2_23 + 8.0)

    @triton.jit
    def uint4_value(code):
        """Float value of the low 4 bits of int32 codes, unsigned (0..15)."""
        return ((code & 0xF) | MAGIC_BITS).to(tl.float32, bitcast=True) - MAGIC

    @triton.jit
    def int4_value(code):
        """Float value of the low 4 bits of int32 codes, two's complement (-8..7)."""
        return (((code & 0xF) ^ 8) | MAGIC_BITS).to(tl.float32, bitcast=True) - MAGIC_PLUS_8
