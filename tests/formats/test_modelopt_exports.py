"""qdit against the real producer: checkpoints exported by nvidia-modelopt from tiny diffusers DiTs.

For every quant_algo and each of the three DiTs: qdit reads the exported bytes unchanged, its
dequantized weights are the spec's formula applied to those bytes, its activation quantizers give
what ModelOpt's input quantizers give on the same tensor, and its reference-backend forward is closer
to ModelOpt's fake-quantized forward than the BF16 model is (far closer for weight-only formats).

Why end-to-end is only "closer" for formats that quantize activations (measured, see the printed
errors): ModelOpt's fake-quant forward is not computed from the bytes it exports. FP8 export rounds
W/scale to bf16 before the e4m3 cast, so 2-6 % of the exported bytes differ by one ulp from the
weights its own fake-quant forward used; and its fake-quantized activations are rounded to bf16
before the matmul. Each activation quantizer is discontinuous, so such last-bit differences flip
codes in later layers and the two forwards drift apart by an amount of the order of the quantization
noise itself. Layer by layer the math agrees (test_activation_quantizers_match_modelopt).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import qdit
from qdit.quant import numerics
from qdit.quant.layer import QuantLinear
from qdit.quant.scheme import Scheme
from tests.helpers.modelopt_exports import ADAPTER_NAMES, ALGOS, cached_modelopt_export

EXPECTED_SCHEMES = {
    "FP8": {Scheme.FP8},
    "FP8_PER_CHANNEL_PER_TOKEN": {Scheme.FP8_PER_CHANNEL},
    "NVFP4": {Scheme.NVFP4},
    "W4A16_NVFP4": {Scheme.W4A16_NVFP4},
    # SVD checkpoints also hold plain NVFP4 layers (ModelOpt's skip layers); Z-Image has none.
    "NVFP4_SVD": {Scheme.NVFP4_SVD, Scheme.NVFP4},
    "MIXED_PRECISION": {Scheme.FP8, Scheme.NVFP4},
}


def independent_dequant(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """The spec's dequantization, written from the file's tensors without qdit's method code."""
    w = tensors[f"{name}.weight"]
    if w.dtype == torch.float8_e4m3fn:
        scale = tensors[f"{name}.weight_scale"].float()
        return w.float() * (scale[:, None] if scale.ndim == 1 else scale)
    low, high = (w & 0xF).long(), (w >> 4).long()
    codes = torch.stack([low, high], dim=-1).flatten(-2)
    table = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6])
    block = tensors[f"{name}.weight_scale"].float().repeat_interleave(16, dim=1)
    return table[codes] * (block * tensors[f"{name}.weight_scale_2"].float())


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("adapter_name", ADAPTER_NAMES)
def test_modelopt_export(adapter_name, algo):
    export = cached_modelopt_export(adapter_name, algo)
    config = json.loads((export.path / "config.json").read_text())["quantization_config"]
    assert config["quant_algo"] == algo

    model = qdit.load_transformer(export.path, backend="reference")
    file_tensors = load_file(str(export.path / "diffusion_pytorch_model.safetensors"))
    quant_layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert quant_layers, "no layer was loaded quantized"
    assert {m.layer_quant.scheme for m in quant_layers} <= EXPECTED_SCHEMES[algo]
    if algo == "NVFP4_SVD":
        assert any(m.layer_quant.lora_rank for m in quant_layers)

    for layer in quant_layers:
        for name in layer.method.specs:
            stored, on_disk = layer.tensor(name), file_tensors[f"{layer.name}.{name}"]
            if stored.dtype == on_disk.dtype:
                assert torch.equal(stored.view(torch.uint8) if stored.element_size() == 1 else stored, 
                                   on_disk.view(torch.uint8) if on_disk.element_size() == 1 else on_disk), \
                    f"{layer.name}.{name} differs from the exported bytes"
        assert not numerics.e4m3_nan_mask(file_tensors[f"{layer.name}.weight_scale"]).any() \
            if file_tensors[f"{layer.name}.weight_scale"].dtype == torch.float8_e4m3fn else True
        torch.testing.assert_close(layer.method.dequantize(layer), independent_dequant(file_tensors, layer.name),
                                   rtol=0, atol=0)

    with torch.no_grad():
        out = model_output(model, adapter_name, export.inputs)
    ref = export.fakequant_output
    err_qdit = ((out - ref).norm() / ref.norm()).item()
    err_bf16 = ((export.bf16_output - ref).norm() / ref.norm()).item()
    print(f"{adapter_name} {algo}: rel. L2 to ModelOpt fake-quant: qdit reference {err_qdit:.2e}, BF16 model {err_bf16:.2e}")
    assert err_bf16 > 1e-3, "the fixture shows no quantization effect; the comparison would be meaningless"
    if algo == "W4A16_NVFP4":
        assert err_qdit < 0.1 * err_bf16
    else:
        assert err_qdit < err_bf16


@pytest.mark.parametrize("algo", ["FP8", "NVFP4"])
def test_activation_quantizers_match_modelopt(algo):
    """qdit's activation quantization of a real layer input equals ModelOpt's input quantizer output
    (up to ModelOpt's bf16 rounding of its fake-quantized result)."""
    import modelopt.torch.quantization as mtq

    from tests.helpers.modelopt_exports import build_tiny_model, cpu_fake_quant, quant_config

    adapter, model = build_tiny_model("qwen-image", 0)
    inputs = adapter.example_inputs(dict(model.config), seed=0)
    name = "transformer_blocks.2.img_mlp.net.2"
    captured = {}
    with cpu_fake_quant():
        mtq.quantize(model, quant_config(algo), lambda m: m(**inputs))
        layer = model.get_submodule(name)
        hook = layer.register_forward_pre_hook(lambda mod, args: captured.setdefault("x", args[0].detach().clone()))
        with torch.no_grad():
            model(**inputs)
        hook.remove()
        x = captured["x"]
        with torch.no_grad():
            theirs = layer.input_quantizer(x).float()
        amax = layer.input_quantizer.amax.float()
    if algo == "FP8":
        scale = amax / numerics.E4M3_MAX
        ours = numerics.fp8_quantize_static(x, scale).float() * scale
    else:
        ours = numerics.nvfp4_fake_quantize_activation(x, numerics.nvfp4_global_scale(amax))
    rel = ((ours - theirs).norm() / theirs.norm()).item()
    quant_noise = ((x.float() - theirs).norm() / theirs.norm()).item()
    print(f"{algo}: qdit vs ModelOpt input quantizer {rel:.2e} (quantization noise {quant_noise:.2e})")
    assert quant_noise > 1e-2
    assert rel < 5e-3  # bf16 rounding of ModelOpt's output


def model_output(model, adapter_name, inputs):
    from qdit.models import adapter_by_name

    return adapter_by_name(adapter_name).output_tensor(model(**inputs)).float()
