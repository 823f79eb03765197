"""NVIDIA ModelOpt diffusers exports: detection, quantization_config parsing, per-layer plan, writing.

Facts this follows are in docs/formats.md (and ../shared/specs/modelopt-checkpoints.md).
"""

from __future__ import annotations

import fnmatch
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from qdit.errors import CheckpointError, UnsupportedFormatError
from qdit.formats.checkpoint import Checkpoint
from qdit.quant.scheme import UNQUANTIZED, ActivationScale, LayerQuant, Scheme

log = logging.getLogger("qdit.formats")

MODELOPT_QUANT_METHODS = ("modelopt", "modelopt_fp4", "modelopt_mixed")

# quant_algo -> scheme of a quantized layer (activation semantics come from the algo, not config_groups)
ALGO_SCHEMES = {
    "FP8": Scheme.FP8,
    "FP8_PER_CHANNEL_PER_TOKEN": Scheme.FP8_PER_CHANNEL,
    "NVFP4": Scheme.NVFP4,
    "W4A16_NVFP4": Scheme.W4A16_NVFP4,
    "NVFP4_SVD": Scheme.NVFP4_SVD,
}
SCHEME_ALGOS = {v: k for k, v in ALGO_SCHEMES.items()}
MIXED = "MIXED_PRECISION"


@dataclass
class ModelOptConfig:
    quant_algo: str
    ignore: list[str] = field(default_factory=list)
    quantized_layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    lora_rank: int | None = None
    producer: dict[str, Any] = field(default_factory=dict)
    source: str = ""  # where the config was read from


def _is_modelopt(cfg: dict[str, Any]) -> bool:
    producer = cfg.get("producer") or {}
    return cfg.get("quant_method") in MODELOPT_QUANT_METHODS or (
        isinstance(producer, dict) and producer.get("name") == "modelopt")


def find_quantization_config(ckpt: Checkpoint) -> tuple[dict[str, Any], str] | None:
    """The raw quantization config of a checkpoint and where it was found, in ModelOpt's priority order."""
    if "quantization_config" in ckpt.config:
        raw = ckpt.config["quantization_config"]
        if not isinstance(raw, dict):
            raise CheckpointError("quantization_config is not a JSON object", file=str(ckpt.config_file),
                                  expected="an object", found=repr(raw)[:100])
        return raw, str(ckpt.config_file)
    if ckpt.sidecar_quant_config is not None:
        return ckpt.sidecar_quant_config, str(ckpt.folder / "hf_quant_config.json")
    if len(ckpt.files) == 1:
        raw = ckpt.file_metadata.get(ckpt.files[0], {}).get("quantization_config")
        if raw:
            try:
                return json.loads(raw), f"{ckpt.files[0]} (header metadata)"
            except json.JSONDecodeError as e:
                raise CheckpointError("safetensors header's quantization_config is not valid JSON",
                                      file=str(ckpt.files[0]), found=str(e)) from e
    return None


def parse_modelopt_config(raw: dict[str, Any], source: str) -> ModelOptConfig | None:
    """None when the config is not ModelOpt's; raises for a ModelOpt config qdit cannot serve."""
    if "quantization" in raw and "producer" in raw:  # hf_quant_config.json, nested form
        if not _is_modelopt(raw):
            return None
        q = dict(raw["quantization"])
        q["ignore"] = q.pop("exclude_modules", None) or q.get("ignore") or []
        q["producer"] = raw["producer"]
        raw = q
    elif not _is_modelopt(raw):
        return None
    algo = raw.get("quant_algo")
    if algo not in ALGO_SCHEMES and algo != MIXED:
        raise UnsupportedFormatError(
            "unknown ModelOpt quant_algo", file=source,
            expected=", ".join([*ALGO_SCHEMES, MIXED]), found=repr(algo),
            hint="qdit reads the quant_algos ModelOpt exports diffusers DiTs with; re-export with one of them")
    quantized_layers = raw.get("quantized_layers") or {}
    if algo == MIXED:
        if not quantized_layers:
            raise CheckpointError("MIXED_PRECISION config has no quantized_layers", file=source,
                                  expected="a {layer: {quant_algo: ...}} policy", found="none")
        for name, entry in quantized_layers.items():
            if not isinstance(entry, dict):
                raise CheckpointError("mixed-precision policy entry is not an object", file=source, layer=name,
                                      expected='{"quant_algo": ...}', found=repr(entry))
            if entry.get("quant_algo") not in ALGO_SCHEMES:
                raise UnsupportedFormatError("unknown quant_algo in the mixed-precision policy", file=source,
                                             layer=name, expected=", ".join(ALGO_SCHEMES),
                                             found=repr(entry.get("quant_algo")))
    ignore = raw.get("ignore") or []
    if not isinstance(ignore, list):
        raise CheckpointError("quantization_config.ignore is not a list", file=source, found=type(ignore).__name__)
    return ModelOptConfig(algo, list(ignore), dict(quantized_layers), raw.get("lora_rank"),
                          dict(raw.get("producer") or {}), source)


