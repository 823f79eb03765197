"""`qdit quantize` round trip: the written ModelOpt export loads back and computes what load-time
quantization computes, with ModelOpt's own field and key names."""

import json

import pytest
import torch
from safetensors.torch import load_file

import qdit
from qdit.models import adapter_by_name
from qdit.tools.embedded import random_model, write_bf16_checkpoint
from qdit.tools.quantize import quantize_checkpoint

KEYS = {
    "nvfp4": {"weight", "weight_scale", "weight_scale_2", "input_scale"},
    "nvfp4_svd": {"weight", "weight_scale", "weight_scale_2", "input_scale", "pre_quant_scale",
                  "svdquant_lora_a", "svdquant_lora_b"},
    "fp8": {"weight", "weight_scale", "input_scale"},
    "fp8_per_channel": {"weight", "weight_scale"},
}
ALGO = {"nvfp4": "NVFP4", "nvfp4_svd": "NVFP4_SVD", "fp8": "FP8", "fp8_per_channel": "FP8_PER_CHANNEL_PER_TOKEN"}


@pytest.fixture(scope="module")
def bf16_flux(tmp_path_factory):
    return write_bf16_checkpoint(random_model("flux", seed=3), tmp_path_factory.mktemp("flux-bf16"))


@pytest.mark.parametrize("fmt", sorted(KEYS))
def test_round_trip(bf16_flux, tmp_path, fmt):
    adapter = adapter_by_name("flux")
    at_load = qdit.load_transformer(bf16_flux, quantize=fmt)
    inputs = adapter.example_inputs(dict(at_load.config), seed=5)
    dst = quantize_checkpoint(bf16_flux, tmp_path / "q", fmt, calibration_inputs=[inputs])

    config = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "modelopt" and config["producer"]["name"] == "modelopt"
    assert config["quant_algo"] == ALGO[fmt]
    assert "proj_out" in config["ignore"]
    tensors = load_file(str(dst / "diffusion_pytorch_model.safetensors"))
    suffixes = {k.rsplit(".", 1)[1] for k in tensors if k.startswith("transformer_blocks.0.attn.to_q.")}
    assert suffixes == KEYS[fmt] | {"bias"}

    loaded = qdit.load_transformer(dst)
    with torch.no_grad():
        y_export = adapter.output_tensor(loaded(**inputs)).float()
        y_at_load = adapter.output_tensor(at_load(**inputs)).float()
    rel = ((y_export - y_at_load).norm() / y_at_load.norm()).item()
    if fmt.startswith("nvfp4"):
        # Static scales calibrated on these inputs equal the dynamic per-call scales: same math.
        assert rel == 0.0
    else:
        # FP8 at load quantizes activations per token; the export has one calibrated per-tensor scale.
        assert rel < 0.05


def test_quantizing_a_quantized_checkpoint_is_an_error(bf16_flux, tmp_path):
    dst = quantize_checkpoint(bf16_flux, tmp_path / "q", "fp8")
    with pytest.raises(qdit.QditError, match="already quantized"):
        quantize_checkpoint(dst, tmp_path / "q2", "nvfp4")
