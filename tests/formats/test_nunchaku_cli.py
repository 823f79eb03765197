"""`qdit convert nunchaku SRC DST` on a small merged Nunchaku file packed by DeepCompressor."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import qdit
from qdit.cli import main
from qdit.models import adapter_by_name

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


def test_legacy_folder_and_nonempty_output(merged_int4, tmp_path, capsys):
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "transformer_blocks.safetensors").write_bytes(b"")
    assert "two-file" in _fails(capsys, "convert", "nunchaku", str(legacy), str(tmp_path / "o"))
    src, _ = merged_int4
    assert "not an empty folder" in _fails(capsys, "convert", "nunchaku", str(src), str(legacy))


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