def matches_ignore(layer_name: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(layer_name, pattern)


def _scheme_of_layer(cfg: ModelOptConfig, name: str) -> Scheme:
    if cfg.quant_algo == MIXED:
        entry = cfg.quantized_layers.get(name)
        return ALGO_SCHEMES[entry["quant_algo"]] if entry else Scheme.BF16
    if any(matches_ignore(name, p) for p in cfg.ignore):
        return Scheme.BF16
    return ALGO_SCHEMES[cfg.quant_algo]


def _describe_tensors(ckpt: Checkpoint, name: str) -> str:
    found = [f"{k[len(name) + 1:]}:{str(v.dtype).replace('torch.', '')}{list(v.shape)}"
             for k, v in ckpt.tensors.items() if k.startswith(name + ".") and "." not in k[len(name) + 1:]]
    return ", ".join(found) or "no tensors"


def plan_layers(cfg: ModelOptConfig, ckpt: Checkpoint, linears: dict[str, tuple[int, int, bool]]) -> dict[str, LayerQuant]:
    """Decide every Linear's scheme before any weight is created.

    The config says which layers are quantized and with which algo; within an NVFP4_SVD checkpoint the
    tensors present decide between SVD, smoothed NVFP4 and plain NVFP4 (ModelOpt writes all three).
    A layer whose weight dtype contradicts the config is an error naming both.
    """
    for pattern in cfg.ignore:
        if not any(matches_ignore(n, pattern) for n in linears):
            log.warning("ignore pattern %r in %s matches no Linear of the model", pattern, cfg.source)
    unknown = sorted(set(cfg.quantized_layers) - set(linears))
    if unknown:
        raise CheckpointError("quantized_layers names layers the model does not have", file=cfg.source,
                              layer=", ".join(unknown[:4]) + (", ..." if len(unknown) > 4 else ""),
                              expected="names of the model's Linear layers", found=f"{len(unknown)} unknown name(s)",
                              hint="the checkpoint is for another model or config")
    plan: dict[str, LayerQuant] = {}
    for name in linears:
        scheme = _scheme_of_layer(cfg, name)
        weight = ckpt.tensors.get(f"{name}.weight")
        if weight is None:
            plan[name] = UNQUANTIZED if scheme is Scheme.BF16 else LayerQuant(scheme)
            continue  # the strict loader reports the missing tensor with its file
        expected_dtype = {"bf16": "floating", "fp8": "float8_e4m3fn", "fp8_per_channel": "float8_e4m3fn"}.get(
            scheme.value, "uint8")
        actual = str(weight.dtype).replace("torch.", "")
        dtype_ok = (weight.dtype.is_floating_point and weight.dtype.itemsize >= 2) if expected_dtype == "floating" \
            else actual == expected_dtype
        if not dtype_ok:
            raise CheckpointError(
                "a layer's weight does not have the dtype its quantization config implies",
                file=str(weight.file), tensor=weight.name, layer=name,
                expected=f"{expected_dtype} ({scheme.value} per {cfg.source})", found=actual,
                hint="the checkpoint's ignore list / quantized_layers do not match its tensors; re-export it")
        plan[name] = _layer_quant(scheme, ckpt, name, cfg)
    return plan


def _layer_quant(scheme: Scheme, ckpt: Checkpoint, name: str, cfg: ModelOptConfig) -> LayerQuant:
    has = lambda suffix: f"{name}.{suffix}" in ckpt.tensors  # noqa: E731
    if scheme is Scheme.BF16:
        return UNQUANTIZED
    if scheme is Scheme.FP8:
        return LayerQuant(scheme, ActivationScale.STATIC)
    if scheme is Scheme.FP8_PER_CHANNEL:
        return LayerQuant(scheme)
    if scheme is Scheme.W4A16_NVFP4:
        return LayerQuant(scheme, pre_quant_scale=has("pre_quant_scale"))
    if scheme is Scheme.NVFP4:
        return LayerQuant(scheme, ActivationScale.STATIC, pre_quant_scale=has("pre_quant_scale"))
    # NVFP4_SVD checkpoints also hold smoothed-only and plain NVFP4 layers: the tensors decide.
    if has("svdquant_lora_a") or has("svdquant_lora_b"):
        rank_tensor = ckpt.tensors.get(f"{name}.svdquant_lora_a")
        if rank_tensor is None or f"{name}.svdquant_lora_b" not in ckpt.tensors:
            missing = "svdquant_lora_a" if rank_tensor is None else "svdquant_lora_b"
            raise CheckpointError("an SVDQuant layer has one LoRA factor but not the other",
                                  file=str(ckpt.files[0]), tensor=f"{name}.{missing}", layer=name,
                                  expected="svdquant_lora_a [r,K] and svdquant_lora_b [N,r]",
                                  found=_describe_tensors(ckpt, name), hint="re-export the checkpoint")
        return LayerQuant(Scheme.NVFP4_SVD, ActivationScale.STATIC, pre_quant_scale=has("pre_quant_scale"),
                          lora_rank=rank_tensor.shape[0])
    return LayerQuant(Scheme.NVFP4, ActivationScale.STATIC, pre_quant_scale=has("pre_quant_scale"))


# ---------------------------------------------------------------------------------------------
# Writing: the quantization_config ModelOpt's diffusers export puts in config.json
# ---------------------------------------------------------------------------------------------

_WEIGHT_GROUPS = {
    Scheme.FP8: ({"dynamic": False, "num_bits": 8, "type": "float"}, {"dynamic": False, "num_bits": 8, "type": "float"}),
    Scheme.NVFP4: ({"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16},
                   {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16}),
    Scheme.W4A16_NVFP4: ({"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16}, None),
}
_WEIGHT_GROUPS[Scheme.NVFP4_SVD] = _WEIGHT_GROUPS[Scheme.NVFP4]


def export_quantization_config(plan: dict[str, LayerQuant], lora_rank: int | None, producer_version: str) -> dict:
    """A flat ModelOpt quantization_config describing `plan` (one whole-model algo, or MIXED_PRECISION)."""
    quantized = {n: lq for n, lq in plan.items() if lq.quantized}
    schemes = {lq.scheme for lq in quantized.values()}
    if not schemes:
        raise ValueError("nothing to export: no layer is quantized")
    cfg: dict[str, Any] = {"quant_method": "modelopt",
                           "producer": {"name": "modelopt", "version": producer_version}}
    if len(schemes) == 1:
        scheme = next(iter(schemes))
        cfg["quant_algo"] = SCHEME_ALGOS[scheme]
        cfg["ignore"] = sorted(n for n, lq in plan.items() if not lq.quantized)
        groups = _WEIGHT_GROUPS.get(scheme)
        if groups is not None:
            w, a = groups
            group = {"weights": w, "targets": ["Linear"]}
            if a is not None:
                group["input_activations"] = a
            cfg["config_groups"] = {"group_0": group}
        if scheme is Scheme.NVFP4_SVD:
            cfg.update({"has_zero_point": False, "pre_quant_scale": True, "lora_rank": lora_rank})
    else:
        cfg["quant_algo"] = MIXED
        cfg["ignore"] = []
        layers = {}
        for n, lq in sorted(quantized.items()):
            entry: dict[str, Any] = {"quant_algo": SCHEME_ALGOS[lq.scheme]}
            if lq.scheme in (Scheme.NVFP4, Scheme.W4A16_NVFP4, Scheme.NVFP4_SVD):
                entry["group_size"] = 16
            layers[n] = entry
        cfg["quantized_layers"] = layers
    return cfg
