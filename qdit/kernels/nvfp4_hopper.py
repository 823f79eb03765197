"""NVFP4 layers (W4A4, W4A16, SVDQuant) on GPUs without FP4 tensor cores (Hopper, Ada).

Weights stay packed 4-bit in GPU memory. Two routes:
- GEMV, for every NVFP4 layer at M <= GEMV_MAX_M rows (in DiTs the timestep-conditioning Linears at batch 1):
  qdit.kernels.w4_gemv reads the packed codes once and multiplies in float32 on the CUDA cores. The weight
  is exactly the NVFP4 weight; activations stay in the model dtype (W4A16 math, closer to the unquantized
  layer than W4A4's).
- W4A8, for every larger M. One Triton pass expands the layer's weight into an FP8 scratch tensor with a
  per-row FP8 scale fixed at load (e4m3(e2m1 * block_scale * weight_scale_2 / row_scale)), activations are
  quantized to FP8 (smoothing folded in; per tensor from the calibrated input_scale where the layer has
  one, else per token), and cuBLASLt's FP8 GEMM multiplies.

Neither route reproduces W4A4's NVFP4 activation rounding (Hopper has no FP4 MMA); the GPU tests
check both against the reference backend and that each is at least as close to the unquantized
layer as W4A4 math is. The SVDQuant low-rank branch reads the same smoothed input as the 4-bit weight:
on the W4A8 route it is added to the weight as it is expanded (up @ down on the tensor cores, the
row's FP8 scale fixed at load to cover the sum), so it needs no GEMMs of its own; on the GEMV route it
is two small bf16 GEMMs.
"""

from __future__ import annotations

import torch

from qdit.kernels.fp8_scaled_mm import fp8_gpu_verdict, quantize_per_token, quantize_static, triton
from qdit.kernels.registry import YES, Verdict
from qdit.kernels.w4_gemv import GEMV_MAX_M, nvfp4_gemv
from qdit.quant import numerics
from qdit.quant.scheme import ActivationScale, LayerQuant, Scheme

