"""Keeping stored quantized tensors as they are when a module is moved or cast.

`module.to(torch.bfloat16)` (what `pipe.to(dtype)` does to every component) casts every floating
buffer, and torch counts float8 and the float32 scales as floating: a cast would destroy them. While
`Module._apply` runs, such buffers are shown to it as integer views of the same bytes, so device
moves apply and dtype casts pass them by.
"""

from __future__ import annotations

import torch

_CARRIER_BY_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def apply_keeping_dtypes(module: torch.nn.Module, apply, fn, recurse: bool, names) -> None:
    """Run `apply(fn, recurse)` (the base class's _apply) with the buffers `names` seen as integers."""
    originals = {name: module._buffers[name] for name in names if module._buffers.get(name) is not None}
    carriers = {name: _CARRIER_BY_SIZE[t.element_size()] for name, t in originals.items()}
    for name, carrier in carriers.items():
        module._buffers[name] = originals[name].view(carrier)
    try:
        apply(fn, recurse)
    finally:
        for name, carrier in carriers.items():
            applied = module._buffers[name]
            if applied.dtype == carrier:
                module._buffers[name] = applied.view(originals[name].dtype)
            else:  # fn converted integer tensors too (Module.type()): keep the values, follow the device
                module._buffers[name] = originals[name].to(device=applied.device)


def _storages(t: torch.Tensor) -> list:
    """The storages behind a tensor; a wrapper subclass (torchao's FP8 weights) by the tensors it holds,
    not by its logical dtype."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return [s for name in names for s in _storages(getattr(t, name))]
    return [t.untyped_storage()] if t.numel() else []


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers, each storage once: tied parameters and tensors that are
    views of another (the layers of a fused projection, qdit.quant.shared_input) are not counted twice."""
    storages = {s.data_ptr(): s.nbytes() for t in (*model.parameters(), *model.buffers()) for s in _storages(t)}
    return sum(storages.values())
