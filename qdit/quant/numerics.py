"""Bit-level numerics of the formats qdit reads: FP8 E4M3 and NVFP4 (E2M1 codes, FP8 block scales).

These functions define what a quantized tensor *means*. The reference backend computes with them,
the load-time quantizer produces bytes with them, and every fast kernel is tested against them.
They follow NVIDIA ModelOpt 0.47 exactly (rounding, clamps, zero handling), see docs/formats.md.
"""

from __future__ import annotations

import torch

E4M3_MAX = 448.0
E2M1_MAX = 6.0
NVFP4_BLOCK = 16
# The smallest block scale ModelOpt writes: below it an E4M3 cast would underflow to zero.
E4M3_MIN_BLOCK_SCALE = 2.0**-9

# Magnitudes of the 3-bit E2M1 code; bit 3 of the nibble is the sign.
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# Rounding thresholds between neighbouring magnitudes. A value exactly on a threshold rounds to the
# even code (0.25 -> 0, 0.75 -> 1.0, 1.25 -> 1.0, 1.75 -> 2.0, 2.5 -> 2.0, 3.5 -> 4.0, 5 -> 4.0).
_E2M1_THRESHOLDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_TIES_ROUNDING_UP = (0.75, 1.75, 3.5)


_E2M1_TABLES: dict[torch.device, torch.Tensor] = {}


