"""Kernel backends. Importing this package registers every backend qdit ships."""

from qdit.kernels.fp8_scaled_mm import FP8ScaledMMBackend
from qdit.kernels.nvfp4_hopper import NVFP4HopperBackend
from qdit.kernels.reference import ReferenceBackend
from qdit.kernels.svdquant_hopper import SVDQuantHopperBackend
from qdit.kernels.registry import BackendSelector, backend_by_name, backends, register_backend

register_backend(FP8ScaledMMBackend())
register_backend(NVFP4HopperBackend())
# Written without a GPU at hand in its session: automatic once tests/kernels/test_svdquant_hopper_gpu.py
# has passed on a Hopper GPU (see the README's GPU test record).
register_backend(SVDQuantHopperBackend(), opt_in_reason="its GPU tests have not been run yet; force it with "
                 "backend='svdq-hopper' to try it")
register_backend(ReferenceBackend())

__all__ = ["BackendSelector", "backend_by_name", "backends", "register_backend"]
