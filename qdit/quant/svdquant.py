"""Nunchaku SVDQuant layers in qdit's canonical layout: their tensors, and the forward they mean.

Schemes SVDQ_INT4 / SVDQ_NVFP4 (W4A4 with smoothing and a low-rank branch) and AWQ_W4A16 (the
modulation linears). Tensor layouts: docs/nunchaku.md; forward math: ../shared/specs/nunchaku-svdquant.md
section 4. `svdq_reference_forward` / `awq_reference_forward` are what the reference backend runs.
"""

from __future__ import annotations

import torch

from qdit.quant import numerics
from qdit.quant.method import LinearMethod, TensorSpec
from qdit.quant.scheme import Scheme

F32, F8, U8 = torch.float32, torch.float8_e4m3fn, torch.uint8

INT4_GROUP = 64
NVFP4_GROUP = 16
AWQ_GROUP = 64
# INT4 layers after a GELU quantize (gelu(h) + GELU_SHIFT) / smooth as unsigned codes 0..15
GELU_SHIFT = 0.171875


def group_size(scheme: Scheme) -> int:
    return NVFP4_GROUP if scheme is Scheme.SVDQ_NVFP4 else INT4_GROUP


def int4_decode(codes: torch.Tensor) -> torch.Tensor:
    """Two's-complement nibbles (uint8 0..15) -> float32 -8..7."""
    c = codes.to(torch.int16)
    return torch.where(c >= 8, c - 16, c).float()


