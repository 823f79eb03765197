"""Loading converted Nunchaku SVDQuant checkpoints (qdit's canonical layout, made by `qdit convert nunchaku`).

The converted folder's quantization_config (quant_method "svdquant") names the SVDQuant W4A4 linears,
the AWQ W4A16 modulation linears and the BF16 ones. Linears Nunchaku fuses (`attn.to_qkv`,
`attn.add_qkv_proj`, `attention.to_qkv`, Z-Image `feed_forward.w3_w1`) do not exist in diffusers'
modules: `SplitFusedCheckpoint` splits them back into diffusers' separate Linears as the tensors are
read, before the strict loader sees them. Each part gets its own rows of every N-indexed tensor
(qweight, wscales, wcscales, bias, proj_up) and a copy of the K-indexed ones (smooth_factor,
proj_down) and of wtscale. That is exact: smoothing, activation quantization and the low-rank down
projection act on the input the parts share, and every output row only reads its own row of the
N-indexed tensors.

FLUX single blocks' `proj_out.linears.0/1` are two SVDQuant linears over consecutive slices of
diffusers' `proj_out` inputs (the attention output, then the MLP output), each with its own smoothing,
activation quantization and, in NVFP4, per-tensor scale; the INT4 MLP half quantizes with the GELU
shift. They are planned as parts with a k_slice; the loader replaces `proj_out` by a SplitKLinear
that sums them, which is what Nunchaku computes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from qdit.errors import CheckpointError, UnsupportedFormatError
from qdit.formats.checkpoint import Checkpoint, TensorInfo
from qdit.quant.scheme import UNQUANTIZED, LayerQuant, Scheme

QUANT_METHOD = "svdquant"
FORMAT_NAME = "nunchaku-svdquant"
PRECISIONS = {"int4": (64, Scheme.SVDQ_INT4), "nvfp4": (16, Scheme.SVDQ_NVFP4)}
ROW_TENSORS = ("qweight", "wscales", "wcscales", "bias", "proj_up")  # indexed by output row
SHARED_TENSORS = ("smooth_factor", "proj_down", "wtscale")  # indexed by input, or scalar
SPLIT_K_SUFFIXES = (".proj_out.linears.0", ".proj_out.linears.1")


@dataclass
class SVDQuantConfig:
    precision: str
    group_size: int
    rank: int
    svdquant_layers: list[str]
    awq_layers: list[str]
    bf16_layers: list[str]
    fused_rows: dict[str, list[str]] = field(default_factory=dict)
    gelu_shift_layers: set[str] = field(default_factory=set)
    source: str = ""

    @property
    def scheme(self) -> Scheme:
        return PRECISIONS[self.precision][1]


def is_svdquant(raw: dict[str, Any]) -> bool:
    return raw.get("quant_method") == QUANT_METHOD


def _names(raw: dict[str, Any], key: str, source: str) -> list[str]:
    value = raw.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise CheckpointError(f"quantization_config.{key} is not a list of layer names", file=source,
                              found=repr(value)[:100], hint="re-run `qdit convert nunchaku`")
    return list(value)


def parse_config(raw: dict[str, Any], source: str) -> SVDQuantConfig:
    """The canonical SVDQuant quantization_config `qdit convert nunchaku` writes, checked."""
    precision = raw.get("precision")
    if precision not in PRECISIONS:
        raise UnsupportedFormatError("unknown SVDQuant precision", file=source, expected=" or ".join(PRECISIONS),
                                     found=repr(precision))
    group = raw.get("group_size")
    if group != PRECISIONS[precision][0]:
        raise CheckpointError(f"group size does not match the {precision} precision", file=source,
                              expected=str(PRECISIONS[precision][0]), found=repr(group))
    rank = raw.get("rank")
    if not isinstance(rank, int) or rank <= 0 or rank % 16:
        raise CheckpointError("the low-rank rank is not a positive multiple of 16", file=source,
                              expected="a multiple of 16", found=repr(rank))
    fused = raw.get("fused_rows") or {}
    if not isinstance(fused, dict) or not all(isinstance(v, list) and v for v in fused.values()):
        raise CheckpointError("quantization_config.fused_rows is not a {fused layer: [parts]} object",
                              file=source, found=repr(fused)[:100])
    gelu = raw.get("gelu_shift") or {}
    gelu_layers = set(gelu.get("layers", [])) if isinstance(gelu, dict) else set()
    if gelu_layers and precision != "int4":
        raise CheckpointError("GELU-shift layers in an NVFP4 checkpoint", file=source,
                              expected="gelu_shift only with int4", found=", ".join(sorted(gelu_layers))[:200])
    if gelu_layers and gelu.get("value") != 0.171875:
        raise CheckpointError("unexpected GELU shift value", file=source, expected="0.171875",
                              found=repr(gelu.get("value")))
    return SVDQuantConfig(precision, group, rank, _names(raw, "svdquant_layers", source),
                          _names(raw, "awq_w4a16_layers", source), _names(raw, "bf16_layers", source),
                          {k: list(v) for k, v in fused.items()}, gelu_layers, source)


class SplitFusedCheckpoint:
    """A Checkpoint view whose fused SVDQuant linears are split into diffusers' separate Linears."""

    def __init__(self, ckpt: Checkpoint, cfg: SVDQuantConfig, linears: dict[str, tuple[int, int, bool]]):
        self._ckpt = ckpt
        self.folder, self.config, self.config_file = ckpt.folder, ckpt.config, ckpt.config_file
        self.files, self.file_metadata = ckpt.files, ckpt.file_metadata
        self.sidecar_quant_config = ckpt.sidecar_quant_config
        self.parts: dict[str, list[tuple[str, int]]] = {}
        for fused, parts in cfg.fused_rows.items():
            unknown = [p for p in parts if p not in linears]
            if unknown:
                raise CheckpointError("fused_rows names layers the model does not have", file=cfg.source,
                                      layer=fused, expected="Linears of the model", found=", ".join(unknown),
                                      hint="the checkpoint is for another model or config")
            self.parts[fused] = [(p, linears[p][1]) for p in parts]
        self.tensors: dict[str, TensorInfo] = {}
        for name, info in ckpt.tensors.items():
            for new, rows in self._map(name, info.shape, str(info.file)):
                shape = info.shape if rows is None else (rows[1] - rows[0], *info.shape[1:])
                self.tensors[new] = TensorInfo(new, info.file, info.dtype, tuple(shape))

    @property
    def class_name(self) -> str | None:
        return self._ckpt.class_name

    def _map(self, name: str, shape: tuple[int, ...], source: str) -> list[tuple[str, tuple[int, int] | None]]:
        module, _, suffix = name.rpartition(".")
        parts = self.parts.get(module)
        if parts is None:
            return [(name, None)]
        if suffix in SHARED_TENSORS:
            return [(f"{part}.{suffix}", None) for part, _ in parts]
        if suffix not in ROW_TENSORS:
            raise CheckpointError("a fused SVDQuant linear has a tensor qdit does not know", file=source,
                                  tensor=name, expected=", ".join(ROW_TENSORS + SHARED_TENSORS), found=suffix)
        total = sum(n for _, n in parts)
        if not shape or shape[0] != total:
            raise CheckpointError("a fused linear's rows do not add up to its parts", file=source, tensor=name,
                                  layer=module, expected=f"{total} rows ({' + '.join(str(n) for _, n in parts)})",
                                  found=str(list(shape)), hint="the checkpoint is for another model or config")
        out, start = [], 0
        for part, n in parts:
            out.append((f"{part}.{suffix}", (start, start + n)))
            start += n
        return out

    def iter_tensors(self):
        for name, tensor, source in self._ckpt.iter_tensors():
            for new, rows in self._map(name, tuple(tensor.shape), source):
                yield new, (tensor if rows is None else tensor[rows[0]:rows[1]].contiguous()), source

    def read(self, name, device="cpu"):
        raise NotImplementedError("SplitFusedCheckpoint streams its tensors; use iter_tensors")


