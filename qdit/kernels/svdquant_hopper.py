"""Nunchaku SVDQuant layers (canonical layout, docs/nunchaku.md) on Hopper, which has no 4-bit MMA.

- SVDQ_INT4 (W4A4, per-64 groups), two routes:
  * svdq-hopper (chosen automatically): W4A8 at every M, as the NVFP4 routes do it. The INT4 weight is
    expanded (per call, or once at load with weights_4bit="expanded_fp8") into an FP8 tensor
    (e4m3(code * scale / smooth[k] / row_scale), row scale fixed at load), the input is quantized to FP8
    per token as it comes (smoothing and GELU shift folded into the weight and bias), and cuBLASLt's FP8
    GEMM multiplies. An exact W4A4 GEMM must rescale its int32 result for every 64-group, which keeps the
    tensor cores mostly idle; the GPU tests check W4A8 is at least as close to the unquantized-activation
    layer as W4A4 is.
  * svdq-hopper-exact (forced only): Nunchaku's exact W4A4 arithmetic on INT8 tensor cores. One
    Triton pass smooths the input (and adds the GELU shift), quantizes it to 4-bit integers per
    64-group (signed, or unsigned for the GELU-shift layers) stored as int8, its scales transposed for
    coalesced reads. The GEMM unpacks the weight's nibbles in its main loop, takes one int8 x int8 ->
    int32 product per 64-group (exact) and applies both groups' scales to it before the float32
    accumulation; its epilogue adds the bias and the low-rank up-projection (bf16 MMA over the rank).
    Same arithmetic as Nunchaku's W4A4, up to the order of float32 additions.
- SVDQ_NVFP4 (W4A4, per-16 E4M3 groups): the same W4A8 route (weights stay 4-bit; the FP4 codes times
  wscales * wtscale * wcscales[n] expanded to FP8 per call). Per-16 activation groups are
  below the K of an FP8 MMA, so W4A4's activation rounding is not reproduced; W4A8 is closer to the
  unquantized layer than W4A4 (the GPU tests check it).
- AWQ_W4A16 (the modulation linears, M = batch): qdit.kernels.w4_gemv, which reads the packed codes
  (code * scale + zero per 64-group) once: a GEMV at one row, a tensor-core kernel above.

The low-rank branch reads the unsmoothed input, as in Nunchaku. On the exact route its down-projection
is one bf16 GEMM, its up-projection in the GEMM's epilogue. On the W4A8 route the whole layer is
rewritten on the unsmoothed input: FP8 weight = W / smooth (per column) + up @ down, built by the expansion
(qdit.kernels.nvfp4_hopper.prepare_w4a8_route), bias + shift * rowsum(W / smooth) for the GELU-shift
layers. So its input needs no transform, layers reading one input fuse whatever their smoothing, and an
MLP's GELU is computed in the quantization pass (fuse_input_gelu).
"""

from __future__ import annotations

import torch

from qdit.kernels.fp8_scaled_mm import fp8_gpu_verdict, fp8_quant_per_token_gelu, quantize_per_token, triton
from qdit.kernels.nvfp4_hopper import fuse_w4a8_layers, per_row, prepare_w4a8_route, w4a8_matmul
from qdit.kernels.registry import YES, Verdict
from qdit.kernels.w4_gemv import awq_w4a16_gemm
from qdit.quant.scheme import LayerQuant, Scheme
from qdit.quant.svdquant import GELU_SHIFT, INT4_GROUP

if triton is not None:
    import triton.language as tl

