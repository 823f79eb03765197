"""Image similarity against the BF16 images, and memory of a transformer."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

# The weights lpips.LPIPS(net="alex") asks torchvision for (torchvision downloads them when missing,
# which cannot happen here, so their presence is checked first).
_ALEXNET_WEIGHTS = "alexnet-owt-7be5be79.pth"


def psnr(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean PSNR (dB) over the batch of images [N, 3, H, W] in [0, 1]; identical images give inf."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    values = [peak_signal_noise_ratio(a[None], b[None], data_range=1.0) for a, b in zip(images, reference)]
    return float(torch.stack(values).mean())


def ssim(images: torch.Tensor, reference: torch.Tensor) -> float:
    from torchmetrics.functional.image import structural_similarity_index_measure

    return float(structural_similarity_index_measure(images, reference, data_range=1.0))


def lpips_unavailable_reason() -> str | None:
    """None when LPIPS can run offline, else why not (in words for the report)."""
    if importlib.util.find_spec("lpips") is None:
        return "LPIPS not computed: the lpips package is not installed"
    weights = Path(torch.hub.get_dir()) / "checkpoints" / _ALEXNET_WEIGHTS
    if not weights.is_file():
        return f"LPIPS not computed: its AlexNet backbone weights are not available locally ({weights})"
    return None


def lpips(images: torch.Tensor, reference: torch.Tensor) -> float:
    import lpips as lpips_package

    net = lpips_package.LPIPS(net="alex", verbose=False)
    with torch.no_grad():
        return float(net(images * 2 - 1, reference * 2 - 1).mean())


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers as stored (quantized codes and scales included)."""
    tensors = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def forward_activation_bytes(module: torch.nn.Module, args: tuple, kwargs: dict) -> int | None:
    """Peak CUDA memory one forward needs beyond what is already allocated; None off CUDA (the CPU
    allocator keeps no peak statistics)."""
    device = next(module.parameters()).device
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    with torch.no_grad():
        module(*args, **kwargs)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before
