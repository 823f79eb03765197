"""Attention processors for Qwen-Image, Z-Image and FLUX that compile well, and rotary embeddings in
real arithmetic.

diffusers' Qwen-Image and Z-Image processors rotate queries and keys by a complex multiply, which
inductor cannot generate code for: each rotation stayed a separate ATen kernel, and norm, rotation and
the text+image concat wrote and re-read float32 copies of q and k (FLUX's processor rotates in real
arithmetic, but its norm, rotation and concat are separate passes too). These processors compute the
same thing with qdit::qk_norm_rope_cat (one pass per q or k on CUDA, qdit.kernels.qk_norm_rope), can
run attention in FP8, and call diffusers' attention dispatch as diffusers does. They are installed per
model instance through diffusers' set_processor; diffusers' classes are not modified.

Rotations are passed as float32 (cos, sin) pairs [S, D/2, 2] (shared by the batch) or [B, S, D/2, 2].
"""

from __future__ import annotations

import logging

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.normalization import RMSNorm
from diffusers.models.transformers.transformer_flux import FluxPosEmbed

from qdit.errors import QditError
from qdit.kernels.attention_fp8 import fp8_attention_codes, quantize_per_tensor
from qdit.kernels.qk_norm_rope import qk_norm_rope_cat, qk_norm_rope_cat_fp8
from qdit.quant.fp8_input import FP8Activation, linear, take_rows
from qdit.quant.shared_input import project

log = logging.getLogger("qdit")

IMAGE_QKV = ("to_q", "to_k", "to_v")
TEXT_QKV = ("add_q_proj", "add_k_proj", "add_v_proj")


