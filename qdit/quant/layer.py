"""QuantLinear: a drop-in for torch.nn.Linear whose tensors and compute follow a quantization scheme."""

from __future__ import annotations

import torch
from torch import nn

from qdit.errors import QditError
from qdit.quant.method import LinearMethod
from qdit.quant.methods import method_for
from qdit.quant.scheme import LayerQuant
from qdit.quant.storage import apply_keeping_dtypes

_STORED_DTYPES = (torch.uint8, torch.float8_e4m3fn, torch.float32)


class QuantLinear(nn.Module):
    """Holds a method's tensors (created on the meta device, filled by the loader) under checkpoint names.

    Tensors in the compute dtype (bias, smoothing vector, low-rank factors) are parameters; quantized
    data and scales are buffers, so diffusers' `model.dtype` (its first floating parameter) stays the
    compute dtype. `layer.weight` is the dequantized weight in the compute dtype, as a Linear's would be
    (diffusers code reads `.weight.dtype` to cast inputs); the stored tensor is `layer.tensor("weight")`.
    `backend` is set once loading is done; forward delegates to it. `expand_fp8_at_load` (set by the
    loader from `weights_4bit="expanded_fp8"`) asks a backend whose route multiplies a 4-bit layer as FP8
    to expand it once in `prepare` and release the packed tensors it no longer reads. `input_gelu` (set by
    qdit.models.activations.defer_gelu_to_next_linear, where the backend agrees) means the input is an MLP's
    pre-activation, and the layer computes linear(gelu_tanh(x + input_gelu_bias)), the backend applying the
    GELU (and the first Linear's bias, where that layer handed it over) as it quantizes the input.
    """

    def __init__(self, name: str, in_features: int, out_features: int, bias: bool, layer_quant: LayerQuant,
                 dtype: torch.dtype):
        super().__init__()
        self.name = name
        self.in_features = in_features
        self.out_features = out_features
        self.layer_quant = layer_quant
        self.compute_dtype = dtype
        self.method: LinearMethod = method_for(layer_quant, in_features, out_features, bias)
        for tname, spec in self.method.specs.items():
            t = torch.empty(spec.shape, dtype=spec.dtype or dtype, device="meta")
            if spec.dtype is None:
                self.register_parameter(tname, nn.Parameter(t, requires_grad=False))
            else:
                self.register_buffer(tname, t)
        if not bias:
            self.register_parameter("bias", None)
        self.backend = None
        self.expand_fp8_at_load = False
        self.input_gelu = False
        self.register_buffer("input_gelu_bias", None, persistent=False)
        self.released: set[str] = set()

    def set_tensor(self, name: str, tensor: torch.Tensor) -> None:
        spec = self.method.specs[name]
        if spec.dtype is None:
            self._parameters[name] = nn.Parameter(tensor.to(self.compute_dtype), requires_grad=False)
        else:
            self._buffers[name] = tensor

    def tensor(self, name: str) -> torch.Tensor:
        """A stored checkpoint tensor by its checkpoint name."""
        if name in self.released:
            raise QditError(f"layer {self.name}: tensor {name!r} was released after its weight was expanded to "
                            f"FP8 at load (weights_4bit='expanded_fp8'); load with weights_4bit='packed' to read it")
        return self._buffers[name] if name in self._buffers else self._parameters[name]

    def release(self, *names: str) -> None:
        """Free checkpoint tensors the backend no longer reads (its own layout holds their content)."""
        for name in names:
            slot = self._buffers if name in self._buffers else self._parameters
            slot[name] = None
            self.released.add(name)

    @property
    def weight(self) -> torch.Tensor:
        if "weight" not in self._buffers:
            raise AttributeError("weight")
        return self.method.dequantize(self).to(self.compute_dtype)

    def _apply(self, fn, recurse=True):
        # Quantized data and scales keep their dtypes under module.to(dtype); they still move devices.
        kept = [n for n, b in self._buffers.items() if b is not None and b.dtype in _STORED_DTYPES]
        apply_keeping_dtypes(self, super()._apply, fn, recurse, kept)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend is None:
            raise RuntimeError(f"layer {self.name} has no kernel backend: it was not loaded by qdit")
        return self.backend.apply(self, x)

    def extra_repr(self) -> str:
        backend = self.backend.name if self.backend is not None else "none"
        expanded = ", weight expanded to FP8 at load" if self.released else ""
        gelu = ", input: the MLP's pre-activation (GELU applied as it is quantized)" if self.input_gelu else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"scheme={self.layer_quant.describe()}, backend={backend}{expanded}{gelu}")


class SplitKLinear(nn.Module):
    """A Linear computed as the sum of QuantLinears over consecutive slices of its input features.

    FLUX single blocks' proj_out in Nunchaku checkpoints is two SVDQuant linears, one over the attention
    output and one over the MLP output (each with its own smoothing and activation quantization); its
    output is the sum of theirs. The parts are `linears.0`, `linears.1`, ... (the checkpoint's names).
    """

    def __init__(self, name: str, in_features: int, out_features: int, parts: list[tuple[LayerQuant, bool]],
                 dtype: torch.dtype):
        super().__init__()
        self.name = name
        self.in_features = in_features
        self.out_features = out_features
        self.slices = [lq.k_slice for lq, _ in parts]
        if self.slices[0][0] != 0 or self.slices[-1][1] != in_features or any(
                a[1] != b[0] for a, b in zip(self.slices, self.slices[1:])):
            raise ValueError(f"{name}: input slices {self.slices} do not tile 0..{in_features}")
        self.linears = nn.ModuleList(
            QuantLinear(f"{name}.linears.{i}", stop - start, out_features, bias, lq, dtype)
            for i, ((lq, bias), (start, stop)) in enumerate(zip(parts, self.slices)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = None
        for layer, (start, stop) in zip(self.linears, self.slices):
            part = layer(x[..., start:stop])
            y = part if y is None else y + part
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, slices={self.slices}"
