"""Attention processors for Qwen-Image and Z-Image that compile well, and rotary embeddings in real
arithmetic.

diffusers' processors rotate queries and keys by a complex multiply, which inductor cannot generate
code for: each rotation stayed a separate ATen kernel, and norm, rotation and the text+image concat
wrote and re-read float32 copies of q and k. These processors compute the same thing with
qdit::qk_norm_rope_cat (one pass per q or k on CUDA, qdit.kernels.qk_norm_rope) and call diffusers'
attention dispatch as diffusers does. They are installed per model instance through diffusers'
set_processor; diffusers' classes are not modified.
"""

from __future__ import annotations

import logging

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.normalization import RMSNorm

from qdit.kernels.attention_fp8 import fp8_attention_of_codes, quantize_per_tensor
from qdit.kernels.qk_norm_rope import qk_norm_rope_cat, qk_norm_rope_cat_fp8

log = logging.getLogger("qdit")


def rotate_pairs(x: torch.Tensor, freqs_cis: torch.Tensor, head_axis: int) -> torch.Tensor:
    """x [B, S, H, D] rotated by freqs_cis (complex [.., S, D/2]; unsqueezed at head_axis to line up with
    x's heads), element pairs (2i, 2i+1) taken as (real, imaginary): what diffusers computes with
    view_as_complex(x) * freqs_cis, in the same float32 arithmetic, returned in x's dtype."""
    # view_as_real is a view: no kernel, nothing complex left for inductor
    return rotate_by_cos_sin(x, torch.view_as_real(freqs_cis).unsqueeze(head_axis))


