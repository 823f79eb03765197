"""Kernel backends. Importing this package registers every backend qdit ships."""

from qdit.kernels.fp8_scaled_mm import FP8ScaledMMBackend
from qdit.kernels.nvfp4_hopper import NVFP4HopperBackend
from qdit.kernels.reference import ReferenceBackend
from qdit.kernels.svdquant_hopper import SVDQuantHopperBackend, SVDQuantHopperExactBackend
from qdit.kernels.registry import BackendSelector, backend_by_name, backends, register_backend

register_backend(FP8ScaledMMBackend())
register_backend(NVFP4HopperBackend())
register_backend(SVDQuantHopperBackend())
register_backend(SVDQuantHopperExactBackend())
register_backend(ReferenceBackend())

__all__ = ["BackendSelector", "backend_by_name", "backends", "register_backend"]
