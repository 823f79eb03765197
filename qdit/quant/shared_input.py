"""Linears that read the same input (an attention's q, k and v projections), computed as one.

Each quantized Linear transforms and quantizes its input itself, so three projections of one input
quantize it three times and launch three GEMMs. After loading, a backend may fuse such a group: its
`fuse_shared_input(layers)` returns a module that transforms and quantizes the input once and multiplies
the concatenated weight in one GEMM, or None and the reason it cannot (then the layers run one by one,
as they would anyway). The fused module is registered on the group's parent under fused_name(names);
the layers' large tensors become views of its tensors, so memory does not grow and each layer still runs
alone. Attention processors ask for a group's outputs through `project`.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Iterable, Sequence

import torch
from torch import nn

from qdit.quant.layer import QuantLinear

log = logging.getLogger("qdit")

FUSED_PREFIX = "qdit_fused_"


def fused_name(names: Sequence[str]) -> str:
    """The attribute under which a group's fused module lives on its parent: qdit_fused_to_q__to_k__to_v."""
    return FUSED_PREFIX + "__".join(names)


def project(parent: nn.Module, names: Sequence[str], x: torch.Tensor) -> list[torch.Tensor]:
    """The outputs of parent's Linears `names` on x: from their fused module where loading made one."""
    fused = parent._modules.get(fused_name(names))
    if fused is not None:
        return fused(x)
    return [getattr(parent, name)(x) for name in names]


def fuse_shared_inputs(parents: Iterable[nn.Module], groups: Sequence[Sequence[str]]) -> Counter:
    """Fuse every group of Linears that read one input, where their backend can.

    groups: the names of the parents' child Linears that read the same input, per group. Returns how many
    groups were fused or left alone, and why, and logs it once."""
    outcome: Counter = Counter()
    for parent in parents:
        for names in groups:
            layers = [parent._modules.get(name) for name in names]
            if any(layer is None for layer in layers):
                continue  # this kind of block has no such group (FLUX single blocks: no text projections)
            if not any(isinstance(layer, QuantLinear) for layer in layers):
                continue  # an unquantized group (a BF16 model, a layer kept in BF16)
            if fused_name(names) in parent._modules:  # modules installed again on the same model
                outcome[f"already fused ({', '.join(names)})"] += 1
                continue
            fused, reason = _fuse(layers)
            if fused is not None:
                parent.add_module(fused_name(names), fused)
                outcome[f"fused ({', '.join(names)})"] += 1
            else:
                outcome[f"not fused: {reason}"] += 1
    if outcome:
        log.info("groups of quantized projections reading one input: %s",
                 "; ".join(f"{n} {what}" for what, n in sorted(outcome.items())))
    return outcome


def _fuse(layers: list[nn.Module]) -> tuple[nn.Module | None, str]:
    if not all(isinstance(layer, QuantLinear) for layer in layers):
        return None, "not all of them are quantized Linears"
    backend = layers[0].backend
    if any(layer.backend is not backend for layer in layers):
        return None, "their kernel backends differ"
    fuse = getattr(backend, "fuse_shared_input", None)
    if fuse is None:
        return None, f"backend {backend.name} computes each layer alone"
    return fuse(layers)
