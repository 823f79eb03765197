"""`qdit convert nunchaku`: a Nunchaku SVDQuant checkpoint -> a diffusers transformer folder in qdit's
canonical SVDQuant layout (docs/nunchaku.md).

Two stored layouts are read: the merged single file (its header carries `config` and
`quantization_config`) and the older two-file folder (`transformer_blocks.safetensors` next to
`unquantized_layers.safetensors`, read as the union of both, usually without a config). `--base`
supplies the diffusers transformer config where the checkpoint has none.
"""

from __future__ import annotations

import json
import os
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qdit.errors import CheckpointError, QditError, UnsupportedFormatError
from qdit.formats.checkpoint import TensorInfo, read_json, read_safetensors_header, resolve_transformer_folder
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
# The older Nunchaku layout: a folder holding exactly these two files, whose tensors together form the model.
LEGACY_FILES = ("transformer_blocks.safetensors", "unquantized_layers.safetensors")
BASE_HINT = "pass --base <transformer config.json or pipeline folder>"
# Low-rank down projections, v1 and v0 names; stored [K, r] (spec section 1), so the rank is shape[1].
_RANK_TENSORS = (".proj_down", ".lora_down")


# ---------------------------------------------------------------------------------------------
# Reading the stored checkpoint (headers only)
# ---------------------------------------------------------------------------------------------

@dataclass
class NunchakuSource:
    """A Nunchaku checkpoint as stored: one merged file, or the legacy two-file folder.

    tensors: every tensor name -> its header entry in each file that holds it (two entries only for a
    name stored in both files of a legacy folder; their contents must agree).
    """

    path: Path
    files: list[Path]
    tensors: dict[str, list[TensorInfo]]
    metadata: dict[Path, dict[str, str]]

    @property
    def legacy(self) -> bool:
        return len(self.files) > 1

    def first(self) -> dict[str, TensorInfo]:
        return {name: infos[0] for name, infos in self.tensors.items()}


def is_legacy_nunchaku_folder(path: str | os.PathLike) -> bool:
    """A folder holding either of the legacy files (so that an incomplete one gets the legacy error)."""
    path = Path(path)
    return path.is_dir() and any((path / name).is_file() for name in LEGACY_FILES)


def _legacy_files(folder: Path) -> list[Path]:
    files = [folder / name for name in LEGACY_FILES]
    if all(f.is_file() for f in files):
        return files
    missing = [f.name for f in files if not f.is_file()]
    listing = sorted(p.name for p in folder.iterdir())
    found = ", ".join(listing[:10]) + (", ..." if len(listing) > 10 else "") if listing else "an empty folder"
    if len(missing) < len(files):
        raise CheckpointError("incomplete legacy two-file Nunchaku folder", file=str(folder),
                              expected=" and ".join(LEGACY_FILES), found=found,
                              hint=f"put {missing[0]} of the same checkpoint next to the other file, "
                                   "or pass the merged svdq-*.safetensors file")
    raise CheckpointError("not a Nunchaku checkpoint", file=str(folder),
                          expected="a merged .safetensors file, or a folder with " + " and ".join(LEGACY_FILES),
                          found=found, hint="pass the merged svdq-*.safetensors file or the legacy folder")


def open_nunchaku_source(src: str | os.PathLike) -> NunchakuSource:
    """Read the header(s) of a merged Nunchaku file or a legacy two-file folder; no tensor is read."""
    src = Path(src)
    if src.is_dir():
        files = _legacy_files(src)
    elif src.is_file():
        files = [src]
    else:
        raise CheckpointError("checkpoint file does not exist", file=str(src))
    tensors: dict[str, list[TensorInfo]] = {}
    metadata: dict[Path, dict[str, str]] = {}
    for f in files:
        infos, metadata[f] = read_safetensors_header(f)
        for name, info in infos.items():
            tensors.setdefault(name, []).append(info)
    for name, infos in tensors.items():
        for other in infos[1:]:
            if (other.dtype, other.shape) != (infos[0].dtype, infos[0].shape):
                _raise_duplicate_differs(name, infos[0], other, "; ".join(
                    f"{i.file.name}: {str(i.dtype).replace('torch.', '')} {list(i.shape)}" for i in (infos[0], other)))
    return NunchakuSource(src, files, tensors, metadata)


