"""One LinearMethod per scheme: the tensors each scheme owns, and how a BF16 weight becomes them."""

from __future__ import annotations

import torch

from qdit.errors import CheckpointError
from qdit.quant import numerics
from qdit.quant.method import LinearMethod, TensorSpec
from qdit.quant.scheme import ActivationScale, LayerQuant, Scheme

F32, F8, U8 = torch.float32, torch.float8_e4m3fn, torch.uint8


class FP8Method(LinearMethod):
    """FP8 E4M3 weight; per-tensor (FP8) or per-channel (FP8_PER_CHANNEL) weight scale."""

    def tensor_specs(self):
        n, k = self.out_features, self.in_features
        per_channel = self.layer_quant.scheme is Scheme.FP8_PER_CHANNEL
        specs = {
            "weight": TensorSpec((n, k), F8),
            "weight_scale": TensorSpec((n,) if per_channel else (), F32),
        }
        if self.layer_quant.activation_scale is ActivationScale.STATIC:
            specs["input_scale"] = TensorSpec((), F32)
        if self.has_bias:
            specs["bias"] = TensorSpec((n,), None)
        return specs

    def quantize_weight(self, layer, weight):
        if self.layer_quant.scheme is Scheme.FP8_PER_CHANNEL:
            q, scale = numerics.fp8_per_channel_weight(weight)
        else:
            q, scale = numerics.fp8_per_tensor_weight(weight)
        return {"weight": q, "weight_scale": scale}

    def process_after_loading(self, layer):
        # FP8 weight bytes that decode to NaN are corrupt data (scales are clamped, weights are not).
        bad = int(numerics.e4m3_nan_mask(layer.tensor("weight")).sum())
        if bad:
            raise CheckpointError("an FP8 weight holds NaN bytes (0x7F/0xFF)", tensor=f"{layer.name}.weight",
                                  layer=layer.name, expected="finite float8_e4m3fn values", found=f"{bad} NaN byte(s)",
                                  hint="the checkpoint is corrupt; re-export or re-download it")
        return {}

    def dequantize(self, layer):
        scale = layer.tensor("weight_scale").float()
        return layer.tensor("weight").float() * (scale[:, None] if scale.ndim == 1 else scale)


class NVFP4Method(LinearMethod):
    """NVFP4 weight (packed E2M1, FP8 per-16 block scales, f32 global scale).

    Covers W4A4 (input_scale), W4A16 (no input_scale), smoothing (pre_quant_scale) and the SVDQuant
    low-rank branch (svdquant_lora_a/b), each present or not per layer as the checkpoint says.
    """

    def tensor_specs(self):
        n, k, lq = self.out_features, self.in_features, self.layer_quant
        specs = {
            "weight": TensorSpec((n, k // 2), U8),
            "weight_scale": TensorSpec((n, k // numerics.NVFP4_BLOCK), F8),
            "weight_scale_2": TensorSpec((), F32),
        }
        if lq.activation_scale is ActivationScale.STATIC:
            specs["input_scale"] = TensorSpec((), F32)
        if lq.pre_quant_scale:
            specs["pre_quant_scale"] = TensorSpec((k,), None)
        if lq.lora_rank:
            specs["svdquant_lora_a"] = TensorSpec((lq.lora_rank, k), None)
            specs["svdquant_lora_b"] = TensorSpec((n, lq.lora_rank), None)
        if self.has_bias:
            specs["bias"] = TensorSpec((n,), None)
        return specs

    def quantize_weight(self, layer, weight):
        out: dict[str, torch.Tensor] = {}
        w = weight.float()
        lq = self.layer_quant
        if lq.pre_quant_scale:
            # Without calibration data there is nothing to smooth against: s = 1.
            s = torch.ones(self.in_features, device=w.device, dtype=torch.float32)
            out["pre_quant_scale"] = s.to(weight.dtype)
            w = w / s
        if lq.lora_rank:
            a, b = low_rank_factors(w, lq.lora_rank)
            a, b = a.to(weight.dtype), b.to(weight.dtype)
            out["svdquant_lora_a"], out["svdquant_lora_b"] = a, b
            w = w - b.float() @ a.float()
        global_scale = numerics.nvfp4_global_scale(w.abs().amax())
        codes, block_scale = numerics.nvfp4_quantize(w, global_scale)
        out["weight"] = numerics.pack_nibbles(codes)
        out["weight_scale"] = block_scale
        out["weight_scale_2"] = global_scale
        return out

    def dequantize(self, layer):
        codes = numerics.unpack_nibbles(layer.tensor("weight"))
        return numerics.nvfp4_dequantize(codes, layer.tensor("weight_scale"), layer.tensor("weight_scale_2"))

    def process_after_loading(self, layer):
        fixed, count = numerics.clamp_e4m3_nan(layer.tensor("weight_scale"))
        if count:
            layer.set_tensor("weight_scale", fixed)
        return {"e4m3_nan_scale_bytes": count}


def low_rank_factors(w: torch.Tensor, rank: int, *, oversample: int = 16, power_iterations: int = 4,
                     seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-r factors (A [r,K], B [N,r]) with B @ A close to the best rank-r approximation of w.

    A randomized SVD with power iterations (Halko, Martinsson, Tropp): a full SVD of every 3072 x 12288
    weight of a 60-block model takes minutes, this takes seconds, and the subspace it finds differs
    from the exact one far less than the NVFP4 rounding that follows. torch.svd_lowrank does the same
    but draws from the global RNG; a seeded generator keeps load-time quantization reproducible.
    """
    w = w.float()
    q = min(rank + oversample, *w.shape)
    gen = torch.Generator(device=w.device).manual_seed(seed)
    y = w @ torch.randn(w.shape[1], q, generator=gen, device=w.device)
    for _ in range(power_iterations):
        basis = torch.linalg.qr(y).Q
        y = w @ (w.t() @ basis)
    basis = torch.linalg.qr(y).Q
    u_small, s, vh = torch.linalg.svd(basis.t() @ w, full_matrices=False)
    u = basis @ u_small
    root = s[:rank].sqrt()
    return root[:, None] * vh[:rank], u[:, :rank] * root[None, :]


def method_for(layer_quant: LayerQuant, in_features: int, out_features: int, bias: bool) -> LinearMethod:
    scheme = layer_quant.scheme
    if scheme is Scheme.BF16:
        raise ValueError("unquantized layers stay torch.nn.Linear; they have no LinearMethod")
    if scheme in (Scheme.FP8, Scheme.FP8_PER_CHANNEL):
        cls = FP8Method
    elif scheme in (Scheme.SVDQ_INT4, Scheme.SVDQ_NVFP4):
        from qdit.quant.svdquant import SVDQuantMethod as cls
    elif scheme is Scheme.AWQ_W4A16:
        from qdit.quant.svdquant import AWQW4A16Method as cls
    else:
        cls = NVFP4Method
    return cls(layer_quant, in_features, out_features, bias)