def rotate_by_cos_sin(x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """x [..., D] with element pairs (2i, 2i+1) taken as (real, imaginary), rotated by float32 (cos, sin)
    pairs [..., D/2, 2] that broadcast against x viewed as pairs: what diffusers computes with
    view_as_complex(x) * freqs_cis (cos_sin = view_as_real(freqs_cis), a view with nothing complex left
    for inductor), in the same float32 arithmetic, returned in x's dtype."""
    cos, sin = cos_sin[..., 0], cos_sin[..., 1]
    pairs = x.float().unflatten(-1, (-1, 2))
    re, im = pairs[..., 0], pairs[..., 1]
    return torch.stack((re * cos - im * sin, re * sin + im * cos), dim=-1).flatten(-2).to(x.dtype)


def normalize_rotate_concat(streams: list[torch.Tensor], norms: list, pairs: list[torch.Tensor] | None) -> torch.Tensor:
    """Queries or keys of the streams ([B, S_i, H, D] each): each through its QK norm, rotated by its
    (cos, sin) pairs, concatenated along the sequence. With RMSNorms (what the published models use)
    this is one op, qdit::qk_norm_rope_cat, fused on CUDA; any other norm takes diffusers' modules and
    rotate_by_cos_sin."""
    if _fused(norms, pairs):
        return qk_norm_rope_cat(streams, *_norm_arguments(streams, norms), pairs,
                                round_before_weight=_rounds_before_weight(norms))
    streams = [n(x) if n is not None else x for x, n in zip(streams, norms)]
    if pairs is not None:
        streams = [rotate_by_cos_sin(x, p.unsqueeze(1 if p.dim() == 3 else 2)) for x, p in zip(streams, pairs)]
    return torch.cat(streams, dim=1) if len(streams) > 1 else streams[0]


def normalize_rotate_concat_fp8(streams: list[torch.Tensor], norms: list,
                                pairs: list[torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """normalize_rotate_concat as E4M3 codes and their per-tensor scale, for FP8 attention. With RMSNorms
    the fused op writes the codes directly, its scale fixed by the norm weights (no amax pass); other
    norms take the unfused result and its amax."""
    if _fused(norms, pairs):
        return qk_norm_rope_cat_fp8(streams, *_norm_arguments(streams, norms), pairs,
                                    round_before_weight=_rounds_before_weight(norms))
    return quantize_per_tensor(normalize_rotate_concat(streams, norms, pairs).contiguous())


def _fused(norms: list, pairs: list[torch.Tensor] | None) -> bool:
    """The fused op computes RMSNorms without a bias, all of diffusers' class or all of torch's (the two
    round differently: qdit.kernels.qk_norm_rope)."""
    if pairs is None:
        return False
    return (all(isinstance(n, RMSNorm) and n.bias is None for n in norms)
            or all(isinstance(n, torch.nn.RMSNorm) for n in norms))


def _rounds_before_weight(norms: list) -> bool:
    return not isinstance(norms[0], torch.nn.RMSNorm)


def _norm_arguments(streams: list[torch.Tensor], norms: list) -> tuple[list, list[float]]:
    """(weights, eps) of the norms. torch's RMSNorm with eps=None takes the epsilon of the dtype it computes
    in (float32 for bf16 input), not of its input's dtype as its docs say."""
    eps = [float(n.eps) if n.eps is not None else torch.finfo(torch.promote_types(x.dtype, torch.float32)).eps
           for x, n in zip(streams, norms)]
    return [n.weight for n in norms], eps


class _DispatchedAttention:
    # diffusers' set_attention_backend / parallel configs write these onto every processor that has them.
    _attention_backend = None
    _parallel_config = None
    # The Attention module's projections that read one input (qdit.quant.shared_input), per group.
    shared_input_groups: tuple[tuple[str, ...], ...] = (IMAGE_QKV,)

    def __init__(self, fp8: bool = False):
        # fp8: attention in FP8 (qdit.kernels.attention_fp8) for calls without a mask. Said here, once per
        # model, not when a masked call comes: a log call inside a compiled block would break its graph.
        self.fp8 = fp8
        if fp8:
            log.warning("FP8 attention: calls with an attention mask (padded prompts) use diffusers' BF16 "
                        "attention; cuDNN's FP8 kernel takes no key mask here")

    @classmethod
    def check_model(cls, model: torch.nn.Module) -> None:
        """Refuse a model whose inputs to the processor are not what it assumes (before it is installed)."""

    def _attend(self, q_streams: list[torch.Tensor], k_streams: list[torch.Tensor], q_norms: list, k_norms: list,
                pairs: list[torch.Tensor] | None, v: torch.Tensor, mask: torch.Tensor | None,
                ) -> torch.Tensor | FP8Activation:
        """Attention of the streams' queries and keys (each through its norm and rotated by its (cos, sin)
        pairs, concatenated along S) over v [B, S, H, D]; returns [B, S, H * D] in v's dtype, or in FP8
        the kernel's E4M3 codes with their scale, for the output projections (qdit.quant.fp8_input.linear)."""
        if self.fp8 and mask is None:
            q8, scale_q = normalize_rotate_concat_fp8(q_streams, q_norms, pairs)
            k8, scale_k = normalize_rotate_concat_fp8(k_streams, k_norms, pairs)
            codes, scale_v = fp8_attention_codes(q8, scale_q, k8, scale_k, v)
            return FP8Activation(codes.flatten(2, 3), scale_v, v.dtype)
        q = normalize_rotate_concat(q_streams, q_norms, pairs)
        k = normalize_rotate_concat(k_streams, k_norms, pairs)
        out = dispatch_attention_fn(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False,
                                    backend=self._attention_backend, parallel_config=self._parallel_config)
        return out.flatten(2, 3).to(v.dtype)


class QwenImageJointAttention(_DispatchedAttention):
    """Qwen-Image's joint text+image attention (diffusers' QwenDoubleStreamAttnProcessor2_0 semantics:
    [text, image] order, optional text mask), rotary in real arithmetic."""

    shared_input_groups = (IMAGE_QKV, TEXT_QKV)

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 encoder_hidden_states_mask: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None):
        if encoder_hidden_states is None or attention_mask is not None:
            raise ValueError("Qwen-Image joint attention takes the text stream, and a text mask through "
                             "encoder_hidden_states_mask rather than attention_mask")
        head_dim = attn.inner_dim // attn.heads
        txt = [t.unflatten(-1, (-1, head_dim)) for t in project(attn, TEXT_QKV, encoder_hidden_states)]
        img = [t.unflatten(-1, (-1, head_dim)) for t in project(attn, IMAGE_QKV, hidden_states)]
        pairs = None
        if image_rotary_emb is not None:
            img_freqs, txt_freqs = image_rotary_emb  # complex [S, D/2]; view_as_real is a view, no kernel
            pairs = [torch.view_as_real(txt_freqs), torch.view_as_real(img_freqs)]
        v = torch.cat([txt[2], img[2]], dim=1)
        mask = None
        if encoder_hidden_states_mask is not None:
            image_mask = torch.ones(hidden_states.shape[:2], dtype=torch.bool, device=hidden_states.device)
            mask = torch.cat([encoder_hidden_states_mask, image_mask], dim=1)[:, None, None, :]
        joint = self._attend([txt[0], img[0]], [txt[1], img[1]], [attn.norm_added_q, attn.norm_q],
                             [attn.norm_added_k, attn.norm_k], pairs, v, mask)
        seq_txt = encoder_hidden_states.shape[1]
        img_out = linear(attn.to_out[0], take_rows(joint, seq_txt, None))
        if len(attn.to_out) > 1:
            img_out = attn.to_out[1](img_out)  # dropout
        return img_out, linear(attn.to_add_out, take_rows(joint, 0, seq_txt))


class ZImageAttention(_DispatchedAttention):
    """Z-Image's single-stream attention (diffusers' ZSingleStreamAttnProcessor semantics), rotary in
    real arithmetic."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, freqs_cis: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = (t.unflatten(-1, (attn.heads, -1)) for t in project(attn, IMAGE_QKV, hidden_states))
        pairs = None if freqs_cis is None else [torch.view_as_real(freqs_cis)]
        if attention_mask is not None and attention_mask.ndim == 2:
            attention_mask = attention_mask[:, None, None, :]
        out = linear(attn.to_out[0], self._attend([q], [k], [attn.norm_q], [attn.norm_k], pairs, v, attention_mask))
        if len(attn.to_out) > 1:
            out = attn.to_out[1](out)  # dropout
        return out


class FluxAttention(_DispatchedAttention):
    """FLUX.1's attention (diffusers' FluxAttnProcessor semantics). Double-stream blocks pass the text
    stream: attention over [text, image], each part through its output projection. Single-stream blocks
    pass the joint sequence alone and get the attention back unprojected."""

    shared_input_groups = (IMAGE_QKV, TEXT_QKV)

    @classmethod
    def check_model(cls, model: torch.nn.Module) -> None:
        # The rotation is read from diffusers' FluxPosEmbed, whose cos and sin [S, D] repeat each pair's
        # value twice (repeat_interleave_real): only its even columns are used.
        pos_embed = getattr(model, "pos_embed", None)
        if not isinstance(pos_embed, FluxPosEmbed):
            raise QditError(f"{type(model).__name__}: qdit's FLUX attention processor reads rotary embeddings "
                            f"laid out by diffusers' FluxPosEmbed (cos/sin values repeated per pair); the "
                            f"model's pos_embed is {type(pos_embed).__name__}. Keep diffusers' FluxPosEmbed as "
                            f"the model's pos_embed.")

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None):
        q, k, v = _flux_projections(attn, hidden_states, text=False)
        joint_text = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
        seq_txt = encoder_hidden_states.shape[1] if joint_text else 0
        q_streams, k_streams, q_norms, k_norms = [q], [k], [attn.norm_q], [attn.norm_k]
        if joint_text:
            tq, tk, tv = _flux_projections(attn, encoder_hidden_states, text=True)
            q_streams, k_streams = [tq, q], [tk, k]
            q_norms, k_norms = [attn.norm_added_q, attn.norm_q], [attn.norm_added_k, attn.norm_k]
            v = torch.cat([tv, v], dim=1)
        pairs = None
        if image_rotary_emb is not None:
            # FluxPosEmbed's cos and sin [S, D] repeat each pair's value twice (repeat_interleave_real)
            cos, sin = image_rotary_emb
            if cos.shape[-1] != q.shape[-1]:
                raise ValueError(f"FLUX rotary embedding: cos/sin have {cos.shape[-1]} columns per position, "
                                 f"the attention heads {q.shape[-1]} (FluxPosEmbed's layout has one per channel)")
            joint_pairs = torch.stack((cos[:, 0::2], sin[:, 0::2]), dim=-1).float()
            pairs = [joint_pairs[:seq_txt], joint_pairs[seq_txt:]] if joint_text else [joint_pairs]
        joint = self._attend(q_streams, k_streams, q_norms, k_norms, pairs, v, attention_mask)
        if not joint_text:  # a single-stream block: its caller concatenates the attention with the MLP's input
            return joint.dequantize() if isinstance(joint, FP8Activation) else joint
        img_out = attn.to_out[1](linear(attn.to_out[0], take_rows(joint, seq_txt, None)))  # projection, dropout
        return img_out, linear(attn.to_add_out, take_rows(joint, 0, seq_txt))


def _flux_projections(attn, x: torch.Tensor, text: bool) -> list[torch.Tensor]:
    """q, k, v [B, S, H, D] of the text or image stream, from the fused QKV Linear when diffusers fused them."""
    if attn.fused_projections:
        qkv = (attn.to_added_qkv if text else attn.to_qkv)(x).chunk(3, dim=-1)
    else:
        qkv = project(attn, TEXT_QKV if text else IMAGE_QKV, x)
    return [t.unflatten(-1, (-1, attn.head_dim)) for t in qkv]
