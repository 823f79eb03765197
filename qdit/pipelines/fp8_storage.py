"""FP8 weight storage for a pipeline's text encoder and VAE.

`apply_fp8_weight_storage(module)` keeps the weight of every large enough nn.Linear / nn.Conv2d /
nn.Conv3d in float8_e4m3fn with a float32 scale per output channel, and dequantizes it layer by layer
at forward time. Compute stays in the layer's compute dtype (BF16 usually); only storage shrinks
(about half the bytes of a BF16 text encoder or VAE).

How a layer is converted: the instance keeps its identity and its own class in its MRO. Its
`weight` parameter is removed, `weight_fp8` and `weight_scale` buffers are added, and the instance's
class is switched to a qdit subclass of its class (`FP8StorageLinear` for nn.Linear, `FP8StorageConv2d`
/ `FP8StorageConv3d` for the convs, a generated `FP8Storage<Name>` for third-party subclasses such as
diffusers' QwenImageCausalConv3d). The subclass makes `weight` a property returning the dequantized
weight, so the layer's own forward (nn.Linear / nn.Conv, with its stride, padding, dilation, groups
and padding_mode, or a subclass's forward such as a causal pad before the conv) runs unchanged. No
third-party class is modified. Swapping the instance for a new module was rejected because
third-party code holds references and does isinstance checks on these layers (diffusers' Qwen-Image
VAE sizes its feature cache by counting `isinstance(m, QwenImageCausalConv3d)`), and hooks registered
on the layer would be lost.

Dtype reporting: diffusers' `ModelMixin.dtype` is the dtype of the first floating parameter (then of
the first floating buffer when there is no floating parameter) and transformers'
`PreTrainedModel.dtype` the first floating parameter; float8 counts as floating in torch. The FP8
tensors are buffers, never parameters, and biases / norm weights stay parameters in the compute dtype,
so both report the compute dtype.

`.to(device)` moves the FP8 buffers; `.to(dtype)`, `.half()`, `.float()` never upcast them (they pass
through `_apply` as integer views) and set the layer's compute dtype to the new dtype, as they would
for the BF16 weight of a plain layer.

Limits: `torch.save(model)` of a model holding a generated `FP8Storage<Name>` class cannot be
unpickled elsewhere (use the state_dict: keys `<layer>.weight_fp8`, `<layer>.weight_scale`); writing
`layer.weight` is refused; reading it costs a dequantization (transformers' T5 reads
`wo.weight.dtype` every forward). Apply it after the weights are loaded and before any offloading
hooks; do not combine it with diffusers' `enable_layerwise_casting`.
"""

from __future__ import annotations

import logging
from collections import Counter

import torch
from torch import nn

from qdit.quant.numerics import E4M3_MAX, to_e4m3
from qdit.quant.storage import apply_keeping_dtypes

log = logging.getLogger("qdit.pipelines")

FP8_DTYPE = torch.float8_e4m3fn
_TARGETS = (nn.Linear, nn.Conv2d, nn.Conv3d)
_SOURCE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_COMPUTE_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
# Buffers that dtype conversions must leave alone (see qdit.quant.storage).
_CARRIERS = ("weight_fp8", "weight_scale")


class FP8StorageLayer:
    """Mixin of a converted layer: `weight_fp8` + `weight_scale` buffers, `weight` dequantized on read.

    Only ever combined with nn.Linear / nn.Conv2d / nn.Conv3d (or a subclass) by
    `apply_fp8_weight_storage`; it defines no forward, the base class's forward runs.
    """

    weight_fp8: torch.Tensor  # float8_e4m3fn, the layer's weight shape
    weight_scale: torch.Tensor  # float32 [out_channels]
    fp8_compute_dtype: torch.dtype

    def dequantize(self) -> torch.Tensor:
        """weight_fp8 * weight_scale (per output channel) in float32, cast to the compute dtype."""
        w = self.weight_fp8.float()
        w.mul_(self.weight_scale.view(-1, *([1] * (w.dim() - 1))))
        return w.to(self.fp8_compute_dtype)

    @property
    def weight(self) -> torch.Tensor:
        # A fresh tensor each read; nothing in the compute dtype stays on the module between forwards.
        return self.dequantize()

    def _apply(self, fn, recurse=True):
        apply_keeping_dtypes(self, super()._apply, fn, recurse, _CARRIERS)
        # The compute dtype follows what fn does to a floating tensor (the bias, or an empty probe).
        bias = self._parameters.get("bias")
        new_dtype = bias.dtype if bias is not None else fn(torch.empty(0, dtype=self.fp8_compute_dtype)).dtype
        if new_dtype in _COMPUTE_DTYPES:
            self.fp8_compute_dtype = new_dtype
        return self

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weight_storage=float8_e4m3fn, compute_dtype={self.fp8_compute_dtype}"


class FP8StorageLinear(FP8StorageLayer, nn.Linear):
    """An nn.Linear converted by `apply_fp8_weight_storage`."""


