"""NVFP4 layers (W4A4, W4A16, SVDQuant) on GPUs without FP4 tensor cores (Hopper, Ada).

Weights stay packed 4-bit in GPU memory. Two routes, chosen per call by the number of tokens M:
- M <= SMALL_M (timestep-only layers, tiny batches): a Triton W4A16 GEMM that decodes the FP4 codes
  and block scales inside its main loop and multiplies in bf16. e2m1 x e4m3 products are exact in
  bf16, so the weight is exactly the NVFP4 weight; activations are not quantized.
- larger M: W4A8. One Triton pass expands the layer's weight into a reused FP8 scratch tile with a
  per-row FP8 scale fixed at load (e4m3(e2m1 * block_scale * weight_scale_2 / row_scale)), one pass
  quantizes activations to FP8 per token (smoothing folded in), and cuBLASLt's FP8 GEMM multiplies.

Neither route reproduces W4A4's NVFP4 activation rounding (Hopper has no FP4 MMA); the GPU tests
check both against the reference backend and that W4A8 is at least as close to the unquantized
layer as W4A4 math is. The SVDQuant low-rank branch runs as two small bf16 GEMMs on the unsmoothed
input, its smoothing folded into the down-projection at load.
"""

from __future__ import annotations

import torch

from qdit.kernels.fp8_scaled_mm import fp8_quant_per_token, triton
from qdit.kernels.registry import YES, Verdict
from qdit.quant import numerics
from qdit.quant.scheme import LayerQuant, Scheme

if triton is not None:
    import triton.language as tl

SMALL_M = 64

