"""The kernel-backend registry: which backend computes a quantized layer on this device.

Each backend says whether it runs on a device and whether it implements a layer's scheme, with a
reason when it refuses. Backends are tried in registration order; the reference backend is last; a backend marked
`forced_only` (an exact-but-slower variant) is used only when asked for by name.
The choice can be forced (load_transformer(backend=...), --backend, or QDIT_BACKEND).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Protocol

import torch

from qdit.errors import BackendUnavailableError
from qdit.quant.scheme import LayerQuant

log = logging.getLogger("qdit.kernels")

BACKEND_ENV = "QDIT_BACKEND"


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str = ""


YES = Verdict(True)


class KernelBackend(Protocol):
    name: str
    # A backend with `forced_only = True` is never chosen automatically, only by name.

    def supports_device(self, device: torch.device) -> Verdict: ...

    def can_implement(self, layer_quant: LayerQuant, in_features: int, out_features: int) -> Verdict: ...

    def prepare(self, layer: torch.nn.Module) -> None:
        """Build the backend's kernel layout of the layer's tensors (once, after loading)."""

    def apply(self, layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor: ...


_BACKENDS: list[KernelBackend] = []


def register_backend(backend: KernelBackend) -> None:
    if any(b.name == backend.name for b in _BACKENDS):
        raise ValueError(f"a kernel backend named {backend.name!r} is already registered")
    _BACKENDS.append(backend)


def backends() -> list[KernelBackend]:
    """Registered backends in the order they are tried: registration order, the reference backend last."""
    return sorted(_BACKENDS, key=lambda b: b.name == "reference")


def backend_by_name(name: str) -> KernelBackend:
    for b in backends():
        if b.name == name:
            return b
    raise BackendUnavailableError(
        f"unknown kernel backend {name!r}; known: {', '.join(b.name for b in backends())}")


class BackendSelector:
    """Chooses a backend per layer for one model load and logs each refusal summary once."""

    def __init__(self, device: torch.device, forced: str | None = None):
        self.device = device
        self.forced = forced if forced is not None else (os.environ.get(BACKEND_ENV) or None)
        self._logged: set[tuple] = set()
        if self.forced is not None:
            backend = backend_by_name(self.forced)
            verdict = backend.supports_device(device)
            if not verdict.ok:
                raise BackendUnavailableError(
                    f"kernel backend {backend.name!r} was requested but cannot run on {device}: {verdict.reason}. "
                    f"Choose another with backend=... / --backend / {BACKEND_ENV}, or leave it unset to choose automatically.")

    def select(self, layer_name: str, layer_quant: LayerQuant, in_features: int, out_features: int) -> KernelBackend:
        if self.forced is not None:
            backend = backend_by_name(self.forced)
            verdict = backend.can_implement(layer_quant, in_features, out_features)
            if not verdict.ok:
                raise BackendUnavailableError(
                    f"kernel backend {backend.name!r} was requested but cannot compute layer {layer_name} "
                    f"({layer_quant.describe()}, {in_features}->{out_features}): {verdict.reason}")
            return backend
        refusals = []
        for backend in backends():
            if getattr(backend, "forced_only", False):
                continue
            verdict = backend.supports_device(self.device)
            if verdict.ok:
                verdict = backend.can_implement(layer_quant, in_features, out_features)
            if verdict.ok:
                if backend.name == "reference" and refusals:
                    key = (layer_quant.describe(), tuple(refusals))
                    if key not in self._logged:
                        self._logged.add(key)
                        # Expected on a CPU; on a GPU it means the slow path was taken, so say it loudly.
                        level = logging.INFO if self.device.type == "cpu" else logging.WARNING
                        log.log(level, "layers with scheme %s run on the reference backend (slow, exact): %s",
                                layer_quant.describe(), "; ".join(refusals))
                return backend
            refusals.append(f"{backend.name}: {verdict.reason}")
        raise BackendUnavailableError(f"no kernel backend computes layer {layer_name}: " + "; ".join(refusals))