class FP8StorageConv2d(FP8StorageLayer, nn.Conv2d):
    """An nn.Conv2d converted by `apply_fp8_weight_storage`."""


class FP8StorageConv3d(FP8StorageLayer, nn.Conv3d):
    """An nn.Conv3d converted by `apply_fp8_weight_storage`."""


_STORAGE_CLASSES: dict[type, type] = {nn.Linear: FP8StorageLinear, nn.Conv2d: FP8StorageConv2d,
                                      nn.Conv3d: FP8StorageConv3d}


def _storage_class(cls: type) -> type:
    """The FP8-storage subclass of a layer class (created once per third-party subclass)."""
    if cls not in _STORAGE_CLASSES:
        _STORAGE_CLASSES[cls] = type(f"FP8Storage{cls.__name__}", (FP8StorageLayer, cls), {
            "__module__": __name__,
            "__doc__": f"A {cls.__module__}.{cls.__qualname__} converted by `apply_fp8_weight_storage`.",
        })
    return _STORAGE_CLASSES[cls]


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn weight, float32 scale [out]) with scale[c] = amax(W[c]) / 448 (1 for an all-zero channel).

    The cast saturates at +-448 (torch's plain cast would turn out-of-range values into NaN).
    """
    w = weight.detach().float()
    amax = w.abs().amax(dim=tuple(range(1, w.dim())))
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    return to_e4m3(w / scale.view(-1, *([1] * (w.dim() - 1)))), scale


def _skip_reason(mod: nn.Module, shared: Counter, min_numel: int) -> str | None:
    w = mod._parameters.get("weight")
    if w is None:
        return "has no weight parameter"
    if type(w) is not nn.Parameter:
        return f"weight is a {type(w).__name__}, not a plain Parameter"
    if w.dtype not in _SOURCE_DTYPES:
        return f"weight dtype is {w.dtype}"
    if w.device.type == "meta":
        return "weight is on the meta device (not loaded, or offloaded by a hook)"
    if w.numel() < min_numel:
        return "small"
    if shared[id(w)] > 1:
        return "weight is shared with another module (tied); converting would add a copy, not save memory"
    if torch.nn.utils.parametrize.is_parametrized(mod):
        return "layer is parametrized"
    if not torch.isfinite(w).all():
        return "weight has non-finite values"
    return None


def apply_fp8_weight_storage(module: nn.Module, *, compute_dtype: torch.dtype | None = None,
                             min_numel: int = 4096) -> int:
    """Store the weights of `module`'s Linear / Conv2d / Conv3d layers in FP8, in place; returns how many.

    A layer is converted when its weight is a plain floating Parameter with at least `min_numel`
    elements, not shared with another module (tied embeddings) and finite. Norms, embeddings and all
    other modules are left alone. Layers converted before are skipped, so a second call returns 0.

    compute_dtype: dtype of the dequantized weight and of the bias. None (recommended) keeps each
        layer's current weight dtype, which also preserves layers a model deliberately keeps in float32
        (T5's `wo`); an explicit dtype applies to every converted layer, so it must match the dtype of
        the activations reaching them.
    """
    if compute_dtype is not None and compute_dtype not in _COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be one of {_COMPUTE_DTYPES}, got {compute_dtype}")
    shared = Counter(id(p) for _, p in module.named_parameters(remove_duplicate=False))
    converted = 0
    with torch.no_grad():
        for name, mod in module.named_modules():
            if isinstance(mod, FP8StorageLayer) or not isinstance(mod, _TARGETS):
                continue
            reason = _skip_reason(mod, shared, min_numel)
            if reason == "small":
                continue
            if reason is not None:
                log.warning("FP8 weight storage: %s (%s) left as is: %s", name, type(mod).__name__, reason)
                continue
            weight = mod._parameters["weight"]
            fp8, scale = quantize_per_channel(weight)
            layer_dtype = compute_dtype if compute_dtype is not None else weight.dtype
            bias = mod._parameters.get("bias")
            if bias is not None and bias.dtype != layer_dtype:
                mod._parameters["bias"] = nn.Parameter(bias.detach().to(layer_dtype), requires_grad=bias.requires_grad)
            del mod._parameters["weight"]
            mod.register_buffer("weight_fp8", fp8)
            mod.register_buffer("weight_scale", scale)
            mod.fp8_compute_dtype = layer_dtype
            mod.__class__ = _storage_class(type(mod))
            converted += 1
    if converted and not any(p.is_floating_point() and p.dtype != FP8_DTYPE for p in module.parameters()):
        log.warning("FP8 weight storage: %s has no floating parameter left; `.dtype` of diffusers / "
                    "transformers models is read from parameters and will not be the compute dtype",
                    type(module).__name__)
    log.info("FP8 weight storage: %d layers of %s converted", converted, type(module).__name__)
    return converted
