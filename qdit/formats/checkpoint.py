"""Locating a transformer checkpoint on disk and reading its safetensors headers.

Only metadata is read here (config.json and each file's header); tensors are read one at a time by
the loader. Headers are checked against the file sizes so a truncated download is caught before any
weight is created.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from qdit.errors import CheckpointError

SAFETENSORS_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "U8": torch.uint8, "I8": torch.int8,
    "I16": torch.int16, "I32": torch.int32, "I64": torch.int64, "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives and what its header says it is."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass
class Checkpoint:
    """A diffusers transformer folder: its config and the tensors of its safetensors file(s)."""

    folder: Path
    config: dict[str, Any]
    config_file: Path
    files: list[Path]
    tensors: dict[str, TensorInfo]
    file_metadata: dict[Path, dict[str, str]] = field(default_factory=dict)
    sidecar_quant_config: dict[str, Any] | None = None  # hf_quant_config.json, when present

    @property
    def class_name(self) -> str | None:
        return self.config.get("_class_name")

    def iter_tensors(self):
        """(name, tensor, file) for every tensor, file by file; one tensor in host memory at a time."""
        for file in self.files:
            names = [n for n, info in self.tensors.items() if info.file == file]
            try:
                handle = safe_open(str(file), framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error types; name the file
                raise CheckpointError("safetensors file cannot be opened", file=str(file), found=str(e),
                                      hint="the file is corrupt; download it again") from e
            with handle as f:
                for name in names:
                    yield name, f.get_tensor(name), str(file)

    def read(self, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
        """Read one tensor (memory-mapped; only this tensor is materialised)."""
        info = self.tensors[name]
        with safe_open(str(info.file), framework="pt", device=str(device)) as f:
            return f.get_tensor(name)


def resolve_transformer_folder(path: str | os.PathLike) -> Path:
    """A pipeline folder (model_index.json) resolves to its transformer/ subfolder."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError("checkpoint path does not exist", file=str(p),
                              hint="pass a diffusers transformer folder or a pipeline folder with model_index.json")
    if p.is_file():
        raise CheckpointError("expected a folder, found a file", file=str(p),
                              hint="pass the folder holding config.json and the .safetensors file(s)")
    if not os.access(p, os.R_OK | os.X_OK):
        raise CheckpointError("checkpoint folder is not readable", file=str(p), hint="check its permissions")
    if (p / "model_index.json").is_file():
        sub = p / "transformer"
        if not sub.is_dir():
            raise CheckpointError("pipeline folder has no transformer/ subfolder", file=str(p / "model_index.json"),
                                  expected="transformer/config.json beside model_index.json", found="no transformer/")
        return sub
    return p


def read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except PermissionError as e:
        raise CheckpointError("file is not readable", file=str(path), hint="check its permissions") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError("file is not valid JSON", file=str(path), found=str(e),
                              hint="the file is corrupt or truncated; download it again") from e
    if not isinstance(data, dict):
        raise CheckpointError("file does not hold a JSON object", file=str(path), expected="a JSON object",
                              found=type(data).__name__, hint="the file is corrupt; download it again")
    return data


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate one safetensors header against the file's size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError("safetensors file is truncated: shorter than its 8-byte header length",
                                      file=str(path), found=f"{size} bytes", hint="download the file again")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > size - 8:
                raise CheckpointError("safetensors header length points past the end of the file",
                                      file=str(path), expected=f"<= {size - 8} bytes of header",
                                      found=f"{header_len}", hint="the file is truncated or not safetensors; download it again")
            raw = f.read(header_len)
    except PermissionError as e:
        raise CheckpointError("safetensors file is not readable", file=str(path), hint="check its permissions") from e
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError("safetensors header is not valid JSON", file=str(path), found=str(e)[:200],
                              hint="the file is corrupt; download it again") from e
    if not isinstance(header, dict):
        raise CheckpointError("safetensors header is not a JSON object", file=str(path), found=type(header).__name__,
                              hint="the file is corrupt; download it again")
    metadata = header.pop("__metadata__", None) or {}
    data_size = size - 8 - header_len
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("shape"), list) or not (
                isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2):
            raise CheckpointError("safetensors header entry is malformed", file=str(path), tensor=name,
                                  expected="{dtype, shape: [...], data_offsets: [begin, end]}", found=str(entry)[:200],
                                  hint="the file is corrupt; download it again")
        dtype = SAFETENSORS_DTYPES.get(entry.get("dtype"))
        if dtype is None:
            raise CheckpointError("tensor has a dtype qdit does not read", file=str(path), tensor=name,
                                  expected=", ".join(SAFETENSORS_DTYPES), found=str(entry.get("dtype")))
        begin, end = entry["data_offsets"]
        if end > data_size:
            raise CheckpointError("safetensors file is truncated: a tensor's data lies past the end of the file",
                                  file=str(path), tensor=name, expected=f"{end} bytes of data",
                                  found=f"{data_size} bytes", hint="download the file again")
        tensors[name] = TensorInfo(name, path, dtype, tuple(entry["shape"]))
    return tensors, metadata


def _weight_files(folder: Path) -> list[Path]:
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise CheckpointError("more than one safetensors index in the folder", file=str(folder),
                              found=", ".join(p.name for p in indexes), hint="keep one checkpoint per folder")
    if indexes:
        index = read_json(indexes[0])
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError("safetensors index has no weight_map", file=str(indexes[0]))
        files = [folder / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise CheckpointError("a shard named by the index is missing", file=str(f),
                                      hint=f"download every shard listed in {indexes[0].name}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError("no .safetensors file in the folder", file=str(folder),
                              hint="qdit reads diffusers safetensors checkpoints")
    if len(files) > 1:
        raise CheckpointError("several .safetensors files and no index", file=str(folder),
                              found=", ".join(p.name for p in files),
                              hint="a sharded checkpoint needs its *.safetensors.index.json")
    return files


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    folder = resolve_transformer_folder(path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CheckpointError("transformer folder has no config.json", file=str(folder),
                              hint="qdit needs the diffusers config.json written beside the weights")
    config = read_json(config_file)
    sidecar_file = folder / "hf_quant_config.json"
    sidecar = read_json(sidecar_file) if sidecar_file.is_file() else None
    tensors: dict[str, TensorInfo] = {}
    metadata: dict[Path, dict[str, str]] = {}
    for f in _weight_files(folder):
        found, meta = read_safetensors_header(f)
        for name, info in found.items():
            if name in tensors:
                raise CheckpointError("tensor appears in two files", tensor=name,
                                      file=f"{tensors[name].file.name} and {f.name}")
            tensors[name] = info
        metadata[f] = meta
    return Checkpoint(folder, config, config_file, list(metadata), tensors, metadata, sidecar)
