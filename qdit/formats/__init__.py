"""Checkpoint formats: what is on disk -> a per-Linear quantization plan.

One module per producer; detection reads the checkpoint's own config, never its file names.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from qdit.config import QUANTIZE_LAYERS_CHOICES
from qdit.errors import QditError, UnsupportedFormatError
from qdit.formats import modelopt, svdquant
from qdit.formats.checkpoint import Checkpoint, open_checkpoint
from qdit.models.base import ModelAdapter
from qdit.quant.scheme import UNQUANTIZED, LayerQuant, Scheme, default_layer_quant

log = logging.getLogger("qdit.formats")



def mixed_fp8_nvfp4(layer_name: str) -> Scheme:
    """A per-layer policy: attention projections in FP8 (softmax inputs are the most sensitive to
    error), every other quantized Linear in NVFP4."""
    return Scheme.FP8 if ".attn." in f".{layer_name}." else Scheme.NVFP4


# Nunchaku's modulation linears (AdaLN): read in full every step at batch 1, kept as AWQ W4A16.
MODULATION_SUFFIXES = (".norm1.linear", ".norm1_context.linear", ".norm.linear", ".img_mod.1", ".txt_mod.1")


def svdquant_policy(scheme: Scheme):
    """Nunchaku's recipe: SVDQuant W4A4 in every repeated block, AWQ W4A16 for the modulation linears."""
    def policy(layer_name: str) -> Scheme:
        return Scheme.AWQ_W4A16 if f".{layer_name}".endswith(MODULATION_SUFFIXES) else scheme
    return policy


# Formats qdit can quantize a BF16 checkpoint into while loading it: one scheme for every layer,
# or a per-layer policy (layer name -> scheme).
LOAD_TIME_FORMATS = {
    "fp8": Scheme.FP8,
    "fp8_per_channel": Scheme.FP8_PER_CHANNEL,
    "nvfp4": Scheme.NVFP4,
    "w4a16_nvfp4": Scheme.W4A16_NVFP4,
    "nvfp4_svd": Scheme.NVFP4_SVD,
    "mixed_fp8_nvfp4": mixed_fp8_nvfp4,
    "svdq_int4": svdquant_policy(Scheme.SVDQ_INT4),
    "svdq_nvfp4": svdquant_policy(Scheme.SVDQ_NVFP4),
}
# Nunchaku's checkpoints quantize every Linear of the repeated blocks (no ModelOpt exclusions).
ALL_BLOCKS_FORMATS = ("svdq_int4", "svdq_nvfp4")


@dataclass
class DetectedFormat:
    name: str  # "modelopt", "nunchaku-svdquant" (quant_algo = its precision) or "bf16"
    quant_algo: str | None
    modelopt: modelopt.ModelOptConfig | None = None
    svdquant: svdquant.SVDQuantConfig | None = None


def loading_source(ckpt: Checkpoint, fmt: DetectedFormat, linears: dict[str, tuple[int, int, bool]]):
    """What the loader streams: the checkpoint itself, or a view mapping its tensors onto diffusers' Linears
    (converted Nunchaku checkpoints: fused linears split into their parts)."""
    if fmt.svdquant is not None:
        return svdquant.SplitFusedCheckpoint(ckpt, fmt.svdquant, linears)
    return ckpt


def detect(ckpt: Checkpoint) -> DetectedFormat:
    found = modelopt.find_quantization_config(ckpt)
    if found is None:
        return DetectedFormat("bf16", None)
    raw, source = found
    if svdquant.is_svdquant(raw):
        cfg = svdquant.parse_config(raw, source)
        return DetectedFormat(svdquant.FORMAT_NAME, cfg.precision, svdquant=cfg)
    cfg = modelopt.parse_modelopt_config(raw, source)
    if cfg is None:
        raise UnsupportedFormatError(
            "the checkpoint has a quantization config qdit does not read", file=source,
            expected="a ModelOpt export (quant_method modelopt / modelopt_fp4 / modelopt_mixed, or producer modelopt)",
            found=f"quant_method={raw.get('quant_method')!r}",
            hint="Nunchaku checkpoints are converted first with `qdit convert nunchaku`")
    return DetectedFormat("modelopt", cfg.quant_algo, cfg)


