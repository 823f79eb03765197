"""Rotary position embeddings in real arithmetic, and attention processors that use them.

diffusers' Qwen-Image and Z-Image processors rotate queries and keys by a complex multiply. Inductor
generates no code for complex tensors, so under torch.compile each rotation stays a separate ATen
kernel that reads and writes q or k in float32 (four per Qwen-Image block: about 4 ms of a 1024²
step on an H200). Written on (real, imaginary) pairs, the same float32 products fuse into the QK-norm
kernel. The processors are installed per model instance through diffusers' set_attn_processor;
diffusers' classes are not modified.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn


def rotate_pairs(x: torch.Tensor, freqs_cis: torch.Tensor, head_axis: int) -> torch.Tensor:
    """x [B, S, H, D] rotated by freqs_cis (complex [.., S, D/2]; unsqueezed at head_axis to line up with
    x's heads), element pairs (2i, 2i+1) taken as (real, imaginary): what diffusers computes with
    view_as_complex(x) * freqs_cis, in the same float32 arithmetic, returned in x's dtype."""
    f = torch.view_as_real(freqs_cis).unsqueeze(head_axis)  # a view: no kernel, nothing complex left
    cos, sin = f[..., 0], f[..., 1]
    pairs = x.float().unflatten(-1, (-1, 2))
    re, im = pairs[..., 0], pairs[..., 1]
    return torch.stack((re * cos - im * sin, re * sin + im * cos), dim=-1).flatten(-2).to(x.dtype)


class _DispatchedAttention:
    # diffusers' set_attention_backend / parallel configs write these onto every processor that has them.
    _attention_backend = None
    _parallel_config = None

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        out = dispatch_attention_fn(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False,
                                    backend=self._attention_backend, parallel_config=self._parallel_config)
        return out.flatten(2, 3)


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
        streams = []
        for x, (to_q, to_k, to_v, norm_q, norm_k) in (
                (encoder_hidden_states, (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj,
                                         attn.norm_added_q, attn.norm_added_k)),
                (hidden_states, (attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k))):
            q, k, v = (proj(x).unflatten(-1, (-1, head_dim)) for proj in (to_q, to_k, to_v))
            q = norm_q(q) if norm_q is not None else q
            k = norm_k(k) if norm_k is not None else k
            streams.append([q, k, v])
        if image_rotary_emb is not None:
            img_freqs, txt_freqs = image_rotary_emb
            for stream, freqs in zip(streams, (txt_freqs, img_freqs)):
                stream[0], stream[1] = (rotate_pairs(t, freqs, head_axis=1) for t in stream[:2])
        mask = None
        if encoder_hidden_states_mask is not None:
            image_mask = torch.ones(hidden_states.shape[:2], dtype=torch.bool, device=hidden_states.device)
            mask = torch.cat([encoder_hidden_states_mask, image_mask], dim=1)[:, None, None, :]
        q, k, v = (torch.cat(parts, dim=1) for parts in zip(*streams))
        joint = self._attend(q, k, v, mask).to(q.dtype)
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
        q = attn.norm_q(q) if attn.norm_q is not None else q
        k = attn.norm_k(k) if attn.norm_k is not None else k
        if freqs_cis is not None:
            q, k = rotate_pairs(q, freqs_cis, head_axis=2), rotate_pairs(k, freqs_cis, head_axis=2)
        if attention_mask is not None and attention_mask.ndim == 2:
            attention_mask = attention_mask[:, None, None, :]
        out = attn.to_out[0](self._attend(q, k, v, attention_mask).to(q.dtype))
        if len(attn.to_out) > 1:
            out = attn.to_out[1](out)  # dropout
        return out
