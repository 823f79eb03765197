"""NVFP4 layers (W4A4, W4A16, SVDQuant) on GPUs without FP4 tensor cores (Hopper, Ada).

Weights stay packed 4-bit in GPU memory. Two routes:
- W4A16, for weight-only NVFP4 layers (W4A16_NVFP4) at M <= SMALL_M tokens: a Triton GEMM that
  decodes the FP4 codes and block scales inside its main loop and multiplies in bf16. e2m1 x e4m3
  products are exact in bf16, so the weight is exactly the NVFP4 weight; activations are not quantized.
- W4A8, for every other call (W4A4 and SVDQuant layers at every M: on the H200 it is the faster route
  even at M = 1, and closer to the unquantized layer than W4A4). One Triton pass expands the layer's
  weight into an FP8 scratch tensor with a per-row FP8 scale fixed at load (e4m3(e2m1 * block_scale *
  weight_scale_2 / row_scale)), activations are quantized to FP8 (smoothing folded in; per tensor from the
  calibrated input_scale where the layer has one, else per token), and cuBLASLt's FP8 GEMM multiplies.

Neither route reproduces W4A4's NVFP4 activation rounding (Hopper has no FP4 MMA); the GPU tests
check both against the reference backend and that W4A8 is at least as close to the unquantized
layer as W4A4 math is. The SVDQuant low-rank branch runs as two small bf16 GEMMs on the unsmoothed
input, its smoothing folded into the down-projection at load.
"""

from __future__ import annotations

import torch

from qdit.kernels.fp8_scaled_mm import fp8_gpu_verdict, quantize_per_token, quantize_static, triton
from qdit.kernels.registry import YES, Verdict
from qdit.quant import numerics
from qdit.quant.scheme import ActivationScale, LayerQuant, Scheme

if triton is not None:
    import triton.language as tl

# Largest M on the W4A16 route (weight-only layers, whose activations it leaves unquantized); above it
# W4A8. On the H200 the W4A16 GEMM took 68-112 us at M = 1..16 on Qwen-Image's large weights and 270 us
# at M = 64, against 44-65 us for the old weight expansion plus a small FP8 GEMM
# (benchmarks/results/nvfp4-expand-sweep.txt). The table decode has since made the expansion 29-36 us;
# the two routes have not been compared again.
SMALL_M = 16

# Nibble i of this int32 constant is twice the magnitude of E2M1 code i (0, 0.5, 1, 1.5, 2, 3, 4, 6):
# a shift and a mask decode a code. With the same bytes moved, this made the expansion 1.5x faster on
# the H200 than computing the value from the code's bits, so the kernel is bound by its instructions
# (benchmarks/kernels/expand_variants.py, benchmarks/results/h200-2026-12-03b/expand-variants.txt).
E2M1_TWICE_NIBBLES = 0xC8643210 - (1 << 32)

