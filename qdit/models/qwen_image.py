"""Qwen-Image (diffusers QwenImageTransformer2DModel)."""

from __future__ import annotations

import re
from typing import Any

import torch

from qdit.models.base import ModelAdapter
from qdit.models.rotary import QwenImageJointAttention

_BLOCK = re.compile(r"^transformer_blocks\.(\d+)\.")


def _excluded(layer_name: str, config: dict[str, Any]) -> bool:
    # ModelOpt's Qwen-Image recipe quantizes only transformer_blocks, minus the first two and last two.
    m = _BLOCK.match(layer_name)
    if m is None:
        return True
    index, depth = int(m.group(1)), int(config.get("num_layers", 60))
    return index < 2 or index >= depth - 2


def example_inputs(config: dict[str, Any], *, batch: int = 1, height: int = 256, width: int = 256,
                   text_tokens: int = 16, device="cpu", dtype=torch.bfloat16, seed: int = 0) -> dict[str, Any]:
    """Inputs of one denoising step: packed latents (VAE /8, patch 2), prompt embeddings, timestep."""
    gen = torch.Generator().manual_seed(seed)
    p = config.get("patch_size", 2)
    h, w = height // 8 // p, width // 8 // p
    hidden = torch.randn(batch, h * w, config.get("in_channels", 64), generator=gen)
    text = torch.randn(batch, text_tokens, config.get("joint_attention_dim", 3584), generator=gen)
    return {
        "hidden_states": hidden.to(device, dtype),
        "encoder_hidden_states": text.to(device, dtype),
        # No mask: every text token is valid (the same as an all-ones mask, and capturable in a CUDA graph).
        "encoder_hidden_states_mask": None,
        "timestep": torch.full((batch,), 0.5, device=device, dtype=dtype),
        "img_shapes": [[(1, h, w)]] * batch,
        "return_dict": False,
    }


ADAPTER = ModelAdapter(
    name="qwen-image",
    class_name="QwenImageTransformer2DModel",
    is_excluded_by_default=_excluded,
    tiny_config={
        "patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 6,
        "attention_head_dim": 32, "num_attention_heads": 2, "joint_attention_dim": 64,
        "axes_dims_rope": [8, 12, 12], "guidance_embeds": False,
    },
    full_config={
        "patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 60,
        "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 3584,
        "axes_dims_rope": [16, 56, 56], "guidance_embeds": False,
    },
    example_inputs=example_inputs,
    pipeline_class="QwenImagePipeline",
    guidance_argument="true_cfg_scale",
    block_lists=("transformer_blocks",),
    conditioning_linears=r"^(transformer_blocks\.\d+\.(img_mod|txt_mod)\.1|norm_out\.linear)$",
    attention_processor=QwenImageJointAttention,
)