if triton is not None:
    # 1.5 * 2**23: (v + c) - c rounds a float32 |v| < 2**22 to the nearest integer, ties to even
    _RNE = tl.constexpr(12582912.0)

    @triton.jit
    def _int4_act_quant_kernel(x_ptr, smooth_ptr, q_ptr, s_ptr, M, K, stride_xm,
                               GROUPS: tl.constexpr, UNSIGNED: tl.constexpr, SHIFT: tl.constexpr):
        """One row, GROUPS 64-groups per program. q[m, g*64 + j] holds element 2j (j < 32) or 2(j-32)+1
        (j >= 32) of the group, the order the GEMM's nibble unpacking wants; s is stored [K/64, M]."""
        m, pid_g = tl.program_id(0), tl.program_id(1)
        offs_g = pid_g * GROUPS + tl.arange(0, GROUPS)
        offs = offs_g[:, None] * 64 + tl.arange(0, 64)[None, :]
        gmask = offs_g < K // 64
        x = tl.load(x_ptr + m * stride_xm + offs, mask=gmask[:, None], other=0.0)
        s = tl.load(smooth_ptr + offs, mask=gmask[:, None], other=1.0)
        # Rounded to the model dtype after each op, as the reference (and Nunchaku) compute them.
        if UNSIGNED:
            x = (x.to(tl.float32) + SHIFT).to(x.dtype)
        v = tl.math.div_rn(x.to(tl.float32), s.to(tl.float32)).to(x.dtype).to(tl.float32)
        if UNSIGNED:
            scale = tl.math.div_rn(tl.maximum(tl.max(v, axis=1), 0.0), 15.0)
        else:
            scale = tl.math.div_rn(tl.max(tl.abs(v), axis=1), 7.0)
        safe = tl.where(scale > 0, scale, 1.0)
        r = (tl.math.div_rn(v, safe[:, None]) + _RNE) - _RNE  # IEEE division, as torch's
        if UNSIGNED:
            q = tl.minimum(tl.maximum(r, 0.0), 15.0)
        else:
            q = tl.minimum(tl.maximum(r, -8.0), 7.0)
        q = q.to(tl.int8)
        even, odd = tl.split(tl.reshape(q, (GROUPS, 32, 2)))
        half = offs_g[:, None] * 64 + tl.arange(0, 32)[None, :]
        tl.store(q_ptr + m * K + half, even, mask=gmask[:, None])
        tl.store(q_ptr + m * K + half + 32, odd, mask=gmask[:, None])
        tl.store(s_ptr + offs_g * M + m, scale, mask=gmask)

    # The decoded weight is the MMA's A operand, which Hopper's wgmma reads from registers; the int8
    # activation codes (B) stream through shared memory. The tile is computed transposed: [N, M].
    @triton.autotune(
        configs=[triton.Config({"BLOCK_N": bn, "BLOCK_M": bm}, num_warps=w, num_stages=st)
                 for bn, bm, w, st in ((128, 128, 8, 3), (128, 64, 4, 4), (64, 128, 4, 4), (128, 256, 8, 3),
                                       (256, 128, 8, 3))],
        key=["M", "N", "K"])
    @triton.jit
    def _int4_gemm_kernel(q_ptr, sx_ptr, w_ptr, sw_ptr, bias_ptr, la_ptr, up_ptr, out_ptr, M, N, K, groups,
                          HAS_BIAS: tl.constexpr, RANK: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
        pid = tl.program_id(0)
        # Grouped ordering: neighbouring programs share weight tiles in L2.
        n_m, n_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        width = 8 * n_n  # 8 M tiles per group
        first_m = (pid // width) * 8
        rows = tl.minimum(n_m - first_m, 8)
        pid_m = first_m + (pid % width) % rows
        pid_n = (pid % width) // rows
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mmask, nmask = offs_m < M, offs_n < N
        offs_j = tl.arange(0, 32)
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for g in range(0, groups):
            packed = tl.load(w_ptr + offs_n[:, None] * (K // 2) + g * 32 + offs_j[None, :], mask=nmask[:, None],
                             other=0).to(tl.int32)
            lo, hi = packed & 15, packed >> 4
            w_even = (lo - ((lo & 8) << 1)).to(tl.int8)  # two's-complement nibble -> -8..7
            w_odd = (hi - ((hi & 8) << 1)).to(tl.int8)
            xa = tl.load(q_ptr + offs_m[None, :] * K + g * 64 + offs_j[:, None], mask=mmask[None, :], other=0)
            xb = tl.load(q_ptr + offs_m[None, :] * K + g * 64 + 32 + offs_j[:, None], mask=mmask[None, :], other=0)
            part = tl.dot(w_even, xa, out_dtype=tl.int32)
            part = tl.dot(w_odd, xb, part, out_dtype=tl.int32)
            sw = tl.load(sw_ptr + offs_n * groups + g, mask=nmask, other=0.0).to(tl.float32)
            sx = tl.load(sx_ptr + g * M + offs_m, mask=mmask, other=0.0)
            acc += part.to(tl.float32) * sw[:, None] * sx[None, :]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)[:, None]
        offs_r = tl.arange(0, 16)
        for r0 in range(0, RANK, 16):  # low-rank up-projection, bf16 MMA
            up = tl.load(up_ptr + offs_n[:, None] * RANK + r0 + offs_r[None, :], mask=nmask[:, None], other=0.0)
            la = tl.load(la_ptr + offs_m[None, :] * RANK + r0 + offs_r[:, None], mask=mmask[None, :], other=0.0)
            acc = tl.dot(up, la, acc)
        tl.store(out_ptr + offs_m[None, :] * N + offs_n[:, None], acc.to(out_ptr.dtype.element_ty),
                 mask=nmask[:, None] & mmask[None, :])


@torch.library.custom_op("qdit::svdq_int4_quant_act", mutates_args=())
def svdq_int4_quant_act(x: torch.Tensor, smooth: torch.Tensor, unsigned: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (contiguous rows) -> (int8 codes [M, K] in the GEMM's per-group order, float32 scales [K/64, M])."""
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    s = torch.empty((k // INT4_GROUP, m), dtype=torch.float32, device=x.device)
    if m:
        groups = 8
        _int4_act_quant_kernel[(m, triton.cdiv(k // INT4_GROUP, groups))](
            x, smooth, q, s, m, k, x.stride(0), GROUPS=groups, UNSIGNED=unsigned, SHIFT=GELU_SHIFT, num_warps=4)
    return q, s


@svdq_int4_quant_act.register_fake
def _(x, smooth, unsigned):
    m, k = x.shape
    return (torch.empty((m, k), dtype=torch.int8, device=x.device),
            torch.empty((k // INT4_GROUP, m), dtype=torch.float32, device=x.device))


@torch.library.custom_op("qdit::svdq_int4_gemm", mutates_args=())
def svdq_int4_gemm(q: torch.Tensor, act_scale: torch.Tensor, qweight: torch.Tensor, wscales: torch.Tensor,
                   bias: torch.Tensor | None, lora_act: torch.Tensor, proj_up: torch.Tensor) -> torch.Tensor:
    """INT4 W4A4 with the low-rank up-projection: [M, N] in lora_act's dtype."""
    m, k = q.shape
    n = qweight.shape[0]
    out = torch.empty((m, n), dtype=lora_act.dtype, device=q.device)
    if m:
        def grid(meta):
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

        _int4_gemm_kernel[grid](q, act_scale, qweight, wscales, bias, lora_act, proj_up, out, m, n, k, k // INT4_GROUP,
                                HAS_BIAS=bias is not None, RANK=proj_up.shape[1])
    return out


@svdq_int4_gemm.register_fake
def _(q, act_scale, qweight, wscales, bias, lora_act, proj_up):
    return torch.empty((q.shape[0], qweight.shape[0]), dtype=lora_act.dtype, device=q.device)


class SVDQuantHopperBackend:
    """INT4 and NVFP4 SVDQuant layers on the W4A8 route, AWQ on W4A16 (see the module docstring)."""

    name = "svdq-hopper"
    int4_w4a8 = True

    def supports_device(self, device: torch.device) -> Verdict:
        return fp8_gpu_verdict(device)  # INT8 and FP8 tensor cores, Triton

    def can_implement(self, layer_quant: LayerQuant, in_features: int, out_features: int) -> Verdict:
        scheme = layer_quant.scheme
        if scheme not in (Scheme.SVDQ_INT4, Scheme.SVDQ_NVFP4, Scheme.AWQ_W4A16):
            return Verdict(False, f"computes Nunchaku SVDQuant/AWQ layers only, not {scheme.value}")
        if in_features % 64 or out_features % 16:
            return Verdict(False, f"needs K % 64 == 0 and N % 16 == 0, got K={in_features} N={out_features}")
        if scheme is not Scheme.AWQ_W4A16 and layer_quant.lora_rank % 16:
            return Verdict(False, f"needs a low-rank branch of rank % 16 == 0, got {layer_quant.lora_rank}")
        return YES

    def prepare(self, layer) -> None:
        lq = layer.layer_quant
        if lq.scheme is Scheme.AWQ_W4A16:
            return
        dtype = layer.compute_dtype
        if lq.scheme is Scheme.SVDQ_INT4 and not self.int4_w4a8:
            # The exact kernels read the canonical tensors as they are.
            layer.register_buffer("proj_down_t", layer.tensor("proj_down").to(dtype).contiguous(), persistent=False)
            return
        # W4A8. INT4 weight = code * wscales; NVFP4 weight = e2m1 * wscales * wtscale * wcscales[n].
        factor = torch.ones((), device=layer.tensor("smooth_factor").device)
        if lq.wtscale:
            factor = factor * layer.tensor("wtscale").float()
        if lq.wcscales:
            factor = factor * layer.tensor("wcscales").float()
        # The 4-bit weight reads xs = (x + shift) / smooth, the low-rank branch x. Both fold into one FP8
        # weight on x: W / smooth (columns) + up @ down, which the expansion builds as (W + up @ (down *
        # smooth)) / smooth; the shift becomes the bias term shift * rowsum(W / smooth). The input is then
        # quantized as it comes (an FP8 activation needs no smoothing: its step is relative to each value).
        if "qweight" in layer.released:
            return  # prepared before, its weight expanded at load: every buffer is in place
        smooth = layer.tensor("smooth_factor").float()
        proj_down, proj_up = layer.tensor("proj_down").float(), layer.tensor("proj_up").float()
        row_sums = prepare_w4a8_route(layer, "qweight", "wscales", int4=lq.scheme is Scheme.SVDQ_INT4,
                                      factor=factor, low_rank=((proj_down * smooth[:, None]).t(), proj_up),
                                      column_factor=1.0 / smooth)
        bias = layer.bias.float() if layer.bias is not None else None
        if lq.gelu_shift:  # row_sums = sum_k W[n, k] / smooth[k]
            bias = GELU_SHIFT * row_sums if bias is None else bias + GELU_SHIFT * row_sums
        if getattr(layer, "w4a8_bias_handed_over", False):
            bias = None  # prepared again after release_output_bias: the next layer adds it
        layer.register_buffer("w4a8_bias", None if bias is None else bias.to(dtype), persistent=False)

    def apply(self, layer, x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, x.shape[-1])
        if not x2d.is_contiguous():
            x2d = x2d.contiguous()
        lq = layer.layer_quant
        if lq.scheme is Scheme.AWQ_W4A16:
            y = awq_w4a16_gemm(x2d, layer.tensor("qweight"), layer.tensor("wscales"), layer.tensor("wzeros"),
                               layer.bias)
            return y.reshape(*x.shape[:-1], y.shape[-1])
        if lq.scheme is Scheme.SVDQ_INT4 and not self.int4_w4a8:
            lora_act = x2d @ layer.proj_down_t  # the low-rank branch reads the unsmoothed input
            q, act_scale = svdq_int4_quant_act(x2d, layer.tensor("smooth_factor"), lq.gelu_shift)
            y = svdq_int4_gemm(q, act_scale, layer.tensor("qweight"), layer.tensor("wscales"), layer.bias,
                               lora_act, layer.tensor("proj_up"))
            return y.reshape(*x.shape[:-1], y.shape[-1])
        # Smoothing, shift and low-rank branch are folded into the FP8 weight and w4a8_bias (prepare).
        if layer.input_gelu:  # x is the MLP's pre-activation (qdit.models.activations.defer_gelu_to_next_linear)
            xq, scale_a = fp8_quant_per_token_gelu(x2d, layer.input_gelu_bias)
        else:
            xq, scale_a = quantize_per_token(x2d)
        return _with_bias(layer, w4a8_matmul(layer, xq, scale_a), x.shape)

    def takes_fp8_input(self, layer) -> bool:
        """Layers on the W4A8 route multiply an FP8 activation's codes as they are (qdit.quant.fp8_input):
        their input needs no transform (smoothing is folded into the weight)."""
        scheme = layer.layer_quant.scheme
        return scheme is Scheme.SVDQ_NVFP4 or (scheme is Scheme.SVDQ_INT4 and self.int4_w4a8)

    def apply_fp8_input(self, layer, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """The layer on codes [..., K] (E4M3) times scale (one float32): cuBLASLt's row-wise mode takes the
        activation's one scale repeated per row."""
        c2d = codes.reshape(-1, codes.shape[-1])
        return _with_bias(layer, w4a8_matmul(layer, c2d, per_row(scale, c2d.shape[0])), codes.shape)

    def fuse_input_gelu(self, layer) -> Verdict:
        """The W4A8 route applies the MLP's tanh-GELU (after the first Linear's bias) in its per-token
        quantization pass."""
        if layer.layer_quant.scheme not in (Scheme.SVDQ_INT4, Scheme.SVDQ_NVFP4):
            return Verdict(False, f"{layer.layer_quant.scheme.value} layers quantize no activation")
        if layer.layer_quant.scheme is Scheme.SVDQ_INT4 and not self.int4_w4a8:
            return Verdict(False, f"backend {self.name} quantizes the input to INT4 in its own pass")
        return YES

    def release_output_bias(self, layer) -> torch.Tensor | None:
        """The bias a W4A8 layer adds, handed to the layer after it (whose GELU input pass adds it) and no
        longer added here; None where the layer has none or adds it elsewhere."""
        if getattr(layer, "w4a8_bias", None) is None:
            return None
        bias, layer.w4a8_bias = layer.w4a8_bias, None
        layer.w4a8_bias_handed_over = True
        return bias

    def fuse_shared_input(self, layers) -> tuple[torch.nn.Module | None, str]:
        """SVDQuant layers on the W4A8 route."""
        if any(layer.layer_quant.scheme not in (Scheme.SVDQ_INT4, Scheme.SVDQ_NVFP4) for layer in layers):
            return None, "not all of them are SVDQuant W4A4 layers"
        if not self.int4_w4a8:
            return None, f"backend {self.name} computes each layer alone"
        # Their smoothing and shift are folded into each one's weight and bias: the input is shared as is.
        return fuse_w4a8_layers(layers, [(None, None)] * len(layers), [layer.w4a8_bias for layer in layers])


def _with_bias(layer, y: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """y [M, N] plus the layer's W4A8 bias, shaped as the input's rows. Added after the GEMM, where inductor
    fuses it into the kernel that reads y: in cuBLASLt's epilogue it made these GEMMs about 7 % slower
    (Qwen-Image, H100, benchmarks/results/h100-2026-12-06b)."""
    if layer.w4a8_bias is not None:
        y = y + layer.w4a8_bias
    return y.reshape(*shape[:-1], y.shape[-1])


class SVDQuantHopperExactBackend(SVDQuantHopperBackend):
    """Nunchaku's INT4 W4A4 arithmetic at every M (exact on INT8 tensor cores, slower than svdq-hopper's
    W4A8). Chosen only when forced: backend="svdq-hopper-exact" / --backend / QDIT_BACKEND."""

    name = "svdq-hopper-exact"
    int4_w4a8 = False
    forced_only = True

    def can_implement(self, layer_quant: LayerQuant, in_features: int, out_features: int) -> Verdict:
        if layer_quant.scheme is Scheme.SVDQ_NVFP4:
            return Verdict(False, "NVFP4 W4A4 needs FP4 tensor cores (Blackwell); on Hopper use svdq-hopper "
                                  "(its W4A8 route)")
        return super().can_implement(layer_quant, in_features, out_features)