def _raise_duplicate_differs(name: str, first: TensorInfo, other: TensorInfo, found: str):
    raise CheckpointError(
        "a tensor is stored in both files of the legacy folder with different contents",
        file=f"{first.file} and {other.file}", tensor=name,
        expected="identical copies (or the tensor in one file only)", found=found,
        hint="the folder mixes files of different checkpoints; download both files again")


def _parse_json_object(raw: str, what: str, where: Path) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{what} is not valid JSON", file=str(where), found=str(e)) from e
    if not isinstance(value, dict):
        raise CheckpointError(f"{what} is not a JSON object", file=str(where), found=type(value).__name__)
    return value


def _header_json(source: NunchakuSource, name: str) -> tuple[dict[str, Any], Path] | None:
    """The header metadata entry `name` as a JSON object and the file holding it; None where no file has it.
    A legacy folder whose two files both carry it must carry the same value."""
    found = [(_parse_json_object(meta[name], f"the header's {name}", f), f)
             for f, meta in source.metadata.items() if name in meta]
    if not found:
        return None
    for value, f in found[1:]:
        if value != found[0][0]:
            raise CheckpointError(f"the two files' header {name} entries differ", file=f"{found[0][1]} and {f}",
                                  hint="the folder mixes files of different checkpoints")
    return found[0]


def _header_keys(source: NunchakuSource) -> str:
    return ", ".join(sorted({k for meta in source.metadata.values() for k in meta})) or "none"


# ---------------------------------------------------------------------------------------------
# Precision, group size, rank
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Quantization:
    precision: str
    group: int
    rank: int
    nunchaku_config: dict[str, Any] | None  # the header's quantization_config; None when inferred

    @property
    def inferred(self) -> bool:
        return self.nunchaku_config is None


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


def _layer_ranks(tensors: dict[str, TensorInfo]) -> dict[str, int]:
    """Each low-rank down projection's rank, from its header shape [K, r] (malformed ones are left to the
    tensor converter, which names them)."""
    return {name: info.shape[1] for name, info in sorted(tensors.items())
            if name.endswith(_RANK_TENSORS) and len(info.shape) == 2}


def infer_quantization(tensors: dict[str, TensorInfo], src: Path) -> tuple[str, int, int]:
    """(precision, group size, rank) of a checkpoint without a quantization_config, from its headers:
    NVFP4 stores the SVDQuant layers' wscales as float8_e4m3fn, INT4 in the model dtype (spec section 1);
    the group size follows from the precision; the rank is proj_down's (lora_down's) second dimension."""
    awq = {name.rpartition(".")[0] for name in tensors if name.endswith(".wzeros")}  # their wscales are half
    precision = first = None
    for name, info in sorted(tensors.items()):
        module, _, leaf = name.rpartition(".")
        if leaf != "wscales" or module in awq:
            continue
        this = "nvfp4" if info.dtype == torch.float8_e4m3fn else "int4"
        if precision is None:
            precision, first = this, name
        elif this != precision:
            raise CheckpointError("the SVDQuant layers disagree on the precision (wscales dtype)",
                                  file=str(info.file), tensor=name, expected=f"{precision}, as {first}",
                                  found=f"{info.dtype} ({this})")
    ranks = _layer_ranks(tensors)
    if precision is None or not ranks:
        raise CheckpointError(
            "cannot infer the precision and rank: no SVDQuant layer (wscales without wzeros, and proj_down) found",
            file=str(src), expected="a quantization_config in the header, or Nunchaku SVDQuant tensors",
            found=f"{len(tensors)} tensors; SVDQuant wscales: {'yes' if precision else 'none'}; "
                  f"proj_down/lora_down: {len(ranks)}")
    rank_of = next(iter(ranks))
    for name, rank in ranks.items():
        if rank != ranks[rank_of]:
            raise CheckpointError("the layers' low-rank ranks differ", file=str(tensors[name].file), tensor=name,
                                  expected=f"{ranks[rank_of]}, as {rank_of}", found=str(rank),
                                  hint="every SVDQuant layer of a Nunchaku checkpoint has the same rank")
    return precision, PRECISIONS[precision], ranks[rank_of]


