"""Build a diffusers transformer on the meta device and stream a checkpoint's tensors into it, strictly.

Every tensor in the checkpoint must be consumed and every parameter filled; derived buffers are
allowed only by name (LinearMethod.derived_buffers). Nothing half-loaded is ever returned: any error
raises before the model leaves this module.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from accelerate import init_empty_weights
from torch import nn

from qdit.config import WEIGHTS_4BIT_CHOICES
from qdit.errors import CheckpointError, QditError
from qdit.formats.checkpoint import Checkpoint
from qdit.kernels import BackendSelector
from qdit.models.base import ModelAdapter
from qdit.quant.layer import QuantLinear, SplitKLinear
from qdit.quant.scheme import FOUR_BIT_SCHEMES, LayerQuant

log = logging.getLogger("qdit.loading")


@dataclass
class LoadReport:
    seconds: float
    tensors_read: int
    repairs: dict[str, int]
    backends: dict[str, int]  # backend name -> number of quantized layers it computes


def model_config(config: dict[str, Any]) -> dict[str, Any]:
    """The diffusers constructor config: private keys and the quantization config removed."""
    return {k: v for k, v in config.items() if not k.startswith("_") and k != "quantization_config"}


def build_skeleton(adapter: ModelAdapter, config: dict[str, Any], dtype: torch.dtype) -> nn.Module:
    """The diffusers model with its parameters on the meta device (buffers are real: some are derived)."""
    with init_empty_weights(include_buffers=False):
        model = adapter.model_class().from_config(model_config(config))
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is not None and buf.is_floating_point():
                module._buffers[name] = buf.to(dtype)
        for name, param in module._parameters.items():
            if param is not None and param.is_floating_point():
                module._parameters[name] = torch.nn.Parameter(param.to(dtype), requires_grad=False)
    return model


def linear_layers(model: nn.Module) -> dict[str, tuple[int, int, bool]]:
    return {n: (m.in_features, m.out_features, m.bias is not None)
            for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def install_quant_layers(model: nn.Module, plan: dict[str, LayerQuant], dtype: torch.dtype) -> None:
    """Swap each quantized Linear for a QuantLinear (still on the meta device).

    Plan entries with a k_slice are parts `<linear>.linears.<i>` of a Linear split along its inputs:
    the Linear becomes a SplitKLinear of them.
    """
    split: dict[str, list[tuple[int, LayerQuant]]] = defaultdict(list)
    for name, lq in plan.items():
        if lq.k_slice is not None:
            parent, _, index = name.rpartition(".linears.")
            split[parent].append((int(index), lq))
    for parent_path, parts in split.items():
        parent_name, _, child = parent_path.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        parts.sort(key=lambda p: p[0])
        setattr(parent, child, SplitKLinear(parent_path, old.in_features, old.out_features,
                                            [(lq, old.bias is not None) for _, lq in parts], dtype))
    for name, lq in plan.items():
        if not lq.quantized or lq.k_slice is not None:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        setattr(parent, child, QuantLinear(name, old.in_features, old.out_features, old.bias is not None, lq, dtype))


class _Filler:
    """Routes checkpoint tensors to modules and records what was filled."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, device: torch.device):
        self.model = model
        self.dtype = dtype
        self.device = device
        self.modules = dict(model.named_modules())
        self.filled: set[str] = set()

    def owner(self, key: str) -> tuple[str, nn.Module, str] | None:
        module_name, _, tensor_name = key.rpartition(".")
        module = self.modules.get(module_name)
        if module is None:
            return None
        return module_name, module, tensor_name

    def put(self, key: str, tensor: torch.Tensor, source: str, quantize_from_full: bool) -> None:
        found = self.owner(key)
        if found is None:
            raise CheckpointError("checkpoint has a tensor that belongs to no module of the model", file=source,
                                  tensor=key, hint="the checkpoint is for another model or config; check config.json")
        module_name, module, tensor_name = found
        if isinstance(module, QuantLinear):
            self._put_quant(module_name, module, tensor_name, tensor, source, quantize_from_full)
            return
        if tensor_name in module._parameters:
            current = module._parameters[tensor_name]
        elif tensor_name in module._buffers and tensor_name not in module._non_persistent_buffers_set:
            current = module._buffers[tensor_name]
        else:
            raise CheckpointError("checkpoint has a tensor the module does not own", file=source, tensor=key,
                                  layer=f"{module_name} ({type(module).__name__})",
                                  expected=", ".join(n for n, _ in module.named_parameters(recurse=False)) or "none",
                                  found=tensor_name)
        if tuple(current.shape) != tuple(tensor.shape):
            raise CheckpointError("tensor has the wrong shape", file=source, tensor=key,
                                  layer=f"{module_name} ({type(module).__name__})",
                                  expected=str(list(current.shape)), found=str(list(tensor.shape)),
                                  hint="the checkpoint does not match its config.json")
        if current.is_floating_point() != tensor.is_floating_point() or tensor.dtype in (
                torch.float8_e4m3fn, torch.float8_e5m2):
            raise CheckpointError("tensor has the wrong dtype", file=source, tensor=key,
                                  layer=f"{module_name} ({type(module).__name__})",
                                  expected="a 16/32-bit float" if current.is_floating_point() else str(current.dtype),
                                  found=str(tensor.dtype),
                                  hint="an unquantized layer holds a quantized tensor: is the layer missing from "
                                       "the ignore list / quantized_layers?")
        value = tensor.to(self.device, self.dtype if tensor.is_floating_point() else tensor.dtype)
        if tensor_name in module._parameters:
            module._parameters[tensor_name] = nn.Parameter(value, requires_grad=False)
        else:
            module._buffers[tensor_name] = value
        self.filled.add(key)

    def _put_quant(self, module_name, layer: QuantLinear, tensor_name, tensor, source, quantize_from_full):
        key = f"{module_name}.{tensor_name}"
        if quantize_from_full and tensor_name == "weight":
            if tuple(tensor.shape) != (layer.out_features, layer.in_features) or not tensor.is_floating_point():
                raise CheckpointError("a full-precision weight was expected for load-time quantization",
                                      file=source, tensor=key, layer=module_name,
                                      expected=f"float [{layer.out_features}, {layer.in_features}]",
                                      found=f"{tensor.dtype} {list(tensor.shape)}")
            # The layer's full-precision weight exists only here, on the target device, until quantized.
            made = layer.method.quantize_weight(layer, tensor.to(self.device, self.dtype))
            for name, value in made.items():
                layer.method.check(module_name, name, value, source="load-time quantization")
                layer.set_tensor(name, value.to(self.device))
                self.filled.add(f"{module_name}.{name}")
            return
        if quantize_from_full and tensor_name == "bias" and tensor.is_floating_point():
            # A BF16 checkpoint's bias, for a layout that stores it in another float dtype (AWQ: float32).
            wanted = layer.method.specs["bias"].dtype
            tensor = tensor.to(wanted) if wanted is not None else tensor
        layer.method.check(module_name, tensor_name, tensor, source=source)
        layer.set_tensor(tensor_name, tensor.to(self.device))
        self.filled.add(key)


