"""GELU with the tanh approximation, written for torch.compile.

0.5 * x * (1 + tanh(u)) equals x * sigmoid(2u). Inductor lowers tanh to libdevice's tanhf, which made the
kernel that applies the MLP's GELU and quantizes its output to FP8 compute-bound (Qwen-Image, H200);
sigmoid lowers to one fast exp. qdit puts these modules in place of diffusers' tanh-GELU modules on the
transformers it loads (module instances, as for the Linears; diffusers' classes are not modified).
"""

from __future__ import annotations

import torch
from diffusers.models.activations import GELU as DiffusersGELU
from torch import nn

SQRT_2_OVER_PI = 0.7978845608028654


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """F.gelu(x, approximate="tanh"), computed in float32 and rounded once to x's dtype."""
    xf = x.float()
    return (xf * torch.sigmoid((2 * SQRT_2_OVER_PI) * (xf + 0.044715 * xf * xf * xf))).to(x.dtype)


class TanhGELU(nn.Module):
    """In place of nn.GELU(approximate="tanh")."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu_tanh(x)


class LinearTanhGELU(nn.Module):
    """In place of diffusers' GELU(approximate="tanh"), a Linear `proj` then the activation; the same
    `proj` module is kept, so parameter names do not change."""

    def __init__(self, proj: nn.Module):
        super().__init__()
        self.proj = proj

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return gelu_tanh(self.proj(hidden_states))


def install_tanh_gelu(model: nn.Module) -> int:
    """Replace the model's tanh-GELU modules; returns how many were replaced."""
    swaps = []
    for name, module in model.named_modules():
        if isinstance(module, DiffusersGELU) and module.approximate == "tanh":
            swaps.append((name, LinearTanhGELU(module.proj)))
        elif isinstance(module, nn.GELU) and module.approximate == "tanh":
            swaps.append((name, TanhGELU()))
    for name, new in swaps:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return len(swaps)