def rotate_by_cos_sin(x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """rotate_pairs with the rotation given as float32 (cos, sin) pairs [..., D/2, 2] that broadcast
    against x [..., D] viewed as pairs."""
    cos, sin = cos_sin[..., 0], cos_sin[..., 1]
    pairs = x.float().unflatten(-1, (-1, 2))
    re, im = pairs[..., 0], pairs[..., 1]
    return torch.stack((re * cos - im * sin, re * sin + im * cos), dim=-1).flatten(-2).to(x.dtype)


def normalize_rotate_concat(streams: list[torch.Tensor], norms: list, freqs: list[torch.Tensor] | None) -> torch.Tensor:
    """Queries or keys of the streams ([B, S_i, H, D] each): each through its QK norm, rotated by its
    freqs, concatenated along the sequence. With RMSNorms (what the published models use) this is one
    op, qdit::qk_norm_rope_cat, fused on CUDA; any other norm takes diffusers' modules and rotate_pairs."""
    if _fused(norms, freqs):
        return qk_norm_rope_cat(streams, [n.weight for n in norms], [float(n.eps) for n in norms],
                                [torch.view_as_real(f) for f in freqs])
    streams = [n(x) if n is not None else x for x, n in zip(streams, norms)]
    if freqs is not None:
        streams = [rotate_pairs(x, f, head_axis=1 if f.dim() == 2 else 2) for x, f in zip(streams, freqs)]
    return torch.cat(streams, dim=1) if len(streams) > 1 else streams[0]


def normalize_rotate_concat_fp8(streams: list[torch.Tensor], norms: list,
                                freqs: list[torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """normalize_rotate_concat as E4M3 codes and their per-tensor scale, for FP8 attention. With RMSNorms
    the fused op writes the codes directly, its scale fixed by the norm weights (no amax pass); other
    norms take the unfused result and its amax."""
    if _fused(norms, freqs):
        return qk_norm_rope_cat_fp8(streams, [n.weight for n in norms], [float(n.eps) for n in norms],
                                    [torch.view_as_real(f) for f in freqs])
    return quantize_per_tensor(normalize_rotate_concat(streams, norms, freqs).contiguous())


def _fused(norms: list, freqs: list[torch.Tensor] | None) -> bool:
    return freqs is not None and all(isinstance(n, RMSNorm) and n.bias is None for n in norms)


class _DispatchedAttention:
    # diffusers' set_attention_backend / parallel configs write these onto every processor that has them.
    _attention_backend = None
    _parallel_config = None

    def __init__(self, fp8: bool = False):
        # fp8: attention in FP8 (qdit.kernels.attention_fp8) for calls without a mask. Said here, once per
        # model, not when a masked call comes: a log call inside a compiled block would break its graph.
        self.fp8 = fp8
        if fp8:
            log.warning("FP8 attention: calls with an attention mask (padded prompts) use diffusers' BF16 "
                        "attention; cuDNN's FP8 kernel takes no key mask here")

    def _attend(self, q_streams: list[torch.Tensor], k_streams: list[torch.Tensor], q_norms: list, k_norms: list,
                freqs: list[torch.Tensor] | None, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Attention of the streams' queries and keys (each through its norm and rotary, concatenated
        along S) over v [B, S, H, D]; returns [B, S, H * D] in v's dtype."""
        if self.fp8 and mask is None:
            q8, scale_q = normalize_rotate_concat_fp8(q_streams, q_norms, freqs)
            k8, scale_k = normalize_rotate_concat_fp8(k_streams, k_norms, freqs)
            return fp8_attention_of_codes(q8, scale_q, k8, scale_k, v).flatten(2, 3)
        q = normalize_rotate_concat(q_streams, q_norms, freqs)
        k = normalize_rotate_concat(k_streams, k_norms, freqs)
        out = dispatch_attention_fn(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False,
                                    backend=self._attention_backend, parallel_config=self._parallel_config)
        return out.flatten(2, 3).to(v.dtype)


class QwenImageJointAttention(_DispatchedAttention):
    """Qwen-Image's joint text+image attention (diffusers' QwenDoubleStreamAttnProcessor2_0 semantics:
    [text, image] order, optional text mask), rotary in real arithmetic."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 encoder_hidden_states_mask: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None):
        if encoder_hidden_states is None or attention_mask is not None:
            raise ValueError("Qwen-Image joint attention takes the text stream, and a text mask through "
                             "encoder_hidden_states_mask rather than attention_mask")
        head_dim = attn.inner_dim // attn.heads
        txt = [proj(encoder_hidden_states).unflatten(-1, (-1, head_dim))
               for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)]
        img = [proj(hidden_states).unflatten(-1, (-1, head_dim)) for proj in (attn.to_q, attn.to_k, attn.to_v)]
        freqs = None
        if image_rotary_emb is not None:
            img_freqs, txt_freqs = image_rotary_emb
            freqs = [txt_freqs, img_freqs]
        v = torch.cat([txt[2], img[2]], dim=1)
        mask = None
        if encoder_hidden_states_mask is not None:
            image_mask = torch.ones(hidden_states.shape[:2], dtype=torch.bool, device=hidden_states.device)
            mask = torch.cat([encoder_hidden_states_mask, image_mask], dim=1)[:, None, None, :]
        joint = self._attend([txt[0], img[0]], [txt[1], img[1]], [attn.norm_added_q, attn.norm_q],
                             [attn.norm_added_k, attn.norm_k], freqs, v, mask)
        seq_txt = encoder_hidden_states.shape[1]
        img_out = attn.to_out[0](joint[:, seq_txt:].contiguous())
        if len(attn.to_out) > 1:
            img_out = attn.to_out[1](img_out)  # dropout
        return img_out, attn.to_add_out(joint[:, :seq_txt].contiguous())


class ZImageAttention(_DispatchedAttention):
    """Z-Image's single-stream attention (diffusers' ZSingleStreamAttnProcessor semantics), rotary in
    real arithmetic."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, freqs_cis: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = (proj(hidden_states).unflatten(-1, (attn.heads, -1)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        freqs = None if freqs_cis is None else [freqs_cis]
        if attention_mask is not None and attention_mask.ndim == 2:
            attention_mask = attention_mask[:, None, None, :]
        out = attn.to_out[0](self._attend([q], [k], [attn.norm_q], [attn.norm_k], freqs, v, attention_mask))
        if len(attn.to_out) > 1:
            out = attn.to_out[1](out)  # dropout
        return out