if triton is not None:

    E2M1_TWICE_TABLE = tl.constexpr(E2M1_TWICE_NIBBLES)

    @triton.jit
    def _e2m1_twice(code):
        """Twice the float value of 4-bit E2M1 codes (int32 codes 0..15)."""
        mag = (E2M1_TWICE_TABLE >> ((code & 7) << 2)) & 0xF
        return tl.where(code >= 8, -mag, mag).to(tl.float32)

    @triton.jit
    def _e2m1_bf16(code):
        """bf16 value of 4-bit E2M1 codes, assembled from bits: magnitudes 1..6 are 0x3F80 + (m-2)*64,
        0.5 is 0x3F00, 0 is 0; bit 3 of the code becomes the sign bit."""
        m = (code & 7).to(tl.int32)
        bits = tl.where(m >= 2, 0x3F80 + ((m - 2) << 6), tl.where(m == 1, 0x3F00, 0))
        bits = bits | ((code & 8).to(tl.int32) << 12)
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)

    @triton.jit
    def _int4_value(code):
        """Float value of two's-complement 4-bit codes (-8..7)."""
        c = code.to(tl.int32)
        return (c - ((c & 8) << 1)).to(tl.float32)

    @triton.jit
    def _expand_fp8_kernel(w_ptr, s_ptr, rf_ptr, out_ptr, N, K, INT4: tl.constexpr, GROUP: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr):
        """BLOCK_N rows x BLOCK_B packed bytes (2*BLOCK_B elements) per program, every byte read once:
        out[n, k] = e4m3(code * scale[n, k / GROUP] * row_factor[n])."""
        pid_n, pid_b = tl.program_id(0), tl.program_id(1)
        kb = K // 2
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
        packed = tl.load(w_ptr + offs_n[:, None] * kb + offs_b[None, :],
                         mask=(offs_n < N)[:, None] & (offs_b[None, :] < kb), other=0).to(tl.int32)
        offs_s = pid_b * (BLOCK_B // (GROUP // 2)) + tl.arange(0, BLOCK_B // (GROUP // 2))
        scale = tl.load(s_ptr + offs_n[:, None] * (K // GROUP) + offs_s[None, :],
                        mask=(offs_n < N)[:, None] & (offs_s[None, :] < K // GROUP), other=0.0).to(tl.float32)
        row_factor = tl.load(rf_ptr + offs_n, mask=offs_n < N, other=0.0)
        if not INT4:
            row_factor = row_factor * 0.5  # _e2m1_twice decodes twice the value
        scale = scale * row_factor[:, None]
        scale = tl.reshape(tl.broadcast_to(scale[:, :, None], (BLOCK_N, BLOCK_B // (GROUP // 2), GROUP // 2)),
                           (BLOCK_N, BLOCK_B))
        if INT4:
            lo, hi = _int4_value(packed & 0xF), _int4_value(packed >> 4)
        else:
            lo, hi = _e2m1_twice(packed & 0xF), _e2m1_twice(packed >> 4)
        lo = tl.clamp(lo * scale, -448.0, 448.0)
        hi = tl.clamp(hi * scale, -448.0, 448.0)
        w = tl.reshape(tl.join(lo, hi), (BLOCK_N, 2 * BLOCK_B))  # element 2j from the low nibble
        offs_k = pid_b * 2 * BLOCK_B + tl.arange(0, 2 * BLOCK_B)
        tl.store(out_ptr + offs_n[:, None] * K + offs_k[None, :], w.to(tl.float8e4nv),
                 mask=(offs_n < N)[:, None] & (offs_k[None, :] < K))

    @triton.jit
    def _w4a16_kernel(x_ptr, w_ptr, bs_ptr, out_ptr, M, N, K, stride_xm, K_PER_SPLIT,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr):
        """Partial sums over one K slice: out[split, m, n] = sum_k x[m, k] * e2m1(code[n, k]) * bs[n, k/16].

        Weight tiles are read row-major (coalesced bytes along K); even and odd K elements (low and
        high nibbles) are multiplied against the even and odd columns of x.
        """
        pid_m, pid_n, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        kb = K // 2
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mmask, nmask = offs_m < M, offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        b_start = pid_s * (K_PER_SPLIT // 2)
        for b0 in range(b_start, b_start + K_PER_SPLIT // 2, BLOCK_B):
            offs_b = b0 + tl.arange(0, BLOCK_B)
            bmask = offs_b < kb
            packed = tl.load(w_ptr + offs_n[:, None] * kb + offs_b[None, :], mask=nmask[:, None] & bmask[None, :],
                             other=0)
            offs_s = b0 // 8 + tl.arange(0, BLOCK_B // 8)
            scale = tl.load(bs_ptr + offs_n[:, None] * (K // 16) + offs_s[None, :],
                            mask=nmask[:, None] & (offs_s[None, :] < K // 16), other=0.0).to(tl.float32)
            scale = tl.reshape(tl.broadcast_to(scale[:, :, None], (BLOCK_N, BLOCK_B // 8, 8)),
                               (BLOCK_N, BLOCK_B)).to(tl.bfloat16)
            # e2m1 (2 significant bits) x e4m3 (4 bits) fits bf16's 8-bit significand: exact.
            w_lo = _e2m1_bf16(packed & 0xF) * scale
            w_hi = _e2m1_bf16(packed >> 4) * scale
            xmask = mmask[:, None] & bmask[None, :]
            x_lo = tl.load(x_ptr + offs_m[:, None] * stride_xm + 2 * offs_b[None, :], mask=xmask, other=0.0)
            x_hi = tl.load(x_ptr + offs_m[:, None] * stride_xm + 2 * offs_b[None, :] + 1, mask=xmask, other=0.0)
            acc = tl.dot(x_lo.to(tl.bfloat16), tl.trans(w_lo), acc)
            acc = tl.dot(x_hi.to(tl.bfloat16), tl.trans(w_hi), acc)
        tl.store(out_ptr + pid_s * M * N + offs_m[:, None] * N + offs_n[None, :], acc,
                 mask=mmask[:, None] & nmask[None, :])


def _expand_fp8(weight: torch.Tensor, scales: torch.Tensor, row_factor: torch.Tensor, int4: bool) -> torch.Tensor:
    n, k = weight.shape[0], weight.shape[1] * 2
    out = torch.empty((n, k), dtype=torch.float8_e4m3fn, device=weight.device)
    group = k // scales.shape[1]
    block_n, block_b, warps = EXPAND_TILES["int4" if int4 else "nvfp4"]
    grid = (triton.cdiv(n, block_n), triton.cdiv(k // 2, block_b))
    _expand_fp8_kernel[grid](weight, scales, row_factor, out, n, k, INT4=int4, GROUP=group,
                             BLOCK_N=block_n, BLOCK_B=block_b, num_warps=warps)
    return out


# BLOCK_N, BLOCK_B (a multiple of the group's bytes), warps: the best or within 4 % of the best on
# Qwen-Image's shapes in an H200 sweep, 1.3-2.4 TB/s read + written
# (benchmarks/results/h200-2026-12-03b/expand-variants.txt).
EXPAND_TILES = {"nvfp4": (8, 256, 4), "int4": (8, 256, 4)}


@torch.library.custom_op("qdit::w4_expand_fp8", mutates_args=())
def w4_expand_fp8(weight: torch.Tensor, scales: torch.Tensor, row_factor: torch.Tensor, int4: bool) -> torch.Tensor:
    """packed codes [N, K/2] -> FP8 [N, K] = e4m3(value(code) * scale * row_factor[n]): NVFP4 (e2m1 codes,
    e4m3 scales per 16) or INT4 (two's-complement codes, scales per 64)."""
    return _expand_fp8(weight, scales, row_factor, int4)


@w4_expand_fp8.register_fake
def _(weight, scales, row_factor, int4):
    return torch.empty((weight.shape[0], weight.shape[1] * 2), dtype=torch.float8_e4m3fn, device=weight.device)


@torch.library.custom_op("qdit::nvfp4_w4a16_gemm", mutates_args=())
def nvfp4_w4a16_gemm(x: torch.Tensor, weight: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor,
                     bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] @ dequant(NVFP4 weight)^T (+ bias), in x's dtype; split along K to fill the GPU at small M."""
    return _w4a16(x, weight, block_scale, global_scale, bias, W4A16_TILES)


W4A16_TILES = (16, 64, 64, 4, 4)  # BLOCK_M, BLOCK_N, BLOCK_B, warps, programs per SM


def split_k_plan(m: int, n: int, k: int, block_m: int, block_n: int, k_step: int, per_sm: int,
                 device: torch.device) -> tuple[int, int]:
    """(splits, K per split, a multiple of k_step): enough programs to give each SM per_sm of them at
    small M, where the output tiles alone would leave most of the GPU idle."""
    count = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    splits = max(1, min(k // k_step, triton.cdiv(per_sm * sms, count)))
    k_per_split = triton.cdiv(k // k_step, splits) * k_step
    return triton.cdiv(k, k_per_split), k_per_split


def _w4a16(x, weight, block_scale, global_scale, bias, tiles):
    m, k = x.shape
    n = weight.shape[0]
    block_m, block_n, block_b, warps, per_sm = tiles
    splits, k_per_split = split_k_plan(m, n, k, block_m, block_n, 2 * block_b, per_sm, x.device)
    partial = torch.empty((splits, m, n), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), splits)
    _w4a16_kernel[grid](x, weight, block_scale, partial, m, n, k, x.stride(0), k_per_split,
                        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_B=block_b, num_warps=warps)
    out = partial.sum(0) * global_scale
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


@nvfp4_w4a16_gemm.register_fake
def _(x, weight, block_scale, global_scale, bias):
    return torch.empty((x.shape[0], weight.shape[0]), dtype=x.dtype, device=x.device)


def prepare_w4a8_route(layer, factor: torch.Tensor | float = 1.0) -> None:
    """The W4A8 route's buffers for a layer whose dequantized weight (layer.method.dequantize) is
    decoded code * group scale * factor[n]: its per-row FP8 scale and the factor mapping the
    group-scaled codes onto it."""
    row_amax = layer.method.dequantize(layer).abs().amax(dim=1)
    row_scale = torch.where(row_amax > 0, row_amax / numerics.E4M3_MAX, torch.ones_like(row_amax))
    layer.register_buffer("w4a8_row_scale", row_scale.reshape(1, -1).contiguous(), persistent=False)
    layer.register_buffer("w4a8_row_factor", (factor / row_scale).contiguous(), persistent=False)


def w4a8_gemm(layer, xs: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, int4: bool,
              input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """xs [M, K] quantized to FP8, times the 4-bit weight expanded into FP8 (no bias). Activation scales:
    per token, or input_scale (a calibrated per-tensor FP8 scale) where the layer has one, which keeps the
    quantization elementwise. Under torch.compile it is plain tensor ops, fused into the kernel that
    produced xs."""
    if input_scale is None:
        xq, scale_a = quantize_per_token(xs)
    else:
        xq = quantize_static(xs, input_scale)
        scale_a = input_scale.reshape(1, 1).expand(xs.shape[0], 1).contiguous()  # cuBLASLt row-wise: [M, 1]
    w8 = w4_expand_fp8(weight, scales, layer.w4a8_row_factor, int4)
    return torch._scaled_mm(xq, w8.t(), scale_a=scale_a, scale_b=layer.w4a8_row_scale, out_dtype=xs.dtype)


class NVFP4HopperBackend:
    name = "nvfp4-hopper"

    def supports_device(self, device: torch.device) -> Verdict:
        return fp8_gpu_verdict(device)  # the W4A8 route uses FP8 tensor cores

    def can_implement(self, layer_quant: LayerQuant, in_features: int, out_features: int) -> Verdict:
        if layer_quant.scheme not in (Scheme.NVFP4, Scheme.W4A16_NVFP4, Scheme.NVFP4_SVD):
            return Verdict(False, f"computes NVFP4 layers only, not {layer_quant.scheme.value}")
        if in_features % 32 or out_features % 16:
            return Verdict(False, f"needs K % 32 == 0 and N % 16 == 0, got K={in_features} N={out_features}")
        return YES

    def prepare(self, layer) -> None:
        tensor_scale = layer.tensor("weight_scale_2").float()
        prepare_w4a8_route(layer, tensor_scale)
        w4a16 = layer.layer_quant.scheme is Scheme.W4A16_NVFP4  # the only scheme that takes the W4A16 route
        layer.register_buffer("w4a16_global_scale", tensor_scale.reshape(1).contiguous() if w4a16 else None,
                              persistent=False)
        # A calibrated NVFP4 input_scale is amax / (6 * 448): amax / 448 is the FP8 scale with the same
        # saturation point as the format's own W4A4 quantization.
        static = layer.layer_quant.activation_scale is ActivationScale.STATIC
        fp8_input_scale = layer.tensor("input_scale").float() * numerics.E2M1_MAX if static else None
        layer.register_buffer("w4a8_input_scale", fp8_input_scale, persistent=False)
        smooth = layer.tensor("pre_quant_scale").float() if layer.layer_quant.pre_quant_scale else None
        layer.register_buffer("smooth", None if smooth is None else smooth.to(layer.compute_dtype), persistent=False)
        if layer.layer_quant.lora_rank:
            a = layer.tensor("svdquant_lora_a").float()
            if smooth is not None:
                a = a * smooth[None, :]  # x_hat @ A^T == x @ (A diag(s))^T
            layer.register_buffer("lora_down", a.to(layer.compute_dtype).t().contiguous(), persistent=False)

    def apply(self, layer, x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, x.shape[-1])
        if not x2d.is_contiguous():
            x2d = x2d.contiguous()
        xs = x2d * layer.smooth if layer.smooth is not None else x2d
        weight, block_scale = layer.tensor("weight"), layer.tensor("weight_scale")
        if layer.layer_quant.scheme is Scheme.W4A16_NVFP4 and x2d.shape[0] <= SMALL_M:
            y = nvfp4_w4a16_gemm(xs, weight, block_scale, layer.w4a16_global_scale, layer.bias)
        else:
            y = w4a8_gemm(layer, xs, weight, block_scale, int4=False, input_scale=layer.w4a8_input_scale)
            if layer.bias is not None:
                y = y + layer.bias
        if layer.layer_quant.lora_rank:
            y = y + (x2d @ layer.lora_down) @ layer.tensor("svdquant_lora_b").t()
        return y.reshape(*x.shape[:-1], y.shape[-1])