def e2m1_table(device: torch.device | str = "cpu") -> torch.Tensor:
    """float32 value of each of the 16 nibble codes (made once per device: a host-to-device copy on
    every call would break CUDA-graph capture of code that dequantizes, e.g. `QuantLinear.weight`)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device not in _E2M1_TABLES:
        mags = torch.tensor(E2M1_MAGNITUDES, dtype=torch.float32, device=device)
        _E2M1_TABLES[device] = torch.cat([mags, -mags])
    return _E2M1_TABLES[device]


def e2m1_encode(x: torch.Tensor) -> torch.Tensor:
    """Round float values to the nearest E2M1 code (ties to even, saturating at +-6); uint8 codes 0..15."""
    x = x.float()
    mag = x.abs()
    bounds = torch.tensor(_E2M1_THRESHOLDS, dtype=torch.float32, device=x.device)
    code = torch.searchsorted(bounds, mag.contiguous(), right=False).to(torch.uint8)
    ties_up = torch.zeros_like(code)
    for t in _TIES_ROUNDING_UP:
        ties_up |= (mag == t).to(torch.uint8)
    code = code + ties_up
    sign = (x < 0).to(torch.uint8) << 3
    return code | sign


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 -> float32 values."""
    return e2m1_table(codes.device)[codes.long()]


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """[..., K] codes -> [..., K/2] bytes; element 2j in the low nibble, 2j+1 in the high nibble."""
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_nibbles needs an even last dimension, got {tuple(codes.shape)}")
    return (codes[..., 0::2] & 0xF) | ((codes[..., 1::2] & 0xF) << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """[..., K/2] bytes -> [..., K] codes (inverse of pack_nibbles)."""
    low = packed & 0xF
    high = packed >> 4
    return torch.stack([low, high], dim=-1).flatten(-2)


def to_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Saturating cast to float8_e4m3fn (torch's cast turns out-of-range values into NaN)."""
    return x.float().clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def e4m3_nan_mask(t: torch.Tensor) -> torch.Tensor:
    """True where a float8_e4m3fn tensor holds one of the two NaN encodings (0x7F, 0xFF)."""
    return (t.view(torch.uint8) & 0x7F) == 0x7F


def clamp_e4m3_nan(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Replace NaN bytes by +448 (0x7E); returns the clamped tensor and how many bytes were replaced."""
    mask = e4m3_nan_mask(t)
    count = int(mask.sum())
    if count == 0:
        return t, 0
    raw = t.view(torch.uint8).clone()
    raw[mask] = 0x7E
    return raw.view(torch.float8_e4m3fn), count


# ---------------------------------------------------------------------------------------------
# FP8
# ---------------------------------------------------------------------------------------------


def fp8_per_tensor_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ModelOpt FP8 weight: scale = amax/448; bytes = e4m3(bf16(W / scale)) (ModelOpt rounds twice)."""
    scale = w.abs().amax().float() / E4M3_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scaled = (w.float() / scale).to(w.dtype) if w.dtype in (torch.bfloat16, torch.float16) else w.float() / scale
    return to_e4m3(scaled), scale


def fp8_per_channel_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ModelOpt FP8 per-channel weight: scale[n] = amax(W[n,:])/448, one f32 rounding."""
    scale = w.abs().amax(dim=1).float() / E4M3_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return to_e4m3(w.float() / scale[:, None]), scale


def fp8_quantize_static(x: torch.Tensor, input_scale: torch.Tensor) -> torch.Tensor:
    """Activation FP8 with a static per-tensor scale: e4m3_sat(x / input_scale)."""
    return to_e4m3(x.float() / input_scale.float())


def fp8_quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token FP8: scale[m] = amax(x[m,:])/448. A zero row gets scale 1 (its codes are 0)."""
    amax = x.abs().amax(dim=-1, keepdim=True).float()
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    return to_e4m3(x.float() / scale), scale


# ---------------------------------------------------------------------------------------------
# NVFP4
# ---------------------------------------------------------------------------------------------


def nvfp4_global_scale(amax: torch.Tensor) -> torch.Tensor:
    """weight_scale_2 / input_scale from an amax: amax / (6 * 448)."""
    return amax.float() / (E2M1_MAX * E4M3_MAX)


def nvfp4_quantize(
    x: torch.Tensor, global_scale: torch.Tensor, *, zero_block_scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize [..., K] to NVFP4 with a given global scale.

    Returns (codes uint8 [..., K], block_scale float8_e4m3fn [..., K/16]), unpacked codes.
    ModelOpt's weight exporter gives all-zero blocks the block scale 1.0 (zero_block_scale);
    its activation fake-quantizer leaves them at 0. Either way the block's codes are 0.
    """
    k = x.shape[-1]
    if k % NVFP4_BLOCK:
        raise ValueError(f"NVFP4 needs the last dimension to be a multiple of 16, got {k}")
    g = global_scale.float()
    blocks = x.float().reshape(*x.shape[:-1], k // NVFP4_BLOCK, NVFP4_BLOCK)
    block_amax = blocks.abs().amax(dim=-1)
    raw_scale = block_amax / (E2M1_MAX * g)
    if zero_block_scale:
        raw_scale = torch.where(raw_scale == 0, torch.full_like(raw_scale, zero_block_scale), raw_scale)
        block_scale = raw_scale.clamp(E4M3_MIN_BLOCK_SCALE, E4M3_MAX).to(torch.float8_e4m3fn)
    else:
        block_scale = raw_scale.clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)
    denom = block_scale.float() * g
    safe = torch.where(denom > 0, denom, torch.ones_like(denom))
    scaled = torch.where(denom[..., None] > 0, blocks / safe[..., None], torch.zeros_like(blocks))
    codes = e2m1_encode(scaled).reshape(x.shape)
    return codes, block_scale


def nvfp4_dequantize(codes: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """float32 values of NVFP4 codes [..., K] with block scales [..., K/16] and a global scale."""
    k = codes.shape[-1]
    vals = e2m1_decode(codes).reshape(*codes.shape[:-1], k // NVFP4_BLOCK, NVFP4_BLOCK)
    # e2m1 * (block_scale * global_scale): the order ModelOpt's own dequantization uses (bit-exact).
    vals = vals * (block_scale.float() * global_scale.float())[..., None]
    return vals.reshape(codes.shape)


def nvfp4_fake_quantize_activation(x: torch.Tensor, input_scale: torch.Tensor) -> torch.Tensor:
    """NVFP4 activation quantize-dequantize, as ModelOpt's input quantizer computes it (float32 result).

    Per 16-block: step = e4m3(min(bmax / (6 g), 448)) * g, with g = input_scale; a step below 1e-5
    is replaced by 1 (ModelOpt's guard, which zeroes such near-zero blocks); value = e2m1(|x| / step) * step.
    """
    k = x.shape[-1]
    if k % NVFP4_BLOCK:
        raise ValueError(f"NVFP4 needs the last dimension to be a multiple of 16, got {k}")
    g = input_scale.float()
    blocks = x.float().reshape(*x.shape[:-1], k // NVFP4_BLOCK, NVFP4_BLOCK)
    bmax = blocks.abs().amax(dim=-1, keepdim=True)
    step = (bmax / (E2M1_MAX * g)).clamp(max=E4M3_MAX).to(torch.float8_e4m3fn).float() * g
    step = torch.where(step >= 1e-5, step, torch.ones_like(step))
    mags = e2m1_decode(e2m1_encode(blocks.abs() / step)) * step
    return torch.where(blocks >= 0, mags, -mags).reshape(x.shape)