def _split_k_slices(cfg: SVDQuantConfig, ckpt: SplitFusedCheckpoint, linears: dict[str, tuple[int, int, bool]],
                    split: dict[str, list[str]]) -> dict[str, tuple[int, int]]:
    """Input slice of every part of a Linear split along K (parts `<parent>.linears.<i>`, i = 0, 1, ...)."""
    slices: dict[str, tuple[int, int]] = {}
    for parent, parts in split.items():
        if parent not in linears:
            raise CheckpointError("quantization_config names layers the model does not have", file=cfg.source,
                                  layer=", ".join(parts), expected=f"parts of a Linear {parent}",
                                  found="no such Linear",
                                  hint="the checkpoint is for another model or config")
        parts.sort(key=lambda p: int(p.rpartition(".")[2]))
        expected = [f"{parent}.linears.{i}" for i in range(len(parts))]
        if parts != expected:
            raise CheckpointError("a Linear split along K does not have all its parts", file=cfg.source,
                                  layer=parent, expected=", ".join(expected), found=", ".join(parts))
        start = 0
        for part in parts:
            smooth = ckpt.tensors.get(f"{part}.smooth_factor")
            if smooth is None or len(smooth.shape) != 1:
                raise CheckpointError("an SVDQuant layer has no smooth_factor vector", file=str(ckpt.folder),
                                      tensor=f"{part}.smooth_factor", layer=part, expected="[K]", found="absent")
            slices[part] = (start, start + smooth.shape[0])
            start += smooth.shape[0]
        if start != linears[parent][0]:
            raise CheckpointError("the parts of a Linear split along K do not add up to its inputs",
                                  file=str(ckpt.folder), layer=parent, expected=f"K = {linears[parent][0]}",
                                  found=" + ".join(str(b - a) for a, b in (slices[p] for p in parts)),
                                  hint="the checkpoint is for another model or config")
    return slices


