"""Locating a checkpoint on disk and validating its files: qdit.formats.checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import qdit
from qdit.errors import CheckpointError
from qdit.formats import checkpoint as checkpoint_mod
from qdit.formats.checkpoint import open_checkpoint, resolve_transformer_folder

SAFETENSORS = "diffusion_pytorch_model.safetensors"


def _split_safetensors(path: Path) -> tuple[int, bytes, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return n, raw[8:8 + n], raw[8 + n:]


def _write_safetensors_raw(path: Path, header: bytes, body: bytes) -> None:
    path.write_bytes(struct.pack("<Q", len(header)) + header + body)


# ---------------------------------------------------------------------------------------------
# Folder resolution
# ---------------------------------------------------------------------------------------------


def test_pipeline_folder_resolves_to_transformer_subfolder(flux_bf16, tmp_path):
    pipe = tmp_path / "pipe"
    pipe.mkdir()
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline",
                                                       "transformer": ["diffusers", "FluxTransformer2DModel"]}))
    shutil.copytree(flux_bf16, pipe / "transformer")
    (pipe / "vae").mkdir()

    assert resolve_transformer_folder(pipe) == pipe / "transformer"
    ckpt = open_checkpoint(pipe)
    assert ckpt.folder == pipe / "transformer"
    assert ckpt.config_file == pipe / "transformer" / "config.json"
    assert ckpt.class_name == "FluxTransformer2DModel"
    assert ckpt.files == [pipe / "transformer" / SAFETENSORS]
    assert set(ckpt.tensors) == set(load_file(str(flux_bf16 / SAFETENSORS)))
    model = qdit.load_transformer(pipe)
    assert type(model).__name__ == "FluxTransformer2DModel"


def test_transformer_folder_resolves_to_itself(flux_bf16):
    assert resolve_transformer_folder(flux_bf16) == flux_bf16
    assert resolve_transformer_folder(str(flux_bf16)) == flux_bf16


def test_pipeline_folder_without_transformer_subfolder(tmp_path):
    pipe = tmp_path / "pipe"
    pipe.mkdir()
    (pipe / "model_index.json").write_text("{}")
    (pipe / "vae").mkdir()
    with pytest.raises(CheckpointError, match="no transformer/ subfolder") as exc:
        open_checkpoint(pipe)
    assert exc.value.file == str(pipe / "model_index.json")
    assert str(pipe / "model_index.json") in str(exc.value)


def test_nonexistent_path(tmp_path):
    missing = tmp_path / "does-not-exist"
    with pytest.raises(CheckpointError, match="does not exist") as exc:
        qdit.load_transformer(missing)
    assert exc.value.file == str(missing)
    assert str(missing) in str(exc.value)


def test_file_instead_of_folder(flux_bf16):
    f = flux_bf16 / SAFETENSORS
    with pytest.raises(CheckpointError, match="expected a folder, found a file") as exc:
        open_checkpoint(f)
    assert exc.value.file == str(f)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a chmod 000 folder anyway")
def test_unreadable_folder(flux_bf16, tmp_path):
    folder = tmp_path / "locked"
    shutil.copytree(flux_bf16, folder)
    folder.chmod(0)
    try:
        with pytest.raises(CheckpointError, match="not readable") as exc:
            open_checkpoint(folder)
        assert exc.value.file == str(folder)
    finally:
        folder.chmod(0o755)


def test_unreadable_folder_reported_when_access_is_denied(flux_bf16, monkeypatch):
    """The same check as above, made to fail without needing a non-root user."""
    real_access = os.access
    monkeypatch.setattr(checkpoint_mod.os, "access",
                        lambda p, mode: False if Path(p) == flux_bf16 else real_access(p, mode))
    with pytest.raises(CheckpointError, match="checkpoint folder is not readable") as exc:
        open_checkpoint(flux_bf16)
    assert exc.value.file == str(flux_bf16)
    assert "permissions" in str(exc.value)


# ---------------------------------------------------------------------------------------------
# config.json
# ---------------------------------------------------------------------------------------------


def test_no_config_json(flux_bf16, ckpt_variant):
    folder = ckpt_variant(flux_bf16)
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json") as exc:
        qdit.load_transformer(folder)
    assert exc.value.file == str(folder)


def test_config_json_not_valid_json(flux_bf16, ckpt_variant):
    folder = ckpt_variant(flux_bf16)
    text = (folder / "config.json").read_text()
    (folder / "config.json").write_text(text[: len(text) // 2])  # a truncated download
    with pytest.raises(CheckpointError, match="not valid JSON") as exc:
        open_checkpoint(folder)
    assert exc.value.file == str(folder / "config.json")
    assert exc.value.found  # the decoder's message (line / column)


def test_config_json_not_an_object(flux_bf16, ckpt_variant):
    """Valid JSON of the wrong shape must still be a CheckpointError naming config.json."""
    folder = ckpt_variant(flux_bf16)
    (folder / "config.json").write_text("[1, 2, 3]")
    with pytest.raises(CheckpointError) as exc:
        qdit.load_transformer(folder)
    assert exc.value.file == str(folder / "config.json")


# ---------------------------------------------------------------------------------------------
# safetensors files
# ---------------------------------------------------------------------------------------------


def test_no_safetensors_file(flux_bf16, ckpt_variant):
    folder = ckpt_variant(flux_bf16)
    (folder / SAFETENSORS).unlink()
    with pytest.raises(CheckpointError, match=r"no \.safetensors file") as exc:
        open_checkpoint(folder)
    assert exc.value.file == str(folder)


def test_several_safetensors_files_without_index(flux_bf16, ckpt_variant):
    folder = ckpt_variant(flux_bf16)
    shutil.copy(folder / SAFETENSORS, folder / "extra.safetensors")
    with pytest.raises(CheckpointError, match="several .safetensors files and no index") as exc:
        open_checkpoint(folder)
    assert "extra.safetensors" in exc.value.found and SAFETENSORS in exc.value.found


def test_truncated_to_half(flux_bf16, ckpt_variant):
    folder = ckpt_variant(flux_bf16)
    path = folder / SAFETENSORS
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    header_len, header, _ = _split_safetensors(flux_bf16 / SAFETENSORS)
    data_left = len(raw) // 2 - 8 - header_len
    entries = {k: v for k, v in json.loads(header).items() if k != "__metadata__"}
    first_cut = next(k for k, v in entries.items() if v["data_offsets"][1] > data_left)

    for call in (open_checkpoint, qdit.load_transformer, qdit.inspect):
        with pytest.raises(CheckpointError, match="truncated") as exc:
            call(folder)
        assert exc.value.file == str(path)
        assert exc.value.tensor == first_cut
        assert first_cut in str(exc.value) and str(path) in str(exc.value)
        assert exc.value.found == f"{data_left} bytes"


@pytest.mark.parametrize("size", [0, 4])
def test_truncated_below_header_length_field(flux_bf16, ckpt_variant, size):
    folder = ckpt_variant(flux_bf16)
    path = folder / SAFETENSORS
    path.write_bytes((flux_bf16 / SAFETENSORS).read_bytes()[:size])
    with pytest.raises(CheckpointError, match="shorter than its 8-byte header length") as exc:
        open_checkpoint(folder)
    assert exc.value.file == str(path)
    assert exc.value.found == f"{size} bytes"


def test_truncated_inside_header(flux_bf16, ckpt_variant):
    folder = ckpt_variant(flux_bf16)
    path = folder / SAFETENSORS
    path.write_bytes((flux_bf16 / SAFETENSORS).read_bytes()[:100])
    with pytest.raises(CheckpointError, match="header length points past the end") as exc:
        open_checkpoint(folder)
    assert exc.value.file == str(path)


def test_corrupt_header_json(flux_bf16, ckpt_variant):
    folder = ckpt_variant(flux_bf16)
    path = folder / SAFETENSORS
    n, header, body = _split_safetensors(path)
    corrupt = header[:40] + b"\x00garbage\x00" + header[49:]
    assert len(corrupt) == n
    _write_safetensors_raw(path, corrupt, body)
    with pytest.raises(CheckpointError, match="header is not valid JSON") as exc:
        qdit.load_transformer(folder)
    assert exc.value.file == str(path)


@pytest.mark.parametrize("header", [b"[]", b'{"x_embedder.weight": 5}',
                                    b'{"x_embedder.weight": {"dtype": "BF16", "shape": [64, 64]}}'],
                         ids=["list", "entry-not-object", "no-data-offsets"])
def test_header_json_of_the_wrong_structure(flux_bf16, ckpt_variant, header):
    """Parseable but malformed headers are corrupt files too: a CheckpointError naming the file."""
    folder = ckpt_variant(flux_bf16)
    path = folder / SAFETENSORS
    _write_safetensors_raw(path, header, b"\x00" * 64)
    with pytest.raises(CheckpointError) as exc:
        open_checkpoint(folder)
    assert exc.value.file == str(path)


def test_header_with_unknown_dtype_names_tensor(flux_bf16, ckpt_variant):
    folder = ckpt_variant(flux_bf16)
    path = folder / SAFETENSORS
    _, header, body = _split_safetensors(path)
    entries = json.loads(header)
    entries["proj_out.weight"]["dtype"] = "F4_E2M1"
    _write_safetensors_raw(path, json.dumps(entries).encode(), body)
    with pytest.raises(CheckpointError, match="dtype qdit does not read") as exc:
        open_checkpoint(folder)
    assert exc.value.file == str(path)
    assert exc.value.tensor == "proj_out.weight"
    assert exc.value.found == "F4_E2M1"


# ---------------------------------------------------------------------------------------------
# Sharded checkpoints
# ---------------------------------------------------------------------------------------------

SHARDS = ("diffusion_pytorch_model-00001-of-00002.safetensors", "diffusion_pytorch_model-00002-of-00002.safetensors")
INDEX = "diffusion_pytorch_model.safetensors.index.json"


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _shard(src: Path, dst: Path) -> dict[str, str]:
    """Copy checkpoint `src` to `dst` with its tensors split over two files and an index."""
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    tensors = load_file(str(src / SAFETENSORS))
    names = sorted(tensors)
    halves = (names[: len(names) // 2], names[len(names) // 2:])
    weight_map = {}
    for shard, part in zip(SHARDS, halves):
        save_file({k: tensors[k] for k in part}, str(dst / shard), metadata={"format": "pt"})
        weight_map.update({k: shard for k in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (dst / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return weight_map


def test_sharded_checkpoint_matches_single_file(flux_nvfp4, flux_forward, tmp_path):
    sharded = tmp_path / "sharded"
    weight_map = _shard(flux_nvfp4, sharded)

    ckpt = open_checkpoint(sharded)
    assert ckpt.files == [sharded / s for s in SHARDS]
    assert {k: v.file.name for k, v in ckpt.tensors.items()} == weight_map

    single = qdit.load_transformer(flux_nvfp4)
    split = qdit.load_transformer(sharded)
    assert split.qdit_load_report.tensors_read == single.qdit_load_report.tensors_read == len(weight_map)
    single_state, split_state = single.state_dict(), split.state_dict()
    assert single_state.keys() == split_state.keys()
    for k in single_state:
        assert torch.equal(_bytes(single_state[k]), _bytes(split_state[k])), k
    out_single, out_split = flux_forward(single), flux_forward(split)
    assert torch.equal(out_single, out_split)
    assert torch.isfinite(out_single).all()


def test_index_naming_a_missing_shard(flux_bf16, tmp_path):
    sharded = tmp_path / "sharded"
    _shard(flux_bf16, sharded)
    (sharded / SHARDS[1]).unlink()
    with pytest.raises(CheckpointError, match="shard named by the index is missing") as exc:
        qdit.load_transformer(sharded)
    assert exc.value.file == str(sharded / SHARDS[1])
    assert INDEX in exc.value.hint


def test_index_without_weight_map(flux_bf16, tmp_path):
    sharded = tmp_path / "sharded"
    _shard(flux_bf16, sharded)
    (sharded / INDEX).write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match="no weight_map") as exc:
        open_checkpoint(sharded)
    assert exc.value.file == str(sharded / INDEX)


def test_tensor_in_two_shards(flux_bf16, tmp_path):
    sharded = tmp_path / "sharded"
    weight_map = _shard(flux_bf16, sharded)
    first = load_file(str(sharded / SHARDS[0]))
    dup = next(iter(sorted(first)))
    second = load_file(str(sharded / SHARDS[1]))
    second[dup] = first[dup]
    save_file(second, str(sharded / SHARDS[1]), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="tensor appears in two files") as exc:
        open_checkpoint(sharded)
    assert exc.value.tensor == dup
    assert SHARDS[0] in exc.value.file and SHARDS[1] in exc.value.file
    assert weight_map[dup] == SHARDS[0]
