"""FLUX.1 (diffusers FluxTransformer2DModel)."""

from __future__ import annotations

from typing import Any

import torch

from qdit.models.base import ModelAdapter
from qdit.models.rotary import FluxAttention

# ModelOpt's FLUX example keeps these in BF16: embedders, modulation of the output norm, the output
# projection and each single block's fused attention-out + MLP-down projection.
_EXCLUDED_SUBSTRINGS = ("time_text_embed", "context_embedder", "x_embedder", "norm_out",
                        "time_guidance_embed", "stream_modulation")


def _excluded(layer_name: str, config: dict[str, Any]) -> bool:
    if layer_name.startswith("proj_out") or layer_name.endswith(".proj_out"):
        return True
    return any(s in layer_name for s in _EXCLUDED_SUBSTRINGS)


def example_inputs(config: dict[str, Any], *, batch: int = 1, height: int = 256, width: int = 256,
                   text_tokens: int = 16, device="cpu", dtype=torch.bfloat16, seed: int = 0) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    h, w = height // 16, width // 16  # VAE /8, then 2x2 latent packing
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    inputs = {
        "hidden_states": torch.randn(batch, h * w, config.get("in_channels", 64), generator=gen).to(device, dtype),
        "encoder_hidden_states": torch.randn(batch, text_tokens, config.get("joint_attention_dim", 4096),
                                             generator=gen).to(device, dtype),
        "pooled_projections": torch.randn(batch, config.get("pooled_projection_dim", 768), generator=gen).to(device, dtype),
        "timestep": torch.full((batch,), 0.5, device=device, dtype=dtype),
        "img_ids": img_ids.reshape(-1, 3).to(device, dtype),
        "txt_ids": torch.zeros(text_tokens, 3, device=device, dtype=dtype),
        "return_dict": False,
    }
    if config.get("guidance_embeds", False):
        inputs["guidance"] = torch.full((batch,), 3.5, device=device, dtype=dtype)
    return inputs


ADAPTER = ModelAdapter(
    name="flux",
    class_name="FluxTransformer2DModel",
    is_excluded_by_default=_excluded,
    tiny_config={
        "patch_size": 1, "in_channels": 64, "num_layers": 1, "num_single_layers": 2,
        "attention_head_dim": 32, "num_attention_heads": 2, "joint_attention_dim": 64,
        "pooled_projection_dim": 32, "guidance_embeds": True, "axes_dims_rope": [8, 12, 12],
    },
    full_config={
        "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38,
        "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
        "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": [16, 56, 56],
    },
    example_inputs=example_inputs,
    pipeline_class="FluxPipeline",
    guidance_argument="guidance_scale",
    bench_text_tokens=512,  # FluxPipeline's max_sequence_length
    block_lists=("transformer_blocks", "single_transformer_blocks"),
    conditioning_linears=r"^((single_)?transformer_blocks\.\d+\.(norm1|norm1_context|norm)\.linear|norm_out\.linear)$",
    attention_processor=FluxAttention,
)