def plan_for(ckpt: Checkpoint, fmt: DetectedFormat, adapter: ModelAdapter, linears: dict[str, tuple[int, int, bool]],
             quantize: str | None, *, lora_rank: int = 32, quantize_layers: str = "recipe") -> dict[str, LayerQuant]:
    """Per-Linear plan: from the checkpoint's config, or from a load-time quantization request covering
    the Linears quantize_layers names (qdit.config.QUANTIZE_LAYERS_CHOICES)."""
    if quantize_layers not in QUANTIZE_LAYERS_CHOICES:
        raise QditError(f"quantize_layers={quantize_layers!r} is not one of {', '.join(QUANTIZE_LAYERS_CHOICES)}")
    load_time = quantize is not None and quantize != "none"
    if quantize_layers != "recipe" and not load_time:
        as_it_is = ("a BF16 checkpoint, run unquantized" if fmt.name == "bf16" else
                    f"{fmt.name} {fmt.quant_algo}: its own quantization config decides its layers")
        raise QditError(f"quantize_layers={quantize_layers!r} picks the Linears qdit quantizes while loading a "
                        f"BF16 checkpoint, but {ckpt.folder} is loaded as it is ({as_it_is}). Ask for a load-time "
                        f"format (quantize=fp8, nvfp4, ...; CLI --quantize) or leave quantize_layers at 'recipe'.")
    if load_time:
        if fmt.name != "bf16":
            raise QditError(
                f"{ckpt.folder} is already quantized ({fmt.name} {fmt.quant_algo}); it cannot be quantized again "
                f"to {quantize}. Load it as it is (quantize=None), or quantize its BF16 original.")
        policy = LOAD_TIME_FORMATS.get(quantize)
        if policy is None:
            raise QditError(f"unknown quantization format {quantize!r}; choose one of: "
                            f"{', '.join(LOAD_TIME_FORMATS)} (or none)")
        config: dict[str, Any] = dict(ckpt.config)
        plan = {}
        odd = []
        layers = "blocks" if quantize in ALL_BLOCKS_FORMATS else quantize_layers
        for name, (k, n, _) in linears.items():
            if adapter.is_kept_in_bf16(name, config, layers):
                plan[name] = UNQUANTIZED
            elif quantize in ALL_BLOCKS_FORMATS and (k % 128 or n % 128):  # SVDQuant's tiles; 4-bit groups of 64
                plan[name] = UNQUANTIZED
                odd.append(f"{name} ({k}->{n})")
            elif k % 16 or n % 16:  # NVFP4 blocks and FP8 GEMMs need multiples of 16
                plan[name] = UNQUANTIZED
                odd.append(f"{name} ({k}->{n})")
            else:
                scheme = policy if isinstance(policy, Scheme) else policy(name)
                plan[name] = default_layer_quant(scheme, static=False, lora_rank=lora_rank)
        if odd:
            log.warning("%d Linear(s) stay BF16 because their dimensions are not multiples of %d: %s",
                        len(odd), 128 if quantize in ALL_BLOCKS_FORMATS else 16,
                        ", ".join(odd[:4]) + (", ..." if len(odd) > 4 else ""))
        return plan
    if fmt.svdquant is not None:
        if not isinstance(ckpt, svdquant.SplitFusedCheckpoint):
            ckpt = svdquant.SplitFusedCheckpoint(ckpt, fmt.svdquant, linears)
        return svdquant.plan_layers(fmt.svdquant, ckpt, linears)
    if fmt.modelopt is not None:
        return modelopt.plan_layers(fmt.modelopt, ckpt, linears)
    return {name: UNQUANTIZED for name in linears}


__all__ = ["Checkpoint", "DetectedFormat", "LOAD_TIME_FORMATS", "detect", "loading_source", "open_checkpoint",
           "plan_for"]
