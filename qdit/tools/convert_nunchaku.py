"""`qdit convert nunchaku`: a merged Nunchaku safetensors file -> a diffusers transformer folder in
qdit's canonical SVDQuant layout (docs/nunchaku.md)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qdit.errors import CheckpointError, QditError, UnsupportedFormatError
from qdit.formats.checkpoint import read_safetensors_header
from qdit.formats.nunchaku import PRECISIONS, convert_nunchaku_tensors
from qdit.models import adapter_for_class

CANONICAL_FORMAT = "qdit-svdquant-canonical"
# Nunchaku's quantization_config weight dtype -> qdit's precision name
_WEIGHT_DTYPES = {"int4": "int4", "fp4_e2m1_all": "nvfp4"}
GELU_SHIFT = 0.171875
# INT4 down projections after a GELU: their input is quantized shifted and unsigned (docs/nunchaku.md)
_GELU_SHIFT_LAYERS = (".ff.net.2", ".ff_context.net.2", ".proj_out.linears.1", ".img_mlp.net.2", ".txt_mlp.net.2")
# fused canonical linear -> the diffusers linears whose rows it stacks, in order
_FUSED_ROWS = {
    "attn.to_qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "attn.add_qkv_proj": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
    "attention.to_qkv": ["attention.to_q", "attention.to_k", "attention.to_v"],
    "feed_forward.w3_w1": ["feed_forward.w3", "feed_forward.w1"],
}
SAFETENSORS = "diffusion_pytorch_model.safetensors"


def _json_field(metadata: dict[str, str], name: str, src: Path) -> dict[str, Any]:
    raw = metadata.get(name)
    if raw is None:
        raise CheckpointError(
            f"not a Nunchaku checkpoint: the safetensors header has no {name}", file=str(src),
            expected="a merged Nunchaku file (header metadata `config` and `quantization_config`)",
            found="header keys: " + (", ".join(sorted(metadata)) or "none"),
            hint="pass a svdq-{int4|fp4}_r*-<model>.safetensors file")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"the header's {name} is not valid JSON", file=str(src), found=str(e)) from e
    if not isinstance(value, dict):
        raise CheckpointError(f"the header's {name} is not a JSON object", file=str(src), found=type(value).__name__)
    return value


def read_nunchaku_quantization(qc: dict[str, Any], src: Path) -> tuple[str, int, int]:
    """(precision, group size, rank) from a Nunchaku quantization_config, checked."""
    if qc.get("method") != "svdquant":
        raise UnsupportedFormatError("the checkpoint's quantization method is not SVDQuant", file=str(src),
                                     expected='"method": "svdquant"', found=repr(qc.get("method")))
    weight = qc.get("weight") if isinstance(qc.get("weight"), dict) else {}
    precision = _WEIGHT_DTYPES.get(weight.get("dtype"))
    if precision is None:
        raise UnsupportedFormatError("unknown Nunchaku weight precision", file=str(src),
                                     expected=", ".join(_WEIGHT_DTYPES), found=repr(weight.get("dtype")))
    group = weight.get("group_size")
    if group != PRECISIONS[precision]:
        raise CheckpointError(f"group size does not match the {precision} precision", file=str(src),
                              expected=str(PRECISIONS[precision]), found=repr(group))
    rank = qc.get("rank")
    if not isinstance(rank, int) or rank <= 0 or rank % 16:
        raise CheckpointError("the low-rank rank is not a positive multiple of 16", file=str(src),
                              expected="a multiple of 16 (Nunchaku pads the rank to 16)", found=repr(rank))
    return precision, group, rank


def _modules_with(tensors: dict[str, torch.Tensor], suffix: str) -> set[str]:
    return {k[: -len(suffix) - 1] for k in tensors if k.endswith("." + suffix)}


def canonical_quantization_config(converted: dict[str, torch.Tensor], precision: str, group: int, rank: int,
                                  source: dict[str, Any], src_name: str) -> dict[str, Any]:
    awq = _modules_with(converted, "wzeros")
    svdq = _modules_with(converted, "qweight") - awq
    bf16 = {m for m in _modules_with(converted, "weight")
            if converted[f"{m}.weight"].ndim == 2 and converted[f"{m}.weight"].is_floating_point()}
    cfg: dict[str, Any] = {
        "quant_method": "svdquant", "format": CANONICAL_FORMAT, "version": 1,
        "precision": precision, "group_size": group, "rank": rank,
        "svdquant_layers": sorted(svdq),
        "awq_w4a16_layers": sorted(awq), "awq_group_size": 64,
        "bf16_layers": sorted(bf16),
        "fused_rows": {m: [f"{m[: -len(local)]}{part}" for part in parts]
                       for m in sorted(svdq) for local, parts in _FUSED_ROWS.items() if m.endswith("." + local)},
        "source": {"producer": "nunchaku", "file": src_name, "quantization_config": source},
    }
    if precision == "int4":
        cfg["gelu_shift"] = {"value": GELU_SHIFT, "layers": sorted(m for m in svdq if m.endswith(_GELU_SHIFT_LAYERS))}
    return cfg


def convert_nunchaku_checkpoint(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    src, dst = Path(src), Path(dst)
    if src.is_dir():
        legacy = (src / "transformer_blocks.safetensors").is_file()
        raise CheckpointError(
            "the older two-file Nunchaku folder is not supported yet" if legacy else "expected a .safetensors file",
            file=str(src), found="a folder",
            hint="pass the merged single-file Nunchaku checkpoint (svdq-*.safetensors)")
    if not src.is_file():
        raise CheckpointError("checkpoint file does not exist", file=str(src))
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise QditError(f"{dst} exists and is not an empty folder; choose a new output folder")
    _, metadata = read_safetensors_header(src)
    qc = _json_field(metadata, "quantization_config", src)
    config = _json_field(metadata, "config", src)
    adapter_for_class(config.get("_class_name"), source=f"{src} (header config)")
    precision, group, rank = read_nunchaku_quantization(qc, src)

    # One module at a time, so that only the output and one module's stored tensors are in memory.
    converted: dict[str, torch.Tensor] = {}
    with safe_open(str(src), framework="pt", device="cpu") as f:
        modules: dict[str, list[str]] = {}
        for name in f.keys():
            modules.setdefault(name.rpartition(".")[0], []).append(name)
        for names in modules.values():
            try:
                converted.update(convert_nunchaku_tensors({n: f.get_tensor(n) for n in names},
                                                          precision=precision, group_size=group))
            except CheckpointError as e:  # name the file, which the tensor-level converter does not know
                if e.file is not None:
                    raise
                raise type(e)(e.problem, file=str(src), tensor=e.tensor, layer=e.layer, expected=e.expected,
                              found=e.found, hint=e.hint) from e
    for name, t in converted.items():
        if name.endswith(".proj_down") and t.shape[1] != rank:
            raise CheckpointError("a layer's rank differs from the quantization_config's", file=str(src),
                                  tensor=name, expected=str(rank), found=str(t.shape[1]))

    config["quantization_config"] = canonical_quantization_config(converted, precision, group, rank, qc, src.name)
    dst.mkdir(parents=True, exist_ok=True)
    save_file(converted, str(dst / SAFETENSORS), metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return dst


def inspect_nunchaku_file(src: str | os.PathLike) -> dict[str, Any]:
    """What `qdit.inspect` reports for a merged Nunchaku file, from its header alone (no tensor is read)."""
    src = Path(src)
    tensors, metadata = read_safetensors_header(src)
    qc = _json_field(metadata, "quantization_config", src)
    config = _json_field(metadata, "config", src)
    adapter = adapter_for_class(config.get("_class_name"), source=f"{src} (header config)")
    precision, group, rank = read_nunchaku_quantization(qc, src)
    modules: dict[str, set[str]] = {}
    for name in tensors:
        module, _, leaf = name.rpartition(".")
        modules.setdefault(module, set()).add(leaf)
    layers = {}
    for module, leaves in sorted(modules.items()):
        if "wzeros" in leaves:
            layers[module] = "awq_w4a16"
        elif "qweight" in leaves:
            layers[module] = f"svdq_{precision}+r{rank}"
        elif "weight" in leaves and tensors[f"{module}.weight"].dtype.is_floating_point \
                and len(tensors[f"{module}.weight"].shape) == 2:
            layers[module] = "bf16"
    bytes_by_dtype: dict[str, int] = {}
    elements = 0
    for info in tensors.values():
        n = 1
        for d in info.shape:
            n *= d
        elements += n
        key = str(info.dtype).replace("torch.", "")
        bytes_by_dtype[key] = bytes_by_dtype.get(key, 0) + n * info.dtype.itemsize
    counts: dict[str, int] = {}
    for scheme in layers.values():
        counts[scheme] = counts.get(scheme, 0) + 1
    return {
        "path": str(src), "model": adapter.name, "class_name": adapter.class_name,
        "format": "nunchaku", "quant_algo": f"SVDQuant W4A4 {precision} (group {group}, rank {rank})",
        "producer": {"name": "nunchaku"}, "files": [str(src)],
        "layers": layers, "scheme_counts": counts,
        "excluded": sorted(m for m, s in layers.items() if s == "bf16"),
        "bytes_by_dtype": bytes_by_dtype, "total_bytes": sum(bytes_by_dtype.values()),
        "parameter_count": None,  # logical sizes need the conversion (Nunchaku stores padded, fused layers)
        "stored_elements": elements,
    }
