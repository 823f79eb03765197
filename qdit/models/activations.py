"""GELU with the tanh approximation, written for torch.compile.

0.5 * x * (1 + tanh(u)) equals x * sigmoid(2u). Inductor lowers tanh to libdevice's tanhf, which made the
kernel that applies the MLP's GELU and quantizes its output to FP8 compute-bound (Qwen-Image, H200);
sigmoid lowers to one fast exp. qdit puts these modules in place of diffusers' tanh-GELU modules on the
transformers it loads (module instances, as for the Linears; diffusers' classes are not modified).

Where the MLP's output Linear quantizes its input per token, its backend may compute the GELU in that
quantization pass instead (defer_gelu_to_next_linear): otherwise the GELU's output is written in the model
dtype and read back by the quantization, two passes over the MLP's widest activation.
"""

from __future__ import annotations

import logging
from collections import Counter

import torch
from diffusers.models.activations import GELU as DiffusersGELU
from torch import nn

from qdit.quant.layer import QuantLinear

log = logging.getLogger("qdit")

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


class LinearDeferredGELU(nn.Module):
    """In place of a LinearTanhGELU whose GELU the next Linear applies as it quantizes its input
    (QuantLinear.input_gelu): returns `proj`'s output, the pre-activation (without proj's bias where proj
    handed it to the next Linear); `proj` keeps its name."""

    def __init__(self, proj: nn.Module):
        super().__init__()
        self.proj = proj

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden_states)


def defer_gelu_to_next_linear(model: nn.Module) -> Counter:
    """In each diffusers FeedForward whose `net` is [LinearTanhGELU, Dropout(p=0), QuantLinear, ...], let the
    QuantLinear apply the GELU where its backend's `fuse_input_gelu(layer)` agrees. The first Linear's bias
    goes with it where that layer's backend can hand it over (`release_output_bias`): the first GEMM then
    writes its bare product and nothing reads it before the quantization pass. Returns how many MLPs took
    it or not, and why, and logs it once."""
    outcome: Counter = Counter()
    for module in model.modules():
        net = getattr(module, "net", None)
        if not isinstance(net, nn.ModuleList) or len(net) < 3 or not isinstance(net[0], LinearTanhGELU):
            continue
        dropout, out = net[1], net[2]
        if not isinstance(out, QuantLinear):
            continue  # an MLP kept in BF16
        if not (isinstance(dropout, nn.Dropout) and dropout.p == 0):
            outcome[f"GELU not deferred: net.1 is {dropout!r}, not a Dropout(p=0)"] += 1
            continue
        fuse = getattr(out.backend, "fuse_input_gelu", None)
        verdict = fuse(out) if fuse is not None else None
        if verdict is None or not verdict.ok:
            reason = verdict.reason if verdict is not None else f"backend {out.backend.name} has no fused GELU input"
            outcome[f"GELU not deferred: {reason}"] += 1
            continue
        proj = net[0].proj
        release = getattr(getattr(proj, "backend", None), "release_output_bias", None)
        bias = release(proj) if isinstance(proj, QuantLinear) and release is not None else None
        net[0] = LinearDeferredGELU(proj)
        out.input_gelu = True
        out.input_gelu_bias = None if bias is None else bias.detach()  # a buffer, never a Parameter of out
        with_bias = " with the first Linear's bias" if bias is not None else ""
        outcome[f"GELU deferred to the output Linear's input quantization{with_bias}"] += 1
    if outcome:
        log.info("MLPs: %s", "; ".join(f"{n} {what}" for what, n in sorted(outcome.items())))
    return outcome


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
