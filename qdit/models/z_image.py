"""Z-Image / Z-Image-Turbo (diffusers ZImageTransformer2DModel)."""

from __future__ import annotations

from typing import Any

import torch

from qdit.models.base import ModelAdapter
from qdit.models.rotary import ZImageAttention


def _excluded(layer_name: str, config: dict[str, Any]) -> bool:
    # ModelOpt has no Z-Image example recipe; its stock configs quantize every Linear.
    return False


def example_inputs(config: dict[str, Any], *, batch: int = 1, height: int = 256, width: int = 256,
                   text_tokens: int = 16, device="cpu", dtype=torch.bfloat16, seed: int = 0) -> dict[str, Any]:
    """Z-Image takes one [C, F, H, W] latent and one [T, D] caption embedding per batch item."""
    gen = torch.Generator().manual_seed(seed)
    c = config.get("in_channels", 16)
    latents = [torch.randn(c, 1, height // 8, width // 8, generator=gen).to(device, dtype) for _ in range(batch)]
    caps = [torch.randn(text_tokens, config.get("cap_feat_dim", 2560), generator=gen).to(device, dtype)
            for _ in range(batch)]
    return {"x": latents, "t": torch.full((batch,), 0.5, device=device, dtype=dtype), "cap_feats": caps,
            "return_dict": False}


ADAPTER = ModelAdapter(
    name="z-image",
    class_name="ZImageTransformer2DModel",
    is_excluded_by_default=_excluded,
    tiny_config={
        # dim 96 (3 heads of 32) makes the FFN width 256, a multiple of 16 as NVFP4 needs.
        "all_patch_size": [2], "all_f_patch_size": [1], "in_channels": 16, "dim": 96, "n_layers": 2,
        "n_refiner_layers": 1, "n_heads": 3, "n_kv_heads": 3, "norm_eps": 1e-5, "qk_norm": True,
        "cap_feat_dim": 64, "rope_theta": 256.0, "t_scale": 1000.0, "axes_dims": [8, 12, 12],
        "axes_lens": [256, 64, 64],
    },
    full_config={
        "all_patch_size": [2], "all_f_patch_size": [1], "in_channels": 16, "dim": 3840, "n_layers": 30,
        "n_refiner_layers": 2, "n_heads": 30, "n_kv_heads": 30, "norm_eps": 1e-5, "qk_norm": True,
        "cap_feat_dim": 2560, "rope_theta": 256.0, "t_scale": 1000.0, "axes_dims": [32, 48, 48],
        "axes_lens": [1536, 512, 512],
    },
    example_inputs=example_inputs,
    pipeline_class="ZImagePipeline",
    guidance_argument="guidance_scale",
    block_lists=("layers", "noise_refiner", "context_refiner"),
    conditioning_linears=r"(^|\.)adaLN_modulation\.\d+$",
    attention_processor=ZImageAttention,
)
