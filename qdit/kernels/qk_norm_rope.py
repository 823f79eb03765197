"""Queries or keys of joint attention in one pass: RMSNorm per head, rotary embedding, and the
concatenation of the streams along the sequence (Qwen-Image: [text, image]; Z-Image: one stream).

Compiled, diffusers' ops for this (norm, rotation, cat into the attention's input) became two
inductor kernels that wrote and re-read a float32 copy of q or k (about 70 us per 4096-token image
tensor on an H200, four per Qwen-Image block). The Triton kernel reads each element once and writes
the bf16 result into its place in the joint tensor. Off CUDA the op runs the same math in torch.

Math, per row x (one token, one head, D values), as diffusers' RMSNorm then its complex rotation:
  n = round(x * rsqrt(mean(x^2) + eps));  y = round(n * w)  (round: to x's dtype)
  (y[2i], y[2i+1]) rotated by (cos_i, sin_i), in float32, rounded once.
"""

from __future__ import annotations

import torch

from qdit.kernels.fp8_scaled_mm import triton

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _qk_norm_rope_kernel(x_ptr, w_ptr, f_ptr, out_ptr, ROWS, S, H, stride_xb, stride_xs, stride_fb, stride_fs,
                             stride_ob, stride_os, seq_offset, eps, HALF: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                             BLOCK_ROWS: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        rmask = rows < ROWS
        h = rows % H
        s = (rows // H) % S
        b = rows // (H * S)
        offs_d = tl.arange(0, 2 * HALF)
        x = tl.load(x_ptr + (b * stride_xb + s * stride_xs + h * 2 * HALF)[:, None] + offs_d[None, :],
                    mask=rmask[:, None], other=0.0)
        dtype = x.dtype
        xf = x.to(tl.float32)
        inv = tl.math.rsqrt(tl.sum(xf * xf, axis=1) / (2 * HALF) + eps)
        y = (xf * inv[:, None]).to(dtype)
        if HAS_WEIGHT:
            y = (y.to(tl.float32) * tl.load(w_ptr + offs_d).to(tl.float32)[None, :]).to(dtype)
        re, im = tl.split(tl.reshape(y.to(tl.float32), (BLOCK_ROWS, HALF, 2)))
        offs_f = (b * stride_fb + s * stride_fs)[:, None] + 2 * tl.arange(0, HALF)[None, :]
        cos = tl.load(f_ptr + offs_f, mask=rmask[:, None], other=0.0)
        sin = tl.load(f_ptr + offs_f + 1, mask=rmask[:, None], other=0.0)
        out = tl.reshape(tl.join(re * cos - im * sin, re * sin + im * cos), (BLOCK_ROWS, 2 * HALF))
        tl.store(out_ptr + (b * stride_ob + (s + seq_offset) * stride_os + h * 2 * HALF)[:, None] + offs_d[None, :],
                 out.to(dtype), mask=rmask[:, None])


def _freqs_bsd2(freqs: torch.Tensor, batch: int) -> torch.Tensor:
    """(cos, sin) pairs [B, S, D/2, 2] from pairs [S, D/2, 2] (shared by the batch) or [B, S, D/2, 2]."""
    return freqs.unsqueeze(0).expand(batch, *freqs.shape) if freqs.dim() == 3 else freqs


def qk_norm_rope_reference(x: torch.Tensor, weight: torch.Tensor | None, eps: float, freqs: torch.Tensor) -> torch.Tensor:
    """x [B, S, H, D] through diffusers' RMSNorm arithmetic (eager), then rotated by freqs, float32
    (cos, sin) pairs [S, D/2, 2] or [B, S, D/2, 2] (qdit.models.rotary)."""
    from qdit.models.rotary import rotate_by_cos_sin

    variance = x.float().pow(2).mean(-1, keepdim=True)
    y = (x * torch.rsqrt(variance + eps)).to(x.dtype)
    if weight is not None:
        y = y * weight.to(x.dtype)
    return rotate_by_cos_sin(y, _freqs_bsd2(freqs, x.shape[0]).unsqueeze(2))


@torch.library.custom_op("qdit::qk_norm_rope_cat", mutates_args=())
def qk_norm_rope_cat(xs: list[torch.Tensor], weights: list[torch.Tensor | None], eps: list[float],
                     freqs: list[torch.Tensor]) -> torch.Tensor:
    """Streams xs[i] [B, S_i, H, D] normalized with (weights[i], eps[i]), rotated by freqs[i] (float32 (cos,
    sin) pairs [S_i, D/2, 2] or [B, S_i, D/2, 2]), concatenated along S."""
    if not xs[0].is_cuda or triton is None:
        return torch.cat([qk_norm_rope_reference(x, w, e, f) for x, w, e, f in zip(xs, weights, eps, freqs)], dim=1)
    b, _, h, d = xs[0].shape
    out = torch.empty((b, sum(x.shape[1] for x in xs), h, d), dtype=xs[0].dtype, device=xs[0].device)
    offset = 0
    for x, w, e, f in zip(xs, weights, eps, freqs):
        f = _freqs_bsd2(f, b)
        if x.stride(3) != 1 or x.stride(2) != d or f.stride(3) != 1 or f.stride(2) != 2:
            raise ValueError(f"qk_norm_rope_cat wants heads of contiguous values and contiguous (cos, sin) pairs; "
                             f"got x strides {x.stride()}, freqs strides {f.stride()}")
        rows = b * x.shape[1] * h
        block_rows = 16
        _qk_norm_rope_kernel[(triton.cdiv(rows, block_rows),)](
            x, w, f, out, rows, x.shape[1], h, x.stride(0), x.stride(1), f.stride(0), f.stride(1),
            out.stride(0), out.stride(1), offset, e, HALF=d // 2, HAS_WEIGHT=w is not None,
            BLOCK_ROWS=block_rows, num_warps=4, enable_fp_fusion=False)
        offset += x.shape[1]
    return out


@qk_norm_rope_cat.register_fake
def _(xs, weights, eps, freqs):
    b, _, h, d = xs[0].shape
    return xs[0].new_empty((b, sum(x.shape[1] for x in xs), h, d))
