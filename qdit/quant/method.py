"""A quantization method owns a layer's tensors: which ones exist, how they load, how they are post-processed.

Computation is delegated to the kernel backend chosen for the layer (qdit.kernels).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qdit.errors import CheckpointError
from qdit.quant.scheme import LayerQuant

MODEL_DTYPE = None  # TensorSpec.dtype placeholder: the model's floating dtype; any float on disk is cast


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype | None  # None: the model dtype (cast from any floating dtype on disk)


class LinearMethod:
    """Base: subclasses set up `specs` and may override quantize_weight / process_after_loading."""

    # Buffers the method derives at load time; never in a checkpoint and allowed by the strict check.
    derived_buffers: tuple[str, ...] = ()

    def __init__(self, layer_quant: LayerQuant, in_features: int, out_features: int, bias: bool):
        self.layer_quant = layer_quant
        self.in_features = in_features
        self.out_features = out_features
        self.has_bias = bias
        self.specs: dict[str, TensorSpec] = self.tensor_specs()

    def tensor_specs(self) -> dict[str, TensorSpec]:
        raise NotImplementedError

    def check(self, layer_name: str, name: str, tensor: torch.Tensor, *, source: str) -> None:
        """Raise a CheckpointError unless `tensor` fits the spec of `name`."""
        spec = self.specs.get(name)
        full = f"{layer_name}.{name}"
        if spec is None:
            raise CheckpointError(
                "checkpoint has a tensor this layer's scheme does not use", file=source, tensor=full,
                layer=f"{layer_name} ({self.layer_quant.describe()})",
                expected=", ".join(self.specs) or "no tensors", found=name,
                hint="the checkpoint's quantization_config does not match its tensors; re-export it")
        if tuple(tensor.shape) != spec.shape:
            raise CheckpointError(
                "tensor has the wrong shape", file=source, tensor=full,
                layer=f"{layer_name} ({self.layer_quant.describe()})",
                expected=str(list(spec.shape)), found=str(list(tensor.shape)),
                hint="the checkpoint does not match its config.json; re-export or re-download it")
        if spec.dtype is None:
            ok = tensor.dtype.is_floating_point and tensor.dtype.itemsize >= 2
            expected = "a 16/32-bit floating dtype"
        else:
            ok = tensor.dtype == spec.dtype
            expected = str(spec.dtype)
        if not ok:
            raise CheckpointError(
                "tensor has the wrong dtype", file=source, tensor=full,
                layer=f"{layer_name} ({self.layer_quant.describe()})", expected=expected, found=str(tensor.dtype),
                hint="the checkpoint's quantization_config does not match its tensors; re-export it")

    def quantize_weight(self, layer: torch.nn.Module, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """Tensors of this scheme made from a full-precision weight (load-time quantization)."""
        raise NotImplementedError(f"{type(self).__name__} cannot quantize a weight")

    def dequantize(self, layer: torch.nn.Module) -> torch.Tensor:
        """The stored weight as float32 [N, K] (smoothing and any low-rank branch not folded in)."""
        raise NotImplementedError

    def process_after_loading(self, layer: torch.nn.Module) -> dict[str, int]:
        """Called once every tensor is loaded. Returns counts of repairs made (for one summary warning)."""
        return {}
