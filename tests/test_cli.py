"""`qdit <verb>` through qdit.cli.main: inspect, quantize, demo, and error exit codes."""

from __future__ import annotations

import json
import re

import pytest
from safetensors.torch import load_file

from qdit.cli import main

SAFETENSORS = "diffusion_pytorch_model.safetensors"


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_inspect_text(flux_nvfp4, capsys):
    code, out, err = _run(capsys, "inspect", str(flux_nvfp4))
    assert code == 0
    assert out.splitlines()[0] == str(flux_nvfp4)
    assert re.search(r"^\s+format\s+modelopt / NVFP4$", out, re.M)
    assert re.search(r"^\s+model\s+flux \(FluxTransformer2DModel\)$", out, re.M)
    assert re.search(r"^\s+producer\s+modelopt 0\.47\.0$", out, re.M)
    assert "Linear layers by scheme: bf16 12, nvfp4 24" in out
    assert "kept in BF16 (12): context_embedder, norm_out.linear, proj_out" in out


def test_inspect_text_bf16(flux_bf16, capsys):
    code, out, _ = _run(capsys, "inspect", str(flux_bf16))
    assert code == 0
    assert re.search(r"^\s+format\s+bf16$", out, re.M)
    assert "producer" not in out and "kept in BF16" not in out


def test_inspect_json(flux_fp8, flux_bf16, capsys):
    code, out, _ = _run(capsys, "inspect", "--json", str(flux_fp8))
    assert code == 0
    info = json.loads(out)
    for key in ("format", "quant_algo", "layers", "excluded", "bytes_by_dtype", "parameter_count"):
        assert key in info
    assert (info["format"], info["quant_algo"]) == ("modelopt", "FP8")
    assert info["layers"]["transformer_blocks.0.attn.to_q"] == "fp8"
    assert info["layers"]["proj_out"] == "bf16"
    assert len(info["layers"]) == 36
    assert info["excluded"] == sorted(n for n, s in info["layers"].items() if s == "bf16")
    assert "single_transformer_blocks.1.proj_out" in info["excluded"]

    tensors = load_file(str(flux_fp8 / SAFETENSORS))
    expected_bytes: dict[str, int] = {}
    for t in tensors.values():
        key = str(t.dtype).replace("torch.", "")
        expected_bytes[key] = expected_bytes.get(key, 0) + t.numel() * t.element_size()
    assert info["bytes_by_dtype"] == expected_bytes
    assert info["total_bytes"] == sum(expected_bytes.values())
    bf16_elements = sum(t.numel() for t in load_file(str(flux_bf16 / SAFETENSORS)).values())
    assert info["parameter_count"] == bf16_elements  # the logical model, whatever the storage


def test_quantize_then_inspect(flux_bf16, tmp_path, capsys):
    dst = tmp_path / "fp8-from-cli"
    code, out, _ = _run(capsys, "quantize", str(flux_bf16), str(dst), "--format", "fp8")
    assert code == 0
    assert out.strip() == f"wrote {dst}"
    assert (dst / "config.json").is_file() and (dst / SAFETENSORS).is_file()

    code, out, _ = _run(capsys, "inspect", "--json", str(dst))
    assert code == 0
    info = json.loads(out)
    assert (info["format"], info["quant_algo"]) == ("modelopt", "FP8")
    assert info["scheme_counts"] == {"bf16": 12, "fp8": 24}
    assert info["bytes_by_dtype"]["float8_e4m3fn"] > 0
    assert info["producer"]["name"] == "modelopt"


def test_quantize_every_block_linear(flux_bf16, tmp_path, capsys):
    """--quantize-layers blocks: the single blocks' proj_out (BF16 in ModelOpt's recipe) is quantized too,
    and the export's ignore list names only what stays BF16."""
    dst = tmp_path / "fp8-blocks"
    code, _, _ = _run(capsys, "quantize", str(flux_bf16), str(dst), "--format", "fp8", "--quantize-layers", "blocks")
    assert code == 0
    code, out, _ = _run(capsys, "inspect", "--json", str(dst))
    info = json.loads(out)
    assert info["scheme_counts"] == {"bf16": 10, "fp8": 26}
    ignore = json.loads((dst / "config.json").read_text())["quantization_config"]["ignore"]
    assert "single_transformer_blocks.0.proj_out" not in ignore and "proj_out" in ignore


def test_quantize_rejects_an_unknown_format(flux_bf16, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["quantize", str(flux_bf16), str(tmp_path / "x"), "--format", "int3"])
    assert exc.value.code == 2
    assert "invalid choice: 'int3'" in capsys.readouterr().err


def test_quantize_an_already_quantized_checkpoint(flux_fp8, tmp_path, capsys):
    code, out, err = _run(capsys, "quantize", str(flux_fp8), str(tmp_path / "again"), "--format", "nvfp4")
    assert code == 2
    assert err.startswith("qdit: error: ")
    assert "already quantized" in err
    assert not (tmp_path / "again").exists()


@pytest.mark.parametrize("verb", [["inspect"], ["inspect", "--json"]])
def test_bad_path_exits_2_naming_it(tmp_path, capsys, verb):
    bad = tmp_path / "no" / "such" / "checkpoint"
    code, out, err = _run(capsys, *verb, str(bad))
    assert code == 2
    assert out == ""
    assert err.startswith("qdit: error: checkpoint path does not exist")
    assert f"file: {bad}" in err


def test_demo_prints_a_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QDIT_CACHE", str(tmp_path / "cache"))
    code, out, _ = _run(capsys, "demo", "--model", "flux", "--formats", "fp8,nvfp4", "--device", "cpu")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("embedded flux checkpoint")
    assert str(tmp_path / "cache") in lines[0]
    header = lines[1].split()
    assert header[:2] == ["format", "backends"] and header[-4:] == ["rel.", "error", "vs", "BF16"]
    rows = {line.split()[0]: line.split() for line in lines[2:4]}
    assert set(rows) == {"fp8", "nvfp4"}
    for fmt, row in rows.items():
        assert row[1] == "reference:24"
        error = float(row[-1])
        assert 0.0 < error < 0.5, (fmt, error)
    assert float(rows["fp8"][-1]) < float(rows["nvfp4"][-1])  # 8-bit is closer to BF16 than 4-bit
    assert re.match(r"transformer: [\d,]+ parameters, [\d.]+ KB in BF16", lines[4])
    assert len(lines) == 5


def test_generate_cuda_graph_on_a_cpu_is_a_clear_error(capsys, tmp_path):
    """--cuda-graph reaches the pipeline loader; on a CPU it stops with an error, not a silent eager run."""
    code, _, err = _run(capsys, "generate", "--prompt", "a red circle", "--device", "cpu", "--cuda-graph",
                        "--steps", "1", "--output", str(tmp_path / "x.png"))
    assert code == 2
    assert "cuda_graph needs the transformer on a CUDA device, it is on cpu" in err
    assert not (tmp_path / "x.png").exists()