def fill_from_checkpoint(model: nn.Module, ckpt, *, dtype: torch.dtype, device: torch.device,
                         quantize_from_full: bool) -> int:
    """Stream every tensor of the checkpoint (or RandomWeights) into the model, one tensor at a time."""
    filler = _Filler(model, dtype, device)
    count = 0
    for name, tensor, source in ckpt.iter_tensors():
        filler.put(name, tensor, source, quantize_from_full)
        count += 1
    _check_complete(model, filler.filled, ckpt)
    return count


class RandomWeights:
    """A stand-in for a BF16 checkpoint: seeded random tensors made on the target device, one at a time.

    Used to benchmark and smoke-test full-size models without a 40 GB download; the loader treats it
    exactly like a checkpoint (same streaming, same load-time quantization, same strict checks).
    """

    def __init__(self, adapter: ModelAdapter, skeleton: nn.Module, device: torch.device, dtype: torch.dtype,
                 seed: int = 0):
        """skeleton: the model built by build_skeleton; its state-dict names and shapes are produced."""
        self.folder = Path(f"<random {adapter.name} weights, seed {seed}>")
        self.config = {"_class_name": adapter.class_name, **dict(skeleton.config)}
        self.class_name = adapter.class_name
        self.device, self.dtype, self.seed = device, dtype, seed
        self.shapes = {k: (tuple(v.shape), v.dtype) for k, v in skeleton.state_dict().items()}
        self.linear_weights = {f"{n}.weight" for n in linear_layers(skeleton)}

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor, str]]:
        gen = torch.Generator(device=self.device).manual_seed(self.seed)
        for name, (shape, dtype) in self.shapes.items():
            if name in self.linear_weights:
                t = torch.randn(shape, generator=gen, device=self.device, dtype=self.dtype) / shape[1] ** 0.5
            elif name.endswith("bias"):
                t = torch.randn(shape, generator=gen, device=self.device, dtype=self.dtype) * 0.02
            elif dtype.is_floating_point:
                t = torch.ones(shape, device=self.device, dtype=self.dtype)  # norm scales
            else:
                t = torch.zeros(shape, device=self.device, dtype=dtype)
            yield name, t, str(self.folder)


