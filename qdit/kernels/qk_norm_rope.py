"""Queries or keys of joint attention in one pass: RMSNorm per head, rotary embedding, and the
concatenation of the streams along the sequence (Qwen-Image: [text, image]; Z-Image: one stream).

Compiled, diffusers' ops for this (norm, rotation, cat into the attention's input) became two
inductor kernels that wrote and re-read a float32 copy of q or k (about 70 us per 4096-token image
tensor on an H200, four per Qwen-Image block). The Triton kernel reads each element once and writes
the bf16 result into its place in the joint tensor, both streams in one launch: in compiled Qwen-Image
steps on an H100 (1024^2, FP8 attention), 26.8 us per q or k (two launches per block) against 14.6 us
per stream's q or k before (four launches per block), two separate runs
(benchmarks/results/h100-2026-12-06/). Off CUDA the op runs the same math in torch.

Math, per row x (one token, one head, D values), as diffusers' RMSNorm then its complex rotation:
  n = round(x * rsqrt(mean(x^2) + eps));  y = round(n * w)  (round: to x's dtype)
  (y[2i], y[2i+1]) rotated by (cos_i, sin_i), in float32, rounded once.
torch.nn.RMSNorm (FLUX's QK norms) rounds once: y = round(x * rsqrt(mean(x^2) + eps) * w); the ops take
round_before_weight=False for it.

For FP8 attention the same kernel writes E4M3 codes instead (qk_norm_rope_cat_fp8), with a per-tensor
scale that needs no pass over the result: after the norm sum(n^2) <= D, so every pair (y[2i], y[2i+1]),
rotated or not, has length <= sqrt(D) * max|w|. That bound (times 1 + 2^-6 for the three roundings
to x's dtype, each <= 2^-8 relative) maps to 448. It costs nothing in accuracy that matters: E4M3's
relative step is the same over its whole normal range, and only values below 2^-6 * scale (1/28672 of
the bound, where codes turn subnormal) round more coarsely. On an H200, for Qwen-Image's q at 1024^2,
this kernel takes 24.4 us per call against 43.0 us for the bf16 kernel plus the compiled amax and
rounding passes it replaces, with the same rounding error
(benchmarks/results/h200-2026-12-04/run3-qk-kernel.txt).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from qdit.kernels.fp8_scaled_mm import triton
from qdit.quant.numerics import E4M3_MAX, to_e4m3

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _stream_rows(block, x_ptr, w_ptr, f_ptr, out_ptr, ROWS, S, H, stride_xb, stride_xs, stride_fb, stride_fs,
                     stride_ob, stride_os, seq_offset, eps, inv_scale, HALF: tl.constexpr,
                     BLOCK_HALF: tl.constexpr, HAS_WEIGHT: tl.constexpr, ROUND_BEFORE_WEIGHT: tl.constexpr,
                     BLOCK_ROWS: tl.constexpr, FP8_OUT: tl.constexpr):
        """One program's block of rows (token, head) of one stream, written at seq_offset along S."""
        rows = block * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        rmask = rows < ROWS
        h = rows % H
        s = (rows // H) % S
        b = rows // (H * S)
        # Triton's ranges are powers of two: a head of D = 2 * HALF values is padded to 2 * BLOCK_HALF
        offs_d = tl.arange(0, 2 * BLOCK_HALF)
        dmask = offs_d < 2 * HALF
        x = tl.load(x_ptr + (b * stride_xb + s * stride_xs + h * 2 * HALF)[:, None] + offs_d[None, :],
                    mask=rmask[:, None] & dmask[None, :], other=0.0)
        dtype = x.dtype
        xf = x.to(tl.float32)
        inv = tl.math.rsqrt(tl.sum(xf * xf, axis=1) / (2 * HALF) + eps)
        y = xf * inv[:, None]
        if ROUND_BEFORE_WEIGHT or not HAS_WEIGHT:
            y = y.to(dtype).to(tl.float32)
        if HAS_WEIGHT:
            y = (y * tl.load(w_ptr + offs_d, mask=dmask, other=0.0).to(tl.float32)[None, :]).to(dtype).to(tl.float32)
        re, im = tl.split(tl.reshape(y, (BLOCK_ROWS, BLOCK_HALF, 2)))
        offs_pair = tl.arange(0, BLOCK_HALF)
        offs_f = (b * stride_fb + s * stride_fs)[:, None] + 2 * offs_pair[None, :]
        fmask = rmask[:, None] & (offs_pair < HALF)[None, :]
        cos = tl.load(f_ptr + offs_f, mask=fmask, other=0.0)
        sin = tl.load(f_ptr + offs_f + 1, mask=fmask, other=0.0)
        out = tl.reshape(tl.join(re * cos - im * sin, re * sin + im * cos), (BLOCK_ROWS, 2 * BLOCK_HALF)).to(dtype)
        if FP8_OUT:  # codes = e4m3(x * (1 / scale)), as quantize_by_reciprocal computes them
            out = tl.clamp(out.to(tl.float32) * inv_scale, -448.0, 448.0).to(tl.float8e4nv)
        tl.store(out_ptr + (b * stride_ob + (s + seq_offset) * stride_os + h * 2 * HALF)[:, None] + offs_d[None, :],
                 out, mask=rmask[:, None] & dmask[None, :])

    @triton.jit
    def _qk_norm_rope_kernel(x0_ptr, w0_ptr, f0_ptr, rows0, seq0, stride_xb0, stride_xs0, stride_fb0, stride_fs0, eps0,
                             x1_ptr, w1_ptr, f1_ptr, rows1, seq1, stride_xb1, stride_xs1, stride_fb1, stride_fs1, eps1,
                             blocks0, out_ptr, H, stride_ob, stride_os, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
                             HAS_WEIGHT0: tl.constexpr, HAS_WEIGHT1: tl.constexpr, ROUND_BEFORE_WEIGHT: tl.constexpr,
                             BLOCK_ROWS: tl.constexpr, FP8_OUT: tl.constexpr = False, scale_ptr=None,
                             bound_w0_ptr=None, bound_w1_ptr=None, bound_factor=1.0, BOUND_WEIGHTS: tl.constexpr = 0,
                             BOUND_HAS_ONE: tl.constexpr = False):
        """Both streams in one launch: programs below blocks0 take stream 0's rows, the rest stream 1's
        (written after stream 0's seq0 positions)."""
        pid = tl.program_id(0)
        inv_scale = 1.0
        if FP8_OUT:
            # every program derives the same scale from the norm weights of all streams (qk_fp8_scale)
            offs_d = tl.arange(0, 2 * BLOCK_HALF)
            dmask = offs_d < 2 * HALF
            wmax = tl.full((), 0.0, tl.float32)
            if BOUND_HAS_ONE:  # a stream without a weight: its bound is that of weight 1
                wmax = tl.full((), 1.0, tl.float32)
            if BOUND_WEIGHTS >= 1:
                wmax = tl.maximum(wmax, tl.max(tl.abs(tl.load(bound_w0_ptr + offs_d, mask=dmask, other=0.0).to(tl.float32)), axis=0))
            if BOUND_WEIGHTS >= 2:
                wmax = tl.maximum(wmax, tl.max(tl.abs(tl.load(bound_w1_ptr + offs_d, mask=dmask, other=0.0).to(tl.float32)), axis=0))
            scale = tl.where(wmax > 0, wmax * bound_factor, 1.0)
            # one IEEE division per program (Triton's `/` on float32 is approximate), then products
            inv_scale = tl.math.div_rn(1.0, scale)
            if pid == 0:
                tl.store(scale_ptr, scale)
        if pid < blocks0:
            _stream_rows(pid, x0_ptr, w0_ptr, f0_ptr, out_ptr, rows0, seq0, H, stride_xb0, stride_xs0, stride_fb0,
                         stride_fs0, stride_ob, stride_os, 0, eps0, inv_scale, HALF, BLOCK_HALF, HAS_WEIGHT0,
                         ROUND_BEFORE_WEIGHT, BLOCK_ROWS, FP8_OUT)
        else:
            _stream_rows(pid - blocks0, x1_ptr, w1_ptr, f1_ptr, out_ptr, rows1, seq1, H, stride_xb1, stride_xs1,
                         stride_fb1, stride_fs1, stride_ob, stride_os, seq0, eps1, inv_scale, HALF, BLOCK_HALF,
                         HAS_WEIGHT1, ROUND_BEFORE_WEIGHT, BLOCK_ROWS, FP8_OUT)


def _freqs_bsd2(freqs: torch.Tensor, batch: int) -> torch.Tensor:
    """(cos, sin) pairs [B, S, D/2, 2] from pairs [S, D/2, 2] (shared by the batch) or [B, S, D/2, 2]."""
    return freqs.unsqueeze(0).expand(batch, *freqs.shape) if freqs.dim() == 3 else freqs


def qk_norm_rope_reference(x: torch.Tensor, weight: torch.Tensor | None, eps: float, freqs: torch.Tensor,
                           round_before_weight: bool = True) -> torch.Tensor:
    """x [B, S, H, D] through diffusers' RMSNorm arithmetic (eager; round_before_weight=False: torch's
    RMSNorm), then rotated by freqs, float32 (cos, sin) pairs [S, D/2, 2] or [B, S, D/2, 2]
    (qdit.models.rotary)."""
    from qdit.models.rotary import rotate_by_cos_sin

    variance = x.float().pow(2).mean(-1, keepdim=True)
    if round_before_weight or weight is None:
        y = (x * torch.rsqrt(variance + eps)).to(x.dtype)
        if weight is not None:
            y = y * weight.to(x.dtype)
    else:
        y = (x.float() * torch.rsqrt(variance + eps) * weight.float()).to(x.dtype)
    return rotate_by_cos_sin(y, _freqs_bsd2(freqs, x.shape[0]).unsqueeze(2))


def qk_fp8_bound_factor(head_dim: int) -> float:
    """scale = max|w| * this: sqrt(D) with the 2^-6 margin of the module docstring, over 448."""
    return math.sqrt(head_dim) * (1 + 2**-6) / E4M3_MAX


def qk_fp8_scale(weights: list[torch.Tensor | None], head_dim: int) -> torch.Tensor:
    """The per-tensor FP8 scale [1, 1, 1, 1] (float32) of queries or keys normalized by these RMSNorm
    weights (None: no weight, i.e. ones), fixed by the weights alone (module docstring)."""
    wmax = torch.stack([w.detach().abs().amax().float() if w is not None else torch.ones((), device=_device(weights))
                        for w in weights]).amax()
    scale = wmax * qk_fp8_bound_factor(head_dim)
    return torch.where(wmax > 0, scale, torch.ones_like(scale)).reshape(1, 1, 1, 1)


def quantize_by_reciprocal(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """e4m3_sat(x * (1 / scale)): the kernel's rounding (a product with the correctly rounded reciprocal
    can differ from x / scale in the last bit of float32, and so, rarely, by one E4M3 step)."""
    return to_e4m3(x.float() * scale.float().reciprocal())


def _device(weights: list[torch.Tensor | None]) -> torch.device:
    return next((w.device for w in weights if w is not None), torch.device("cpu"))


def _bound_weights(weights: list[torch.Tensor | None]) -> list[torch.Tensor]:
    """The distinct norm weights the FP8 scale is bounded by (the kernel takes two: Qwen-Image's text
    and image norms)."""
    bound = list(dict.fromkeys(w for w in weights if w is not None))
    if len(bound) > 2:
        raise ValueError(f"qk_norm_rope_cat_fp8 takes at most 2 distinct norm weights, got {len(bound)}")
    return bound


QK_BLOCK_ROWS = 16  # rows (token, head) per program


class _StreamArgs(NamedTuple):
    """One stream's kernel arguments, in the kernel's order."""
    x: torch.Tensor
    weight: torch.Tensor | None
    freqs: torch.Tensor
    rows: int
    seq: int
    stride_xb: int
    stride_xs: int
    stride_fb: int
    stride_fs: int
    eps: float


def _check_stream_count(xs: list[torch.Tensor]) -> None:
    """The kernel takes one or two streams; refused on every device alike."""
    if not 1 <= len(xs) <= 2:
        raise ValueError(f"qk_norm_rope_cat takes one or two streams (text and image), got {len(xs)}")


def _launch(xs, weights, eps, freqs, out, round_before_weight: bool, fp8_args: dict | None = None) -> None:
    """One kernel for the one or two streams, each writing its rows into `out` at its offset along S.
    FP8 output: fp8_args (qk_norm_rope_cat_fp8's kernel arguments); program 0 writes the scale."""
    b, _, h, d = xs[0].shape
    streams = []
    for x, w, e, f in zip(xs, weights, eps, freqs):
        f = _freqs_bsd2(f, b)
        if x.stride(3) != 1 or x.stride(2) != d or f.stride(3) != 1 or f.stride(2) != 2:
            raise ValueError(f"qk_norm_rope_cat wants heads of contiguous values and contiguous (cos, sin) pairs; "
                             f"got x strides {x.stride()}, freqs strides {f.stride()}")
        streams.append(_StreamArgs(x, w, f, b * x.shape[1] * h, x.shape[1], x.stride(0), x.stride(1), f.stride(0),
                                   f.stride(1), e))
    first = streams[0]
    second = streams[1] if len(streams) == 2 else first._replace(rows=0)  # no rows: its branch never runs
    blocks0 = triton.cdiv(first.rows, QK_BLOCK_ROWS)
    grid = (blocks0 + triton.cdiv(second.rows, QK_BLOCK_ROWS),)
    _qk_norm_rope_kernel[grid](*first, *second, blocks0, out, h, out.stride(0), out.stride(1), HALF=d // 2,
                               BLOCK_HALF=triton.next_power_of_2(d // 2), HAS_WEIGHT0=first.weight is not None,
                               HAS_WEIGHT1=second.weight is not None, ROUND_BEFORE_WEIGHT=round_before_weight,
                               BLOCK_ROWS=QK_BLOCK_ROWS, num_warps=4, enable_fp_fusion=False, **(fp8_args or {}))


def _joint_shape(xs: list[torch.Tensor]) -> tuple[int, int, int, int]:
    b, _, h, d = xs[0].shape
    return b, sum(x.shape[1] for x in xs), h, d


@torch.library.custom_op("qdit::qk_norm_rope_cat", mutates_args=())
def qk_norm_rope_cat(xs: list[torch.Tensor], weights: list[torch.Tensor | None], eps: list[float],
                     freqs: list[torch.Tensor], round_before_weight: bool = True) -> torch.Tensor:
    """Streams xs[i] [B, S_i, H, D] normalized with (weights[i], eps[i]), rotated by freqs[i] (float32 (cos,
    sin) pairs [S_i, D/2, 2] or [B, S_i, D/2, 2]), concatenated along S. round_before_weight: diffusers'
    RMSNorm rounding (True) or torch's (False), module docstring."""
    _check_stream_count(xs)
    if not xs[0].is_cuda or triton is None:
        return torch.cat([qk_norm_rope_reference(x, w, e, f, round_before_weight)
                          for x, w, e, f in zip(xs, weights, eps, freqs)], dim=1)
    out = torch.empty(_joint_shape(xs), dtype=xs[0].dtype, device=xs[0].device)
    _launch(xs, weights, eps, freqs, out, round_before_weight)
    return out


@qk_norm_rope_cat.register_fake
def _(xs, weights, eps, freqs, round_before_weight=True):
    return xs[0].new_empty(_joint_shape(xs))


@torch.library.custom_op("qdit::qk_norm_rope_cat_fp8", mutates_args=())
def qk_norm_rope_cat_fp8(xs: list[torch.Tensor], weights: list[torch.Tensor | None], eps: list[float],
                         freqs: list[torch.Tensor], round_before_weight: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """qk_norm_rope_cat's result as E4M3 codes [B, S, H, D] and their float32 scale [1, 1, 1, 1]
    (qk_fp8_scale of the weights): the codes are e4m3_sat(qk_norm_rope_cat(...) * (1 / scale))."""
    d = xs[0].shape[-1]
    bound = _bound_weights(weights)  # the same limits on every device
    _check_stream_count(xs)
    # program 0 writes the scale: with no rows there is none
    if not xs[0].is_cuda or triton is None or not any(x.numel() for x in xs):
        scale = qk_fp8_scale(weights, d)
        return quantize_by_reciprocal(qk_norm_rope_cat(xs, weights, eps, freqs, round_before_weight), scale), scale
    out = torch.empty(_joint_shape(xs), dtype=torch.float8_e4m3fn, device=xs[0].device)
    scale = torch.empty((1, 1, 1, 1), dtype=torch.float32, device=xs[0].device)
    fp8_args = dict(FP8_OUT=True, scale_ptr=scale, bound_w0_ptr=bound[0] if bound else None,
                    bound_w1_ptr=bound[1] if len(bound) > 1 else None, bound_factor=qk_fp8_bound_factor(d),
                    BOUND_WEIGHTS=len(bound), BOUND_HAS_ONE=any(w is None for w in weights))
    _launch(xs, weights, eps, freqs, out, round_before_weight, fp8_args)
    return out, scale


@qk_norm_rope_cat_fp8.register_fake
def _(xs, weights, eps, freqs, round_before_weight=True):
    return (xs[0].new_empty(_joint_shape(xs), dtype=torch.float8_e4m3fn),
            xs[0].new_empty((1, 1, 1, 1), dtype=torch.float32))