if triton is not None:
    import triton.language as tl

    from qdit.kernels.w4_codes import E2M1_UNSCALE, e2m1_fp16_scaled, int4_value

    @triton.jit
    def _expand_fp8_kernel(w_ptr, s_ptr, rf_ptr, up_ptr, down_ptr, col_ptr, out_ptr, N, K, RANK,
                           INT4: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr,
                           BLOCK_R: tl.constexpr, ROW_TILES: tl.constexpr, HAS_COL: tl.constexpr):
        """ROW_TILES tiles of BLOCK_N rows x BLOCK_B packed bytes (2*BLOCK_B elements) per program, every
        byte read once: out[n, k] = e4m3((code * scale[n, k / GROUP] * row_factor[n] (+ sum_r up[n, r] * down[r, k]))
        (* col[k])). BLOCK_R > 0 adds a low-rank term (up [N, RANK], down [RANK, K]) on the tensor cores; the
        program's [RANK, 2*BLOCK_B] slice of `down` is loaded once for its ROW_TILES tiles. HAS_COL scales
        the columns (an input transform folded into the weight)."""
        pid_n, pid_b = tl.program_id(0), tl.program_id(1)
        kb = K // 2
        offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
        offs_s = pid_b * (BLOCK_B // (GROUP // 2)) + tl.arange(0, BLOCK_B // (GROUP // 2))
        offs_k = pid_b * 2 * BLOCK_B + tl.arange(0, 2 * BLOCK_B)
        if HAS_COL:
            col = tl.load(col_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
        if BLOCK_R > 0:
            offs_r = tl.arange(0, BLOCK_R)
            down = tl.load(down_ptr + offs_r[:, None] * K + offs_k[None, :],
                           mask=(offs_r < RANK)[:, None] & (offs_k < K)[None, :], other=0.0)
        for t in range(ROW_TILES):
            offs_n = (pid_n * ROW_TILES + t) * BLOCK_N + tl.arange(0, BLOCK_N)
            packed = tl.load(w_ptr + offs_n[:, None] * kb + offs_b[None, :],
                             mask=(offs_n < N)[:, None] & (offs_b[None, :] < kb), other=0).to(tl.int32)
            scale = tl.load(s_ptr + offs_n[:, None] * (K // GROUP) + offs_s[None, :],
                            mask=(offs_n < N)[:, None] & (offs_s[None, :] < K // GROUP), other=0.0).to(tl.float32)
            row_factor = tl.load(rf_ptr + offs_n, mask=offs_n < N, other=0.0)
            if not INT4:
                row_factor = row_factor * E2M1_UNSCALE  # e2m1_fp16_scaled decodes value * 2**-14
            scale = scale * row_factor[:, None]
            scale = tl.reshape(tl.broadcast_to(scale[:, :, None], (BLOCK_N, BLOCK_B // (GROUP // 2), GROUP // 2)),
                               (BLOCK_N, BLOCK_B))
            if INT4:
                lo, hi = int4_value(packed & 0xF), int4_value(packed >> 4)
            else:
                lo, hi = e2m1_fp16_scaled(packed), e2m1_fp16_scaled(packed >> 4)
            w = tl.reshape(tl.join(lo * scale, hi * scale), (BLOCK_N, 2 * BLOCK_B))  # element 2j: low nibble
            if BLOCK_R > 0:
                up = tl.load(up_ptr + offs_n[:, None] * RANK + offs_r[None, :],
                             mask=(offs_n < N)[:, None] & (offs_r < RANK)[None, :], other=0.0)
                w += tl.dot(up, down)
            if HAS_COL:
                w = w * col[None, :]
            w = tl.clamp(w, -448.0, 448.0)
            tl.store(out_ptr + offs_n[:, None] * K + offs_k[None, :], w.to(tl.float8e4nv),
                     mask=(offs_n < N)[:, None] & (offs_k[None, :] < K))


def _expand_fp8(weight: torch.Tensor, scales: torch.Tensor, row_factor: torch.Tensor, int4: bool,
                lr_up: torch.Tensor | None = None, lr_down: torch.Tensor | None = None,
                col_factor: torch.Tensor | None = None, tiles=None) -> torch.Tensor:
    n, k = weight.shape[0], weight.shape[1] * 2
    out = torch.empty((n, k), dtype=torch.float8_e4m3fn, device=weight.device)
    group = k // scales.shape[1]
    low_rank = lr_up is not None
    kind = ("low_rank" if n * k > LOW_RANK_LARGE else "low_rank_small") if low_rank else "int4" if int4 else "nvfp4"
    block_n, block_b, warps, row_tiles = tiles or EXPAND_TILES[kind]
    rank = lr_up.shape[1] if low_rank else 0
    grid = (triton.cdiv(n, block_n * row_tiles), triton.cdiv(k // 2, block_b))
    _expand_fp8_kernel[grid](weight, scales, row_factor, lr_up, lr_down, col_factor, out, n, k, rank, INT4=int4,
                             GROUP=group, BLOCK_N=block_n, BLOCK_B=block_b,
                             BLOCK_R=max(16, triton.next_power_of_2(rank)) if low_rank else 0,
                             ROW_TILES=row_tiles, HAS_COL=col_factor is not None, num_warps=warps)
    return out


# BLOCK_N, BLOCK_B (a multiple of the group's bytes), warps, row tiles per program: the best or within 4 % of the best on
# Qwen-Image's shapes in an H200 sweep, 1.3-2.4 TB/s read + written
# (benchmarks/results/h200-2026-12-03b/expand-variants.txt). With a low-rank term each program also reads
# a [rank, 2 * BLOCK_B] slice of `down`. In the H200 sweep of 2026-12-05 (rank 32,
# benchmarks/results/h200-2026-12-05/run3-expand-low-rank.txt, benchmarks/kernels/expand_low_rank.py) the
# (64, 64, 8, 1) tiles were the fastest summed over each kind's shapes: 163.7 us over the four 3072 x 12288 /
# 12288 x 3072 weights (NVFP4 and INT4), 29.7 us over the two 3072 x 3072 ones (33.7 with (16, 256, 4, 1),
# the best in an earlier sweep). No tiling with several row tiles per program, which read `down` fewer
# times, was the fastest on any shape: re-reading `down` is not what bounds this kernel.
# (tl.dot needs BLOCK_N >= 16.)
EXPAND_TILES = {"nvfp4": (8, 256, 4, 1), "int4": (8, 256, 4, 1), "low_rank": (64, 64, 8, 1),
                "low_rank_small": (64, 64, 8, 1)}
LOW_RANK_LARGE = 3072 * 3072 * 2  # weights above this many elements take the "low_rank" tiles


@torch.library.custom_op("qdit::w4_expand_fp8", mutates_args=())
def w4_expand_fp8(weight: torch.Tensor, scales: torch.Tensor, row_factor: torch.Tensor, int4: bool,
                  lr_up: torch.Tensor | None = None, lr_down: torch.Tensor | None = None,
                  col_factor: torch.Tensor | None = None) -> torch.Tensor:
    """packed codes [N, K/2] -> FP8 [N, K] = e4m3((value(code) * scale * row_factor[n] + (lr_up @ lr_down)[n, k])
    * col_factor[k]): NVFP4 (e2m1 codes, e4m3 scales per 16) or INT4 (two's-complement codes, scales per 64);
    the low-rank term (lr_up [N, r], lr_down [r, K]) and the column factor (float32 [K]) are optional."""
    return _expand_fp8(weight, scales, row_factor, int4, lr_up, lr_down, col_factor)


@w4_expand_fp8.register_fake
def _(weight, scales, row_factor, int4, lr_up=None, lr_down=None, col_factor=None):
    return torch.empty((weight.shape[0], weight.shape[1] * 2), dtype=torch.float8_e4m3fn, device=weight.device)


def prepare_w4a8_route(layer, codes: str, scales: str, int4: bool, factor: torch.Tensor | float = 1.0,
                       low_rank: tuple[torch.Tensor, torch.Tensor] | None = None,
                       column_factor: torch.Tensor | None = None) -> torch.Tensor | None:
    """The W4A8 route's buffers for a layer whose dequantized weight (layer.method.dequantize) is
    decoded code * group scale * factor[n], its packed codes and group scales being the tensors named
    `codes` and `scales`: its per-row FP8 scale and the factor mapping the group-scaled codes onto it.

    low_rank: (down [r, K], up [N, r]) of a low-rank branch that reads the same input as the 4-bit
    weight. It is folded into the expansion (FP8 weight = e4m3((W + up @ down) / row_scale), the row
    scale covering the sum), so the branch costs no GEMMs of its own and its output no extra pass.

    column_factor [K]: the weight's columns (low-rank term included) are multiplied by it, folding an
    input transform x -> x * column_factor (smoothing) into the weight: the input is then quantized as is.

    With layer.expand_fp8_at_load the FP8 weight is expanded here, once, and the packed codes and
    scales are released: the memory of an FP8 checkpoint instead of a 4-bit one, no expansion per call;
    the FP8 weight is the one every call would have expanded. A layer prepared again after that (static
    activation scales calibrated after loading) keeps it.

    Returns the dequantized 4-bit weight's row sums on the route's input, sum_k W[n, k] * column_factor[k]
    (float32 [N], for a caller's bias terms), or None for a layer whose weight was expanded already."""
    if codes in layer.released:
        return None
    weight = layer.method.dequantize(layer)
    row_sums = weight @ column_factor.float() if column_factor is not None else weight.sum(dim=1)
    if low_rank is not None:
        down, up = low_rank
        weight = weight + up.float() @ down.float()
    if column_factor is not None:
        weight = weight * column_factor.float()
    row_amax = weight.abs().amax(dim=1)
    del weight
    row_scale = torch.where(row_amax > 0, row_amax / numerics.E4M3_MAX, torch.ones_like(row_amax))
    layer.register_buffer("w4a8_row_scale", row_scale.reshape(1, -1).contiguous(), persistent=False)
    layer.register_buffer("w4a8_row_factor", (factor / row_scale).contiguous(), persistent=False)
    lr_up = lr_down = None
    if low_rank is not None:
        lr_up = (up.float() / row_scale[:, None]).to(layer.compute_dtype).contiguous()
        lr_down = down.to(layer.compute_dtype).contiguous()
    layer.w4a8_codes, layer.w4a8_int4 = (codes, scales), int4
    layer.register_buffer("w4a8_lr_up", lr_up, persistent=False)
    layer.register_buffer("w4a8_lr_down", lr_down, persistent=False)
    layer.register_buffer("w4a8_col_factor", None if column_factor is None else column_factor.float().contiguous(),
                          persistent=False)
    layer.register_buffer("w4a8_weight", None, persistent=False)
    if layer.expand_fp8_at_load:
        layer.w4a8_weight = w4a8_weight(layer)
        layer.w4a8_lr_up = layer.w4a8_lr_down = layer.w4a8_col_factor = None
        layer.release(codes, scales)
    return row_sums


def w4a8_weight(layer) -> torch.Tensor:
    """The layer's FP8 weight [N, K]: the one expanded at load, or expanded now from the packed codes."""
    if layer.w4a8_weight is not None:
        return layer.w4a8_weight
    codes, scales = layer.w4a8_codes
    return w4_expand_fp8(layer.tensor(codes), layer.tensor(scales), layer.w4a8_row_factor, layer.w4a8_int4,
                         layer.w4a8_lr_up, layer.w4a8_lr_down, layer.w4a8_col_factor)


def w4a8_gemm(layer, xs: torch.Tensor, input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """xs [M, K] quantized to FP8, times the layer's 4-bit weight as FP8 (no bias). Activation scales: per
    token, or input_scale (a calibrated per-tensor FP8 scale) where the layer has one, which keeps the
    quantization elementwise. Under torch.compile it is plain tensor ops, fused into the kernel that
    produced xs."""
    if input_scale is None:
        xq, scale_a = quantize_per_token(xs)
    else:
        xq = quantize_static(xs, input_scale)
        scale_a = per_row(input_scale, xs.shape[0])
    return w4a8_matmul(layer, xq, scale_a)


def per_row(scale: torch.Tensor, rows: int) -> torch.Tensor:
    """A one-element activation scale as cuBLASLt's row-wise mode takes it: [rows, 1], contiguous."""
    return scale.reshape(1, 1).expand(rows, 1).contiguous()


def w4a8_matmul(layer, xq: torch.Tensor, scale_a: torch.Tensor) -> torch.Tensor:
    """FP8 codes xq [M, K] with their scales [M, 1], times the layer's FP8 weight (no bias), in the layer's
    dtype."""
    return torch._scaled_mm(xq, w4a8_weight(layer).t(), scale_a=scale_a, scale_b=layer.w4a8_row_scale,
                            out_dtype=layer.compute_dtype)


class FusedW4A8Projection(torch.nn.Module):
    """Layers on the W4A8 route that read one input, as one (qdit.quant.shared_input): the input is
    transformed (x + shift, times multiplier) and quantized to FP8 per token once, and one cuBLASLt GEMM
    multiplies the layers' FP8 weights stacked along N. Per row, the same codes and scales as each layer
    computes alone; only the GEMM's tiling differs."""

    def __init__(self, layers, shift: float | None, multiplier: torch.Tensor | None,
                 biases: list[torch.Tensor | None]):
        super().__init__()
        self.sizes = [layer.out_features for layer in layers]
        self.shift = shift
        self.register_buffer("weight", torch.cat([layer.w4a8_weight for layer in layers]), persistent=False)
        self.register_buffer("row_scale", torch.cat([layer.w4a8_row_scale for layer in layers], dim=1),
                             persistent=False)
        self.register_buffer("multiplier", multiplier, persistent=False)
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat([b if b is not None else torch.zeros(n, dtype=layers[0].compute_dtype, device=self.weight.device)
                              for b, n in zip(biases, self.sizes)])
        self.register_buffer("bias", bias, persistent=False)
        start = 0
        for layer, n in zip(layers, self.sizes):  # each layer's weight: a view, not a second copy
            layer.w4a8_weight = self.weight[start:start + n]
            start += n

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x2d = x.reshape(-1, x.shape[-1])
        if not x2d.is_contiguous():
            x2d = x2d.contiguous()
        xs = x2d + self.shift if self.shift is not None else x2d
        if self.multiplier is not None:
            xs = xs * self.multiplier
        xq, scale_a = quantize_per_token(xs)
        # The bias in the GEMM's epilogue: added after the split, it took a pass of its own over the
        # stacked output before qdit's QK-norm op (a custom op, which inductor does not fuse into).
        y = torch._scaled_mm(xq, self.weight.t(), scale_a=scale_a, scale_b=self.row_scale, bias=self.bias,
                             out_dtype=xs.dtype)
        return list(y.reshape(*x.shape[:-1], y.shape[-1]).split(self.sizes, dim=-1))

    def extra_repr(self) -> str:
        return f"out_features={self.sizes}, in_features={self.weight.shape[1]}"


def fuse_w4a8_layers(layers, inputs: list[tuple[float | None, torch.Tensor | None]],
                     biases: list[torch.Tensor | None]) -> tuple[FusedW4A8Projection | None, str]:
    """A FusedW4A8Projection of layers whose inputs are transformed alike: inputs[i] = (shift,
    multiplier) of layer i; or None and why not."""
    if any(layer.w4a8_weight is None for layer in layers):
        return None, "their 4-bit weights are expanded per call (weights_4bit='packed')"
    if len({layer.in_features for layer in layers}) > 1:
        return None, "their input widths differ"
    shift, multiplier = inputs[0]
    for other_shift, other_multiplier in inputs[1:]:
        same_multiplier = (other_multiplier is None) == (multiplier is None) and (
            multiplier is None or torch.equal(other_multiplier, multiplier))
        if other_shift != shift or not same_multiplier:
            return None, "their input smoothing or shift differ"
    return FusedW4A8Projection(layers, shift, multiplier, biases), ""


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
        smooth = layer.tensor("pre_quant_scale").float() if layer.layer_quant.pre_quant_scale else None
        # ModelOpt's low-rank branch reads the smoothed input, as the 4-bit weight does.
        low_rank = (layer.tensor("svdquant_lora_a"), layer.tensor("svdquant_lora_b")) \
            if layer.layer_quant.lora_rank else None
        prepare_w4a8_route(layer, "weight", "weight_scale", int4=False, factor=tensor_scale, low_rank=low_rank)
        layer.register_buffer("gemv_global_scale", tensor_scale.reshape(1).contiguous(), persistent=False)
        # A calibrated NVFP4 input_scale is amax / (6 * 448): amax / 448 is the FP8 scale with the same
        # saturation point as the format's own W4A4 quantization.
        static = layer.layer_quant.activation_scale is ActivationScale.STATIC
        fp8_input_scale = layer.tensor("input_scale").float() * numerics.E2M1_MAX if static else None
        layer.register_buffer("w4a8_input_scale", fp8_input_scale, persistent=False)
        layer.register_buffer("smooth", None if smooth is None else smooth.to(layer.compute_dtype), persistent=False)

    def apply(self, layer, x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, x.shape[-1])
        if not x2d.is_contiguous():
            x2d = x2d.contiguous()
        xs = x2d * layer.smooth if layer.smooth is not None else x2d
        if x2d.shape[0] <= GEMV_MAX_M and layer.w4a8_weight is None:
            y = nvfp4_gemv(xs, layer.tensor("weight"), layer.tensor("weight_scale"), layer.gemv_global_scale,
                           layer.bias)
            if layer.layer_quant.lora_rank:
                y = y + (xs @ layer.w4a8_lr_down.t()) @ layer.tensor("svdquant_lora_b").t()
        else:  # the low-rank branch is folded into the FP8 weight
            y = w4a8_gemm(layer, xs, input_scale=layer.w4a8_input_scale)
            if layer.bias is not None:  # fused by inductor into the next kernel (see svdquant_hopper._with_bias)
                y = y + layer.bias
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def fuse_shared_input(self, layers) -> tuple[torch.nn.Module | None, str]:
        """Layers with per-token activation scales (calibrated per-tensor scales differ per layer)."""
        if any(layer.w4a8_input_scale is not None for layer in layers):
            return None, "their activation scales are calibrated per layer"
        return fuse_w4a8_layers(layers, [(None, layer.smooth) for layer in layers], [layer.bias for layer in layers])