def resolve_quantization(source: NunchakuSource) -> Quantization:
    """From the header's quantization_config (required in a merged file), else inferred from the tensors."""
    found = _header_json(source, "quantization_config")
    if found is None and not source.legacy:
        raise CheckpointError(
            "not a Nunchaku checkpoint: the safetensors header has no quantization_config", file=str(source.path),
            expected="a merged Nunchaku file (header metadata `config` and `quantization_config`)",
            found="header keys: " + _header_keys(source), hint="pass a svdq-{int4|fp4}_r*-<model>.safetensors file")
    if found is None:
        precision, group, rank = infer_quantization(source.first(), source.path)
        return Quantization(precision, group, rank, None)
    qc, where = found
    precision, group, rank = read_nunchaku_quantization(qc, where)
    for name, r in _layer_ranks(source.first()).items():
        if r != rank:
            raise CheckpointError("a layer's rank differs from the quantization_config's",
                                  file=str(source.tensors[name][0].file), tensor=name,
                                  expected=f"{rank} (quantization_config of {where.name})", found=str(r))
    return Quantization(precision, group, rank, qc)


# ---------------------------------------------------------------------------------------------
# The transformer config: --base, else the header's
# ---------------------------------------------------------------------------------------------

def read_base_config(base: str | os.PathLike) -> tuple[dict[str, Any], Path]:
    """The diffusers transformer config from a config.json, a transformer folder holding one, or a
    pipeline folder (model_index.json and transformer/config.json)."""
    base = Path(base)
    path = base if base.is_file() else resolve_transformer_folder(base) / "config.json"
    if not path.is_file():
        raise CheckpointError("--base is neither a transformer folder nor a diffusers pipeline folder",
                              file=str(base), expected="config.json, or model_index.json and transformer/config.json",
                              found=", ".join(sorted(p.name for p in base.iterdir())) or "an empty folder",
                              hint=BASE_HINT)
    return read_json(path), path


def resolve_config(source: NunchakuSource, base: str | os.PathLike | None) -> tuple[dict[str, Any], str]:
    """(transformer config, the file it came from, for messages and the record). An explicit --base wins
    over a header config: the user asked for it, e.g. to fix a checkpoint whose header config is wrong."""
    if base is not None:
        config, path = read_base_config(base)
        return config, f"{path} (--base)"
    found = _header_json(source, "config")
    if found is None:
        raise CheckpointError(
            "the checkpoint has no transformer config", file=str(source.path),
            expected="a `config` entry in the safetensors header" +
                     (f" of {' or '.join(f.name for f in source.files)}" if source.legacy else "") + ", or --base",
            found="header keys: " + _header_keys(source), hint=BASE_HINT)
    config, where = found
    return config, f"{where} (header config)"


# ---------------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------------

def _modules_with(tensors: dict[str, torch.Tensor], suffix: str) -> set[str]:
    return {k[: -len(suffix) - 1] for k in tensors if k.endswith("." + suffix)}


def canonical_quantization_config(converted: dict[str, torch.Tensor], precision: str, group: int, rank: int,
                                  source: dict[str, Any]) -> dict[str, Any]:
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
        "source": source,
    }
    if precision == "int4":
        cfg["gelu_shift"] = {"value": GELU_SHIFT, "layers": sorted(m for m in svdq if m.endswith(_GELU_SHIFT_LAYERS))}
    return cfg


def _source_record(source: NunchakuSource, quant: Quantization, config_from: str) -> dict[str, Any]:
    """Where the conversion came from, for the output quantization_config's `source`."""
    return {"producer": "nunchaku", "file": source.path.name,
            "layout": "legacy two-file folder" if source.legacy else "merged file",
            "files": [f.name for f in source.files], "quantization_config": quant.nunchaku_config,
            "precision_inferred": quant.inferred, "config": config_from}


def _names_by_module(tensors: dict[str, list[TensorInfo]]) -> dict[str, list[str]]:
    modules: dict[str, list[str]] = {}
    for name in tensors:
        modules.setdefault(name.rpartition(".")[0], []).append(name)
    return modules


def _read_tensor(name: str, infos: list[TensorInfo], handles: dict[Path, Any]) -> torch.Tensor:
    """One stored tensor; a copy in the other legacy file must hold the same bytes."""
    tensor = handles[infos[0].file].get_tensor(name)
    for other in infos[1:]:
        if not _same_bytes(tensor, handles[other.file].get_tensor(name)):
            _raise_duplicate_differs(name, infos[0], other, "the same dtype and shape, different values")
    return tensor


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    # bytes, not values: NaN payloads compare equal to themselves, and -0.0 differs from 0.0
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def _convert_module(tensors: dict[str, torch.Tensor], quant: Quantization, files: str) -> dict[str, torch.Tensor]:
    try:
        return convert_nunchaku_tensors(tensors, precision=quant.precision, group_size=quant.group)
    except CheckpointError as e:  # name the file, which the tensor-level converter does not know
        if e.file is not None:
            raise
        raise type(e)(e.problem, file=files, tensor=e.tensor, layer=e.layer, expected=e.expected,
                      found=e.found, hint=e.hint) from e