class SVDQuantMethod(LinearMethod):
    """A canonical Nunchaku SVDQuant W4A4 linear (INT4 group 64 or NVFP4 group 16)."""

    def tensor_specs(self):
        n, k, lq = self.out_features, self.in_features, self.layer_quant
        g = group_size(lq.scheme)
        nvfp4 = lq.scheme is Scheme.SVDQ_NVFP4
        specs = {
            "qweight": TensorSpec((n, k // 2), U8),
            "wscales": TensorSpec((n, k // g), F8 if nvfp4 else None),
        }
        if lq.wtscale:
            specs["wtscale"] = TensorSpec((), F32)
        if lq.wcscales:
            specs["wcscales"] = TensorSpec((n,), None)
        if self.has_bias:
            specs["bias"] = TensorSpec((n,), None)
        specs["smooth_factor"] = TensorSpec((k,), None)
        specs["proj_down"] = TensorSpec((k, lq.lora_rank), None)
        specs["proj_up"] = TensorSpec((n, lq.lora_rank), None)
        return specs

    def dequantize(self, layer):
        """float32 [N, K]: INT4 code * wscales; NVFP4 e2m1(code) * wscales * wtscale * wcscales[n].
        Smoothing and the low-rank branch are not folded in."""
        codes = numerics.unpack_nibbles(layer.tensor("qweight"))
        n, k = codes.shape
        g = group_size(self.layer_quant.scheme)
        scales = layer.tensor("wscales").float().repeat_interleave(g, dim=1)
        if self.layer_quant.scheme is Scheme.SVDQ_INT4:
            return int4_decode(codes) * scales
        w = numerics.e2m1_decode(codes) * scales
        if self.layer_quant.wtscale:
            w = w * layer.tensor("wtscale").float()
        if self.layer_quant.wcscales:
            w = w * layer.tensor("wcscales").float()[:, None]
        return w

    def quantize_weight(self, layer, weight):
        """A BF16 weight in this layout (quantization at load): smoothing factors of 1 (there is no
        calibration data to smooth against), a rank-r branch from a randomized SVD, the residual in
        4 bits with Nunchaku's group scales."""
        from qdit.quant.methods import low_rank_factors

        lq, w = self.layer_quant, weight.float()
        n, k = w.shape
        down, up = low_rank_factors(w, lq.lora_rank)
        down, up = down.to(weight.dtype), up.to(weight.dtype)
        residual = w - up.float() @ down.float()
        out = {"smooth_factor": torch.ones(k, device=w.device, dtype=weight.dtype),
               "proj_down": down.t().contiguous(), "proj_up": up.contiguous()}
        if lq.scheme is Scheme.SVDQ_INT4:
            groups = residual.reshape(n, k // INT4_GROUP, INT4_GROUP)
            scales = (groups.abs().amax(-1) / 7).to(weight.dtype)
            safe = torch.where(scales.float() > 0, scales.float(), torch.ones_like(scales.float()))
            codes = torch.round(groups / safe[..., None]).clamp(-8, 7).to(torch.int16).reshape(n, k)
            out["qweight"] = numerics.pack_nibbles(codes & 0xF).to(torch.uint8)
            out["wscales"] = scales
        else:
            global_scale = numerics.nvfp4_global_scale(residual.abs().amax())
            codes, block_scale = numerics.nvfp4_quantize(residual, global_scale)
            out["qweight"], out["wscales"], out["wtscale"] = numerics.pack_nibbles(codes), block_scale, global_scale
        return out

    def process_after_loading(self, layer):
        if self.layer_quant.scheme is not Scheme.SVDQ_NVFP4:
            return {}
        fixed, count = numerics.clamp_e4m3_nan(layer.tensor("wscales"))
        if count:
            layer.set_tensor("wscales", fixed)
        return {"e4m3_nan_scale_bytes": count}


class AWQW4A16Method(LinearMethod):
    """A canonical Nunchaku AWQ W4A16 modulation linear: w = code * wscales + wzeros, per 64 inputs."""

    def tensor_specs(self):
        n, k = self.out_features, self.in_features
        specs = {
            "qweight": TensorSpec((n, k // 2), U8),
            "wscales": TensorSpec((n, k // AWQ_GROUP), None),
            "wzeros": TensorSpec((n, k // AWQ_GROUP), None),
        }
        if self.has_bias:
            specs["bias"] = TensorSpec((n,), F32)  # exact after removing Nunchaku's +1 (docs/nunchaku.md)
        return specs

    def quantize_weight(self, layer, weight):
        """Asymmetric 4 bits per 64 inputs: zero = group min, scale = (max - min) / 15."""
        n, k = weight.shape
        groups = weight.float().reshape(n, k // AWQ_GROUP, AWQ_GROUP)
        lo, hi = groups.amin(-1), groups.amax(-1)
        scales = ((hi - lo) / 15).to(weight.dtype)
        zeros = lo.to(weight.dtype)
        safe = torch.where(scales.float() > 0, scales.float(), torch.ones_like(scales.float()))
        codes = torch.round((groups - zeros.float()[..., None]) / safe[..., None]).clamp(0, 15).to(torch.uint8)
        return {"qweight": numerics.pack_nibbles(codes.reshape(n, k)), "wscales": scales, "wzeros": zeros}

    def dequantize(self, layer):
        codes = numerics.unpack_nibbles(layer.tensor("qweight")).float()
        scales = layer.tensor("wscales").float().repeat_interleave(AWQ_GROUP, dim=1)
        zeros = layer.tensor("wzeros").float().repeat_interleave(AWQ_GROUP, dim=1)
        return codes * scales + zeros


# ---------------------------------------------------------------------------------------------
# Forward math (spec section 4), float32
# ---------------------------------------------------------------------------------------------

def _groups(x: torch.Tensor, g: int) -> torch.Tensor:
    return x.reshape(*x.shape[:-1], x.shape[-1] // g, g)


def _exact_div(x: torch.Tensor, divisor: int) -> torch.Tensor:
    """The IEEE float32 quotient on every device. CUDA torch divides by a Python scalar as a multiply by
    its rounded reciprocal, one ulp off at times; bf16 inputs then land exactly on .5 after the scale's
    division often enough (0.1 % of codes) for that ulp to flip codes. float64 division rounded to
    float32 is correctly rounded."""
    return (x.double() / divisor).float()


def int4_fake_quantize(x: torch.Tensor) -> torch.Tensor:
    """Signed INT4 per 64-group: s = max|x| / 7, q = clamp(rint(x / s), -8, 7); returns q * s (float32)."""
    b = _groups(x.float(), INT4_GROUP)
    s = _exact_div(b.abs().amax(dim=-1, keepdim=True), 7)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.round(b / safe).clamp(-8, 7)
    return (q * s).reshape(x.shape)


def uint4_fake_quantize(x: torch.Tensor) -> torch.Tensor:
    """Unsigned INT4 per 64-group (GELU-shift layers): s = max(x) / 15, q = clamp(rint(x / s), 0, 15)."""
    b = _groups(x.float(), INT4_GROUP)
    s = _exact_div(b.amax(dim=-1, keepdim=True).clamp(min=0), 15)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.round(b / safe).clamp(0, 15)
    return (q * s).reshape(x.shape)


def nvfp4_fake_quantize(x: torch.Tensor) -> torch.Tensor:
    """NVFP4 per 16-group, no per-tensor scale: s = e4m3(min(max|x| / 6, 448)) (round to nearest,
    saturating); codes = e2m1(x * (1 / s_unrounded)) in float32; value = e2m1(code) * s."""
    b = _groups(x.float(), NVFP4_GROUP)
    unrounded = (b.abs().amax(dim=-1, keepdim=True) / numerics.E2M1_MAX).clamp(max=numerics.E4M3_MAX)
    s = numerics.to_e4m3(unrounded).float()
    inv = torch.where(unrounded > 0, 1.0 / unrounded, torch.zeros_like(unrounded))
    codes = numerics.e2m1_encode(b * inv)
    return (numerics.e2m1_decode(codes) * s).reshape(x.shape)


def svdq_reference_forward(layer, x2d: torch.Tensor) -> torch.Tensor:
    """y = quant(x / smooth) @ deq(W)^T [* wcscales] + bias + (x @ proj_down) @ proj_up^T, float32 [M, N].

    x2d is in the model dtype; the division by the smoothing factor (and the GELU shift) happen in it,
    as in Nunchaku's kernels. The low-rank branch reads the unsmoothed, unshifted input.
    """
    lq = layer.layer_quant
    lora_act = x2d.float() @ layer.tensor("proj_down").float()
    smooth = layer.tensor("smooth_factor").to(x2d.dtype)
    if lq.gelu_shift:
        xq = uint4_fake_quantize((x2d + GELU_SHIFT) / smooth)
    elif lq.scheme is Scheme.SVDQ_INT4:
        xq = int4_fake_quantize(x2d / smooth)
    else:
        xq = nvfp4_fake_quantize(x2d / smooth)
    y = xq @ layer.method.dequantize(layer).t()
    if layer.bias is not None:
        y = y + layer.bias.float()
    return y + lora_act @ layer.tensor("proj_up").float().t()


def awq_reference_forward(layer, x2d: torch.Tensor) -> torch.Tensor:
    y = x2d.float() @ layer.method.dequantize(layer).t()
    if layer.bias is not None:
        y = y + layer.bias.float()
    return y


__all__ = ["AWQW4A16Method", "GELU_SHIFT", "SVDQuantMethod", "awq_reference_forward", "int4_fake_quantize",
           "nvfp4_fake_quantize", "svdq_reference_forward", "uint4_fake_quantize"]
