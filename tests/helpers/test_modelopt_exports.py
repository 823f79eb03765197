"""Smoke tests of the ModelOpt export helper (CPU; about 15-30 s on 2 cores, 18 exports)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("modelopt")

from tests.helpers.modelopt_exports import (ADAPTER_NAMES, ALGOS, build_tiny_model, cached_modelopt_export,
                                            cpu_fake_quant, fp4_fake_quant_block_cpu, make_modelopt_export)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("adapter_name", ADAPTER_NAMES)
def test_export_config_and_outputs(adapter_name, algo, tmp_path):
    export = make_modelopt_export(adapter_name, algo, tmp_path / "export")

    assert (export.path / "diffusion_pytorch_model.safetensors").is_file()
    qc = json.loads((export.path / "config.json").read_text())["quantization_config"]
    assert qc["quant_algo"] == algo
    assert qc["quant_method"] == "modelopt" and qc["producer"]["name"] == "modelopt"
    if algo == "MIXED_PRECISION":
        assert {layer["quant_algo"] for layer in qc["quantized_layers"].values()} == {"FP8", "NVFP4"}

    assert export.bf16_output.dtype == export.fakequant_output.dtype == torch.float32
    assert export.bf16_output.shape == export.fakequant_output.shape
    assert 1e-4 < rel_l2(export.fakequant_output, export.bf16_output) < 0.5


def _dequantize_nvfp4(sd: dict[str, torch.Tensor], layer: str) -> torch.Tensor:
    codes = sd[f"{layer}.weight"]  # uint8 [N, K/2], element 2j in the low nibble
    nibbles = torch.stack([codes & 0xF, codes >> 4], dim=-1).flatten(1).long()
    magnitudes = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    values = magnitudes[nibbles & 7] * (1 - 2 * (nibbles >> 3))
    scales = sd[f"{layer}.weight_scale"].float().repeat_interleave(16, dim=1)
    # e2m1 * (block scale * global scale) is the order of ModelOpt's fake quant; (e2m1 * block scale)
    # * global scale differs by one BF16 ulp in about 3% of the weights.
    return values * (scales * sd[f"{layer}.weight_scale_2"])


@pytest.mark.parametrize("adapter_name", ADAPTER_NAMES)
def test_weight_only_export_reproduces_fakequant_output(adapter_name):
    """Dequantized W4A16_NVFP4 weights in the BF16 model give fakequant_output bit for bit: the
    reference matches the checkpoint as written (after the export's q/k/v amax unification)."""
    export = cached_modelopt_export(adapter_name, "W4A16_NVFP4")
    sd = load_file(export.path / "diffusion_pytorch_model.safetensors")
    adapter, model = build_tiny_model(adapter_name)
    state = {k: v for k, v in sd.items() if not k.endswith((".weight_scale", ".weight_scale_2"))}
    for key, value in sd.items():
        if key.endswith(".weight") and value.dtype == torch.uint8:
            state[key] = _dequantize_nvfp4(sd, key.removesuffix(".weight")).to(torch.bfloat16)
    model.load_state_dict(state)
    with torch.no_grad():
        out = adapter.output_tensor(model(**export.inputs)).float()
    assert torch.equal(out, export.fakequant_output)


def test_cached_export_is_shared():
    assert cached_modelopt_export("flux", "FP8") is cached_modelopt_export("flux", "FP8")
    assert (cached_modelopt_export("flux", "FP8").path / "config.json").is_file()


def test_fp4_stand_in_rounding():
    # global_amax = 6 * 448 makes the block step exactly 1 (the block amax is 6).
    x = torch.tensor([0.25, 0.26, 0.74, 0.75, 1.25, 1.26, 1.74, 1.75, 2.5, 2.6, 3.4, 3.5, 5.0, 5.1, -0.75, 6.0])
    expected = torch.tensor([0.0, 0.5, 0.5, 1.0, 1.0, 1.5, 1.5, 2.0, 2.0, 3.0, 3.0, 4.0, 4.0, 6.0, -1.0, 6.0])
    assert torch.equal(fp4_fake_quant_block_cpu(x[None], torch.tensor(6.0 * 448.0))[0], expected)
    # An all-zero block keeps step 1 and stays zero; a partial last block is padded, not dropped.
    y = torch.cat([torch.zeros(16), torch.full((5,), 3.0)]).to(torch.bfloat16)
    out = fp4_fake_quant_block_cpu(y, torch.tensor(3.0))
    assert out.dtype == torch.bfloat16 and out.shape == y.shape
    assert torch.equal(out, y)


def test_stand_in_only_inside_context():
    from modelopt.torch.quantization import tensor_quant

    original = tensor_quant.dynamic_block_quantize_op
    with cpu_fake_quant():
        assert tensor_quant.dynamic_block_quantize_op is not original
    assert tensor_quant.dynamic_block_quantize_op is original