def plan_layers(cfg: SVDQuantConfig, ckpt: SplitFusedCheckpoint,
                linears: dict[str, tuple[int, int, bool]]) -> dict[str, LayerQuant]:
    """Per-Linear plan: SVDQuant W4A4 (fused layers: each part), AWQ W4A16, or BF16."""
    svdq: set[str] = set()
    split: dict[str, list[str]] = {}  # parent Linear -> its parts split along K, in input order
    for name in cfg.svdquant_layers:
        if name.endswith(SPLIT_K_SUFFIXES):
            split.setdefault(name.rpartition(".linears.")[0], []).append(name)
            continue
        svdq.update(cfg.fused_rows.get(name, [name]))
    k_slices = _split_k_slices(cfg, ckpt, linears, split)
    awq = set(cfg.awq_layers)
    unknown = sorted((svdq | awq) - set(linears))
    if unknown:
        raise CheckpointError("quantization_config names layers the model does not have", file=cfg.source,
                              layer=", ".join(unknown[:4]) + (", ..." if len(unknown) > 4 else ""),
                              expected="names of the model's Linear layers", found=f"{len(unknown)} unknown name(s)",
                              hint="the checkpoint is for another model or config")
    gelu: set[str] = set()
    for name in cfg.gelu_shift_layers:
        gelu.update(cfg.fused_rows.get(name, [name]))
    def svdq_layer(name: str, k_slice: tuple[int, int] | None = None) -> LayerQuant:
        down = ckpt.tensors.get(f"{name}.proj_down")
        rank = down.shape[1] if down is not None and len(down.shape) == 2 else cfg.rank
        return LayerQuant(cfg.scheme, lora_rank=rank, wtscale=f"{name}.wtscale" in ckpt.tensors,
                          wcscales=f"{name}.wcscales" in ckpt.tensors, gelu_shift=name in gelu, k_slice=k_slice)

    plan: dict[str, LayerQuant] = {}
    for name in linears:
        if name in split:
            for part in split[name]:
                plan[part] = svdq_layer(part, k_slices[part])
        elif name in svdq:
            plan[name] = svdq_layer(name)
        elif name in awq:
            plan[name] = LayerQuant(Scheme.AWQ_W4A16)
        else:
            plan[name] = UNQUANTIZED
    return plan


__all__ = ["FORMAT_NAME", "SVDQuantConfig", "SplitFusedCheckpoint", "is_svdquant", "parse_config", "plan_layers"]
