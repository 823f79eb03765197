"""`qdit convert nunchaku SRC DST` on a small merged Nunchaku file packed by DeepCompressor."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import qdit
from qdit.api import random_transformer
from qdit.cli import main
from qdit.models import adapter_by_name
from qdit.tools.convert_nunchaku import convert_nunchaku_checkpoint

from tests.helpers.nunchaku_models import CLASS_NAMES, CONFIGS, nunchaku_state_dict, write_merged_file

import deepcompressor.backend.nunchaku.utils as nunchaku_utils  # noqa: E402 (installed by .ci/run, --no-deps)

DTYPE = torch.bfloat16


def svdq_int4(n, k, r, gen, prefix):
    codes = torch.randint(-8, 8, (n, k), generator=gen)
    scales = (torch.rand(n, k // 64, generator=gen) * 0.1 + 0.01).to(DTYPE)
    weight = (codes.float() * scales.float().repeat_interleave(64, dim=1)).to(DTYPE)
    q, s, b, sm, (down, up), _ = nunchaku_utils.convert_to_nunchaku_w4x4y16_linear_weight(
        weight, scales.view(n, 1, k // 64, 1), bias=torch.randn(n, generator=gen).to(DTYPE),
        smooth=(torch.rand(k, generator=gen) + 0.5).to(DTYPE),
        lora=(torch.randn(r, k, generator=gen).to(DTYPE), torch.randn(n, r, generator=gen).to(DTYPE)))
    return {f"{prefix}.qweight": q, f"{prefix}.wscales": s, f"{prefix}.bias": b, f"{prefix}.smooth_factor": sm,
            f"{prefix}.smooth_factor_orig": sm.clone(), f"{prefix}.proj_down": down, f"{prefix}.proj_up": up}


def awq(n, k, chunks, gen, prefix):
    codes = torch.randint(0, 16, (n, k), generator=gen)
    scales = (torch.rand(n, k // 64, generator=gen) * 0.1 + 0.01).to(DTYPE)
    weight = ((codes.float() - 7) * scales.float().repeat_interleave(64, dim=1)).to(DTYPE)
    q, s, z, b = nunchaku_utils.convert_to_nunchaku_w4x16_linear_weight(
        weight, scales.view(n, 1, k // 64, 1), bias=torch.randn(n, generator=gen).to(DTYPE), adanorm_splits=chunks)
    return {f"{prefix}.qweight": q, f"{prefix}.wscales": s, f"{prefix}.wzeros": z, f"{prefix}.bias": b}


def quantization_config(rank=16, dtype="int4", group=64):
    return {"method": "svdquant", "weight": {"dtype": dtype, "scale_dtype": None, "group_size": group},
            "activation": {"dtype": dtype, "scale_dtype": None, "group_size": group}, "rank": rank}


def write_merged(path, state, qc, *, with_config=True):
    config = dict(adapter_by_name("qwen-image").tiny_config, _class_name="QwenImageTransformer2DModel")
    metadata = {"quantization_config": json.dumps(qc), "model_class": "NunchakuQwenImageTransformer2DModel"}
    if with_config:
        metadata["config"] = json.dumps(config)
    save_file(state, str(path), metadata=metadata)
    return path


@pytest.fixture
def merged_int4(tmp_path):
    gen = torch.Generator().manual_seed(0)
    state = {}
    state.update(svdq_int4(384, 128, 16, gen, "transformer_blocks.0.attn.to_qkv"))
    state.update(svdq_int4(128, 256, 16, gen, "transformer_blocks.0.img_mlp.net.2"))
    state.update(awq(6 * 128, 128, 6, gen, "transformer_blocks.0.img_mod.1"))
    state["img_in.weight"] = torch.randn(128, 64).to(DTYPE)
    state["img_in.bias"] = torch.randn(128).to(DTYPE)
    state["transformer_blocks.0.attn.norm_q.weight"] = torch.ones(32, dtype=DTYPE)
    return write_merged(tmp_path / "svdq-int4_r16-tiny.safetensors", state, quantization_config()), state


def test_convert_writes_canonical_folder(merged_int4, tmp_path, capsys):
    src, state = merged_int4
    dst = tmp_path / "out"
    assert main(["convert", "nunchaku", str(src), str(dst)]) == 0
    assert "wrote" in capsys.readouterr().out
    written = load_file(str(dst / "diffusion_pytorch_model.safetensors"))
    expected = qdit.convert_nunchaku_tensors(state, precision="int4", group_size=64)
    assert written.keys() == expected.keys()
    for name, t in expected.items():
        assert written[name].dtype == t.dtype and torch.equal(written[name], t), name
    config = json.loads((dst / "config.json").read_text())
    assert config["_class_name"] == "QwenImageTransformer2DModel"
    qc = config["quantization_config"]
    assert (qc["precision"], qc["group_size"], qc["rank"]) == ("int4", 64, 16)
    assert qc["svdquant_layers"] == ["transformer_blocks.0.attn.to_qkv", "transformer_blocks.0.img_mlp.net.2"]
    assert qc["awq_w4a16_layers"] == ["transformer_blocks.0.img_mod.1"]
    assert qc["bf16_layers"] == ["img_in"]
    assert qc["gelu_shift"]["layers"] == ["transformer_blocks.0.img_mlp.net.2"]
    assert qc["fused_rows"] == {"transformer_blocks.0.attn.to_qkv": [
        "transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v"]}
    assert qc["source"]["quantization_config"]["method"] == "svdquant"


def _fails(capsys, *argv) -> str:
    assert main(list(argv)) == 2
    return capsys.readouterr().err


def test_not_a_nunchaku_file(tmp_path, capsys):
    src = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(src))
    assert "not a Nunchaku checkpoint" in _fails(capsys, "convert", "nunchaku", str(src), str(tmp_path / "o"))


@pytest.mark.parametrize("qc,message", [
    (quantization_config(rank=20), "not a positive multiple of 16"),
    (quantization_config(dtype="int8"), "unknown Nunchaku weight precision"),
    (quantization_config(group=32), "group size"),
    ({"method": "awq"}, "not SVDQuant"),
])
def test_bad_quantization_config(tmp_path, capsys, qc, message):
    src = write_merged(tmp_path / "x.safetensors", {"img_in.weight": torch.zeros(4, 4)}, qc)
    assert message in _fails(capsys, "convert", "nunchaku", str(src), str(tmp_path / "o"))


def test_rank_disagreeing_with_tensors(merged_int4, tmp_path, capsys):
    src, state = merged_int4
    src = write_merged(tmp_path / "r32.safetensors", state, quantization_config(rank=32))
    assert "rank differs" in _fails(capsys, "convert", "nunchaku", str(src), str(tmp_path / "o"))


def test_precision_disagreeing_with_tensors(merged_int4, tmp_path, capsys):
    src, state = merged_int4
    src = write_merged(tmp_path / "fp4.safetensors", state, quantization_config(dtype="fp4_e2m1_all", group=16))
    err = _fails(capsys, "convert", "nunchaku", str(src), str(tmp_path / "o"))
    assert "wscales dtype does not match the precision" in err and f"file: {src}" in err


def test_nonempty_output(merged_int4, tmp_path, capsys):
    src, _ = merged_int4
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_bytes(b"")
    assert "not an empty folder" in _fails(capsys, "convert", "nunchaku", str(src), str(full))


def test_convert_nvfp4(tmp_path, capsys):
    n, k, r = 256, 128, 32
    gen = torch.Generator().manual_seed(1)
    table = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
    codes = torch.randint(0, 16, (n, k), generator=gen)
    sub = (torch.rand(n, k // 16, generator=gen) * 8 + 0.1).to(torch.float8_e4m3fn).to(DTYPE)
    weight = (table[codes] * sub.float().repeat_interleave(16, dim=1) * 0.5).to(DTYPE)
    q, s, b, sm, (down, up), psub = nunchaku_utils.convert_to_nunchaku_w4x4y16_linear_weight(
        weight, torch.tensor([0.5], dtype=DTYPE), bias=torch.zeros(n, dtype=DTYPE), smooth=torch.ones(k, dtype=DTYPE),
        lora=(torch.randn(r, k).to(DTYPE), torch.randn(n, r).to(DTYPE)), float_point=True,
        subscale=sub.view(n, 1, k // 16, 1))
    p = "transformer_blocks.0.attn.to_out.0"
    state = {f"{p}.qweight": q, f"{p}.wscales": psub, f"{p}.wtscale": s, f"{p}.bias": b, f"{p}.smooth_factor": sm,
             f"{p}.proj_down": down, f"{p}.proj_up": up}
    src = write_merged(tmp_path / "svdq-fp4_r32-tiny.safetensors", state,
                       quantization_config(rank=32, dtype="fp4_e2m1_all", group=16))
    assert main(["convert", "nunchaku", str(src), str(tmp_path / "out")]) == 0
    written = load_file(str(tmp_path / "out" / "diffusion_pytorch_model.safetensors"))
    assert written[f"{p}.wscales"].dtype == torch.float8_e4m3fn
    assert torch.equal(written[f"{p}.wscales"].view(torch.uint8), sub.to(torch.float8_e4m3fn).view(torch.uint8))
    assert written[f"{p}.wtscale"].item() == 0.5
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert (qc["precision"], qc["group_size"], qc["rank"]) == ("nvfp4", 16, 32) and "gelu_shift" not in qc


def test_inspect_nunchaku_file(merged_int4, tmp_path, capsys):
    src, _ = merged_int4
    info = qdit.inspect(src)
    assert info["format"] == "nunchaku" and "int4" in info["quant_algo"] and "rank 16" in info["quant_algo"]
    assert info["layers"]["transformer_blocks.0.attn.to_qkv"] == "svdq_int4+r16"
    assert info["layers"]["transformer_blocks.0.img_mod.1"] == "awq_w4a16"
    assert info["layers"]["img_in"] == "bf16"
    assert main(["inspect", str(src)]) == 0
    assert "nunchaku" in capsys.readouterr().out
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    assert "not a Nunchaku checkpoint" in _fails(capsys, "inspect", str(plain))


# ------------------------------------------------------------------------------------------------
# The older two-file folder (transformer_blocks.safetensors + unquantized_layers.safetensors) and --base
# ------------------------------------------------------------------------------------------------

BLOCKS, UNQUANTIZED = "transformer_blocks.safetensors", "unquantized_layers.safetensors"


def tiny_state(precision, rank=16):
    bf16 = random_transformer("qwen-image", config=CONFIGS["qwen-image"], dtype=DTYPE, seed=2)
    return nunchaku_state_dict("qwen-image", bf16.state_dict(), precision, rank)


def write_legacy(folder, state, *, metadata=None, shared=("img_in.weight",)):
    """The repeated blocks into transformer_blocks.safetensors, the rest into unquantized_layers.safetensors
    (no header config); the `shared` tensors are stored in both files."""
    folder.mkdir()
    blocks = {k: v.contiguous() for k, v in state.items() if k.startswith("transformer_blocks.")}
    rest = {k: v.contiguous() for k, v in state.items() if k not in blocks}
    blocks.update({k: state[k].contiguous() for k in shared})
    save_file(blocks, str(folder / BLOCKS), metadata=metadata)
    save_file(rest, str(folder / UNQUANTIZED))
    return folder


def transformer_config():
    return dict(CONFIGS["qwen-image"], _class_name=CLASS_NAMES["qwen-image"])


def write_base(tmp_path, kind):
    """--base as a config.json file, a transformer folder or a pipeline folder."""
    folder = tmp_path / "base" / ("transformer" if kind == "pipeline" else "")
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(transformer_config()))
    if kind == "pipeline":
        (tmp_path / "base" / "model_index.json").write_text(json.dumps({"_class_name": "QwenImagePipeline"}))
    return {"file": folder / "config.json", "transformer-folder": folder, "pipeline": tmp_path / "base"}[kind]


def read_output(folder):
    config = json.loads((folder / "config.json").read_text())
    return load_file(str(folder / "diffusion_pytorch_model.safetensors")), config, config.pop("quantization_config")


@pytest.mark.parametrize("precision,base_kind", [("int4", "file"), ("nvfp4", "file"), ("int4", "pipeline"),
                                                 ("int4", "transformer-folder")])
def test_legacy_folder_converts_like_the_merged_file(tmp_path, capsys, precision, base_kind):
    state = tiny_state(precision)
    merged = write_merged_file(tmp_path / "merged.safetensors", "qwen-image", state, precision, 16)
    from_merged = read_output(convert_nunchaku_checkpoint(merged, tmp_path / "from-merged"))
    legacy = write_legacy(tmp_path / "legacy", state)
    base = write_base(tmp_path, base_kind)
    assert main(["convert", "nunchaku", str(legacy), str(tmp_path / "out"), "--base", str(base)]) == 0
    assert "wrote" in capsys.readouterr().out
    tensors, config, qc = read_output(tmp_path / "out")

    assert tensors.keys() == from_merged[0].keys()
    for name, t in from_merged[0].items():
        assert tensors[name].dtype == t.dtype and tensors[name].shape == t.shape, name
        assert torch.equal(tensors[name].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), name
    assert config == from_merged[1]
    source, merged_source = qc.pop("source"), from_merged[2].pop("source")
    assert qc == from_merged[2] and (qc["precision"], qc["rank"]) == (precision, 16)
    assert merged_source["layout"] == "merged file" and not merged_source["precision_inferred"]
    assert source["layout"] == "legacy two-file folder" and source["files"] == [BLOCKS, UNQUANTIZED]
    assert source["precision_inferred"] and source["quantization_config"] is None
    config_file = tmp_path / "base" / ("transformer" if base_kind == "pipeline" else "") / "config.json"
    assert source["config"] == f"{config_file} (--base)"


def test_legacy_folder_header_quantization_config_is_used(tmp_path):
    state = tiny_state("int4")
    header_qc = quantization_config(rank=16)
    legacy = write_legacy(tmp_path / "legacy", state, metadata={"quantization_config": json.dumps(header_qc)})
    out = convert_nunchaku_checkpoint(legacy, tmp_path / "out", base=write_base(tmp_path, "file"))
    source = read_output(out)[2]["source"]
    assert not source["precision_inferred"] and source["quantization_config"] == header_qc


def test_base_wins_over_the_header_config(merged_int4, tmp_path):
    src, _ = merged_int4
    config = dict(transformer_config(), num_layers=7)
    (tmp_path / "config.json").write_text(json.dumps(config))
    out = convert_nunchaku_checkpoint(src, tmp_path / "out", base=tmp_path / "config.json")
    written = read_output(out)[1]
    assert written == config


def test_legacy_folder_without_base(tmp_path, capsys):
    legacy = write_legacy(tmp_path / "legacy", tiny_state("int4"))
    err = _fails(capsys, "convert", "nunchaku", str(legacy), str(tmp_path / "o"))
    assert "no transformer config" in err and f"file: {legacy}" in err
    assert "pass --base <transformer config.json or pipeline folder>" in err
    assert not (tmp_path / "o").exists()


def test_legacy_folder_missing_a_file(tmp_path, capsys):
    legacy = write_legacy(tmp_path / "legacy", tiny_state("int4"))
    (legacy / UNQUANTIZED).unlink()
    err = _fails(capsys, "convert", "nunchaku", str(legacy), str(tmp_path / "o"), "--base", str(tmp_path))
    assert "incomplete legacy two-file Nunchaku folder" in err
    assert f"expected: {BLOCKS} and {UNQUANTIZED}" in err and f"found: {BLOCKS}" in err


@pytest.mark.parametrize("change", ["values", "shape"])
def test_legacy_folder_conflicting_duplicate(tmp_path, capsys, change):
    state = tiny_state("int4")
    legacy = write_legacy(tmp_path / "legacy", state, shared=())
    blocks = load_file(str(legacy / BLOCKS))
    w = state["img_in.weight"]
    blocks["img_in.weight"] = w + 1 if change == "values" else w[:, :-1].contiguous()
    save_file(blocks, str(legacy / BLOCKS))
    err = _fails(capsys, "convert", "nunchaku", str(legacy), str(tmp_path / "o"),
                 "--base", str(write_base(tmp_path, "file")))
    assert "stored in both files of the legacy folder with different contents" in err
    assert f"file: {legacy / BLOCKS} and {legacy / UNQUANTIZED}" in err and "tensor: img_in.weight" in err
    assert ("different values" if change == "values" else "[128, 63]") in err


def test_legacy_folder_rank_mismatch_across_layers(tmp_path, capsys):
    state = tiny_state("int4")
    p = "transformer_blocks.1.attn.to_out.0"
    k, n = state[f"{p}.proj_down"].shape[0], state[f"{p}.proj_up"].shape[0]
    state[f"{p}.proj_down"], state[f"{p}.proj_up"] = torch.zeros(k, 32, dtype=DTYPE), torch.zeros(n, 32, dtype=DTYPE)
    legacy = write_legacy(tmp_path / "legacy", state)
    err = _fails(capsys, "convert", "nunchaku", str(legacy), str(tmp_path / "o"),
                 "--base", str(write_base(tmp_path, "pipeline")))
    assert "the layers' low-rank ranks differ" in err and f"tensor: {p}.proj_down" in err and "found: 32" in err
    assert f"file: {legacy / BLOCKS}" in err


def test_bad_base(merged_int4, tmp_path, capsys):
    src, _ = merged_int4
    (tmp_path / "empty").mkdir()
    err = _fails(capsys, "convert", "nunchaku", str(src), str(tmp_path / "o"), "--base", str(tmp_path / "empty"))
    assert "neither a transformer folder nor a diffusers pipeline folder" in err and "pass --base" in err


def test_inspect_legacy_folder(tmp_path, capsys):
    legacy = write_legacy(tmp_path / "legacy", tiny_state("nvfp4"))
    info = qdit.inspect(legacy)
    assert info["format"] == "nunchaku" and info["model"] is None
    assert info["quant_algo"] == "SVDQuant W4A4 nvfp4 (group 16, rank 16; inferred from the tensors)"
    assert info["files"] == [str(legacy / BLOCKS), str(legacy / UNQUANTIZED)]
    assert info["layers"]["transformer_blocks.0.attn.to_qkv"] == "svdq_nvfp4+r16"
    assert info["layers"]["transformer_blocks.0.img_mod.1"] == "awq_w4a16"
    assert info["layers"]["img_in"] == "bf16"
    assert main(["inspect", str(legacy)]) == 0
    assert "unknown: the checkpoint has no transformer config" in capsys.readouterr().out