def convert_stored_tensors(source: NunchakuSource, quant: Quantization) -> dict[str, torch.Tensor]:
    """Every stored tensor in canonical form. One module at a time (its names gathered across the files),
    so that only the output and one module's stored tensors are in memory."""
    converted: dict[str, torch.Tensor] = {}
    with ExitStack() as stack:
        handles = {f: stack.enter_context(safe_open(str(f), framework="pt", device="cpu")) for f in source.files}
        for names in _names_by_module(source.tensors).values():
            stored = {n: _read_tensor(n, source.tensors[n], handles) for n in names}
            files = " and ".join(sorted({str(source.tensors[n][0].file) for n in names}))
            converted.update(_convert_module(stored, quant, files))
    return converted


def convert_nunchaku_checkpoint(src: str | os.PathLike, dst: str | os.PathLike,
                                base: str | os.PathLike | None = None) -> Path:
    """A merged Nunchaku file or a legacy two-file folder -> a canonical diffusers transformer folder.

    base: a transformer config.json, a transformer folder or a pipeline folder; its config replaces the
    checkpoint's header config (needed when there is none, as in most legacy folders).
    """
    src, dst = Path(src), Path(dst)
    source = open_nunchaku_source(src)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise QditError(f"{dst} exists and is not an empty folder; choose a new output folder")
    quant = resolve_quantization(source)
    config, config_from = resolve_config(source, base)
    adapter_for_class(config.get("_class_name"), source=config_from)

    converted = convert_stored_tensors(source, quant)
    config["quantization_config"] = canonical_quantization_config(
        converted, quant.precision, quant.group, quant.rank, _source_record(source, quant, config_from))
    dst.mkdir(parents=True, exist_ok=True)
    save_file(converted, str(dst / SAFETENSORS), metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return dst


# ---------------------------------------------------------------------------------------------
# qdit inspect
# ---------------------------------------------------------------------------------------------

def _layer_schemes(tensors: dict[str, TensorInfo], quant: Quantization) -> dict[str, str]:
    modules: dict[str, set[str]] = {}
    for name in tensors:
        module, _, leaf = name.rpartition(".")
        modules.setdefault(module, set()).add(leaf)
    layers = {}
    for module, leaves in sorted(modules.items()):
        if "wzeros" in leaves:
            layers[module] = "awq_w4a16"
        elif "qweight" in leaves:
            layers[module] = f"svdq_{quant.precision}+r{quant.rank}"
        elif "weight" in leaves and tensors[f"{module}.weight"].dtype.is_floating_point \
                and len(tensors[f"{module}.weight"].shape) == 2:
            layers[module] = "bf16"
    return layers


def inspect_nunchaku_file(src: str | os.PathLike) -> dict[str, Any]:
    """What `qdit.inspect` reports for a merged Nunchaku file or a legacy two-file folder, from the headers
    alone (no tensor is read). A checkpoint without a config reports model and class_name None."""
    source = open_nunchaku_source(src)
    quant = resolve_quantization(source)
    found = _header_json(source, "config")
    adapter = None if found is None else adapter_for_class(found[0].get("_class_name"),
                                                           source=f"{found[1]} (header config)")
    tensors = source.first()
    layers = _layer_schemes(tensors, quant)
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
    inferred = "; inferred from the tensors" if quant.inferred else ""
    return {
        "path": str(source.path), "model": adapter and adapter.name, "class_name": adapter and adapter.class_name,
        "format": "nunchaku",
        "quant_algo": f"SVDQuant W4A4 {quant.precision} (group {quant.group}, rank {quant.rank}{inferred})",
        "producer": {"name": "nunchaku"}, "files": [str(f) for f in source.files],
        "layers": layers, "scheme_counts": counts,
        "excluded": sorted(m for m, s in layers.items() if s == "bf16"),
        "bytes_by_dtype": bytes_by_dtype, "total_bytes": sum(bytes_by_dtype.values()),
        "parameter_count": None,  # logical sizes need the conversion (Nunchaku stores padded, fused layers)
        "stored_elements": elements,
    }