def _check_complete(model: nn.Module, filled: set[str], ckpt: Checkpoint) -> None:
    missing = []
    for module_name, module in model.named_modules():
        allowed = module.method.derived_buffers if isinstance(module, QuantLinear) else ()
        for name, p in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            key = f"{module_name}.{name}" if module_name else name
            if key in filled or name in allowed:
                continue
            if p.is_meta:
                missing.append((key, module_name, module, name, p))
    if missing:
        key, module_name, module, name, p = missing[0]
        detail = module.layer_quant.describe() if isinstance(module, QuantLinear) else type(module).__name__
        raise CheckpointError(
            f"checkpoint is missing {len(missing)} tensor(s) the model needs", file=str(ckpt.folder), tensor=key,
            layer=f"{module_name} ({detail})", expected=f"{name} {str(p.dtype).replace('torch.', '')}{list(p.shape)}",
            found="absent" + (f" (also missing: {', '.join(m[0] for m in missing[1:4])}"
                              f"{', ...' if len(missing) > 4 else ''})" if len(missing) > 1 else ""),
            hint="the checkpoint is incomplete or its quantization_config does not match its tensors")


def finish_quant_layers(model: nn.Module, device: torch.device, backend: str | None,
                        weights_4bit: str = "packed") -> tuple[dict, dict]:
    """Post-process every QuantLinear, choose and prepare its backend; one summary warning for repairs."""
    selector = BackendSelector(device, backend)
    repairs: dict[str, int] = defaultdict(int)
    chosen: dict[str, int] = defaultdict(int)
    kept_packed: dict[str, int] = defaultdict(int)
    for module in model.modules():
        if not isinstance(module, QuantLinear):
            continue
        for what, n in module.method.process_after_loading(module).items():
            repairs[what] += n
        module.backend = selector.select(module.name, module.layer_quant, module.in_features, module.out_features)
        expand = weights_4bit == "expanded_fp8" and module.layer_quant.scheme in FOUR_BIT_SCHEMES
        module.expand_fp8_at_load = expand
        module.backend.prepare(module)
        chosen[module.backend.name] += 1
        if expand and not module.released:
            kept_packed[f"{module.layer_quant.scheme.value} on {module.backend.name}"] += 1
    if kept_packed:
        # Not an error: AWQ W4A16 layers (a GEMV at batch size rows) and the reference and exact backends
        # compute from the codes themselves.
        log.log(logging.WARNING if device.type == "cuda" else logging.INFO,
                "weights_4bit='expanded_fp8': %s layer(s) keep their packed 4-bit weights, their backend computing "
                "from the codes (%s)", sum(kept_packed.values()),
                ", ".join(f"{n} {what}" for what, n in sorted(kept_packed.items())))
    if repairs.get("e4m3_nan_scale_bytes"):
        log.warning("%d float8_e4m3fn scale byte(s) held NaN (0x7F/0xFF) and were clamped to 448 (0x7E); "
                    "the checkpoint was exported by a ModelOpt version that cast block scales without saturation",
                    repairs["e4m3_nan_scale_bytes"])
    return dict(repairs), dict(chosen)


def load_into(model: nn.Module, ckpt, plan: dict[str, LayerQuant], *, dtype: torch.dtype,
              device: torch.device, backend: str | None, quantize_from_full: bool,
              weights_4bit: str = "packed") -> tuple[nn.Module, LoadReport]:
    """Fill `model` (from build_skeleton, planned with `plan`) from `ckpt`; returns it ready to run."""
    if weights_4bit not in WEIGHTS_4BIT_CHOICES:  # before any tensor is read
        raise QditError(f"weights_4bit={weights_4bit!r} is not one of {', '.join(WEIGHTS_4BIT_CHOICES)}")
    start = time.perf_counter()
    install_quant_layers(model, plan, dtype)
    count = fill_from_checkpoint(model, ckpt, dtype=dtype, device=device, quantize_from_full=quantize_from_full)
    model.to(device)  # buffers derived at construction (e.g. rotary tables)
    repairs, chosen = finish_quant_layers(model, device, backend, weights_4bit)
    model.eval().requires_grad_(False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return model, LoadReport(time.perf_counter() - start, count, repairs, chosen)