if triton is not None:

    @triton.jit
    def _expand_fp8_kernel(w_ptr, bs_ptr, rf_ptr, lut_ptr, out_ptr, N, K,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_n, pid_k = tl.program_id(0), tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
        packed = tl.load(w_ptr + offs_n[:, None] * (K // 2) + offs_k[None, :] // 2, mask=mask, other=0)
        code = (packed >> ((offs_k[None, :] % 2) * 4).to(tl.uint8)) & 0xF
        val = tl.load(lut_ptr + code.to(tl.int32))
        scale = tl.load(bs_ptr + offs_n[:, None] * (K // 16) + offs_k[None, :] // 16, mask=mask, other=0.0).to(tl.float32)
        rf = tl.load(rf_ptr + offs_n, mask=offs_n < N, other=0.0)
        w = tl.clamp(val * scale * rf[:, None], -448.0, 448.0)
        tl.store(out_ptr + offs_n[:, None] * K + offs_k[None, :], w.to(tl.float8e4nv), mask=mask)

    @triton.jit
    def _w4a16_kernel(x_ptr, w_ptr, bs_ptr, g_ptr, lut_ptr, bias_ptr, out_ptr, M, N, K, stride_xm, stride_om,
                      HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            kmask = offs_k < K
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                        mask=(offs_m[:, None] < M) & kmask[None, :], other=0.0)
            wmask = kmask[:, None] & (offs_n[None, :] < N)
            packed = tl.load(w_ptr + offs_n[None, :] * (K // 2) + offs_k[:, None] // 2, mask=wmask, other=0)
            code = (packed >> ((offs_k[:, None] % 2) * 4).to(tl.uint8)) & 0xF
            val = tl.load(lut_ptr + code.to(tl.int32))
            scale = tl.load(bs_ptr + offs_n[None, :] * (K // 16) + offs_k[:, None] // 16, mask=wmask,
                            other=0.0).to(tl.float32)
            # e2m1 (2 significant bits) x e4m3 (4 bits) fits bf16's 8-bit significand: exact.
            acc += tl.dot(x.to(tl.bfloat16), (val * scale).to(tl.bfloat16))
        acc = acc * tl.load(g_ptr)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


_LUTS: dict[torch.device, torch.Tensor] = {}


def _lut(device: torch.device) -> torch.Tensor:
    if device not in _LUTS:
        _LUTS[device] = numerics.e2m1_table(device)
    return _LUTS[device]


@torch.library.custom_op("qdit::nvfp4_expand_fp8", mutates_args=())
def nvfp4_expand_fp8(weight: torch.Tensor, block_scale: torch.Tensor, row_factor: torch.Tensor) -> torch.Tensor:
    """packed [N, K/2] + block scales [N, K/16] -> FP8 [N, K] = e4m3(e2m1 * block_scale * row_factor[n])."""
    n, k = weight.shape[0], weight.shape[1] * 2
    out = torch.empty((n, k), dtype=torch.float8_e4m3fn, device=weight.device)
    grid = (triton.cdiv(n, 32), triton.cdiv(k, 256))
    _expand_fp8_kernel[grid](weight, block_scale, row_factor, _lut(weight.device), out, n, k,
                             BLOCK_N=32, BLOCK_K=256, num_warps=4)
    return out


@nvfp4_expand_fp8.register_fake
def _(weight, block_scale, row_factor):
    return torch.empty((weight.shape[0], weight.shape[1] * 2), dtype=torch.float8_e4m3fn, device=weight.device)


@torch.library.custom_op("qdit::nvfp4_w4a16_gemm", mutates_args=())
def nvfp4_w4a16_gemm(x: torch.Tensor, weight: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor,
                     bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] @ dequant(NVFP4 weight)^T (+ bias), in x's dtype."""
    m, k = x.shape
    n = weight.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    block_m = 16 if m <= 16 else 64
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, 64))
    _w4a16_kernel[grid](x, weight, block_scale, global_scale, _lut(x.device), bias if bias is not None else x, out,
                        m, n, k, x.stride(0), out.stride(0), HAS_BIAS=bias is not None,
                        BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=128, num_warps=4)
    return out


@nvfp4_w4a16_gemm.register_fake
def _(x, weight, block_scale, global_scale, bias):
    return torch.empty((x.shape[0], weight.shape[0]), dtype=x.dtype, device=x.device)


class NVFP4HopperBackend:
    name = "nvfp4-hopper"

    def supports_device(self, device: torch.device) -> Verdict:
        if device.type != "cuda":
            return Verdict(False, f"needs a CUDA device, the model is on {device.type}")
        if triton is None:
            return Verdict(False, "Triton is not installed")
        cap = torch.cuda.get_device_capability(device)
        if cap < (8, 9):
            return Verdict(False, f"its W4A8 route needs FP8 tensor cores (compute capability >= 8.9), "
                                  f"this GPU has {cap[0]}.{cap[1]}")
        return YES

    def can_implement(self, layer_quant: LayerQuant, in_features: int, out_features: int) -> Verdict:
        if layer_quant.scheme not in (Scheme.NVFP4, Scheme.W4A16_NVFP4, Scheme.NVFP4_SVD):
            return Verdict(False, f"computes NVFP4 layers only, not {layer_quant.scheme.value}")
        if in_features % 32 or out_features % 16:
            return Verdict(False, f"needs K % 32 == 0 and N % 16 == 0, got K={in_features} N={out_features}")
        return YES

    def prepare(self, layer) -> None:
        # Per-row FP8 scale of the dequantized weight, and the factor that maps block-scaled codes onto it.
        g = layer.tensor("weight_scale_2").float()
        row_amax = layer.method.dequantize(layer).abs().amax(dim=1)
        row_scale = torch.where(row_amax > 0, row_amax / numerics.E4M3_MAX, torch.ones_like(row_amax))
        layer.register_buffer("w4a8_row_scale", row_scale.reshape(1, -1).contiguous(), persistent=False)
        layer.register_buffer("w4a8_row_factor", (g / row_scale).contiguous(), persistent=False)
        layer.register_buffer("w4a16_global_scale", g.reshape(1).contiguous(), persistent=False)
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
        if x2d.shape[0] <= SMALL_M:
            y = nvfp4_w4a16_gemm(xs, weight, block_scale, layer.w4a16_global_scale, layer.bias)
        else:
            xq, token_scale = fp8_quant_per_token(xs)
            w8 = nvfp4_expand_fp8(weight, block_scale, layer.w4a8_row_factor)
            y = torch._scaled_mm(xq, w8.t(), scale_a=token_scale, scale_b=layer.w4a8_row_scale, out_dtype=x.dtype)
            if layer.bias is not None:
                y = y + layer.bias
        if layer.layer_quant.lora_rank:
            y = y + (x2d @ layer.lora_down) @ layer.tensor("svdquant_lora_b").t()
        return y.reshape(*x.shape[:-1], y.shape[-1])
