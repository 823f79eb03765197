"""The strict loader: every tensor consumed, every parameter filled, shapes and dtypes checked, NaN scale
bytes clamped (qdit.loading.loader, qdit.quant.method / methods)."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file

import qdit
from qdit.errors import CheckpointError, QditError
from qdit.formats import LOAD_TIME_FORMATS

SAFETENSORS = "diffusion_pytorch_model.safetensors"
TO_Q = "transformer_blocks.0.attn.to_q"  # NVFP4 in flux_nvfp4: weight u8 [64, 32], weight_scale f8 [64, 4]
MLP = "single_transformer_blocks.0.proj_mlp"  # NVFP4: weight_scale f8 [256, 4]


def _tensors(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / SAFETENSORS))


@pytest.fixture(scope="module")
def nvfp4_tensors(flux_nvfp4):
    return _tensors(flux_nvfp4)


def test_unedited_checkpoint_loads_every_tensor(flux_nvfp4, nvfp4_tensors):
    model = qdit.load_transformer(flux_nvfp4)
    assert model.qdit_load_report.tensors_read == len(nvfp4_tensors)
    assert model.qdit_load_report.repairs.get("e4m3_nan_scale_bytes", 0) == 0
    assert set(model.state_dict()) == set(nvfp4_tensors)


# ---------------------------------------------------------------------------------------------
# Missing, misshapen, mistyped and unexpected tensors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key, expected", [
    (f"{TO_Q}.weight_scale", "weight_scale float8_e4m3fn[64, 4]"),
    (f"{TO_Q}.weight_scale_2", "weight_scale_2 float32[]"),
    (f"{MLP}.input_scale", "input_scale float32[]"),
    (f"{TO_Q}.bias", "bias bfloat16[64]"),
])
def test_missing_tensor(flux_nvfp4, nvfp4_tensors, ckpt_variant, key, expected):
    tensors = dict(nvfp4_tensors)
    del tensors[key]
    folder = ckpt_variant(flux_nvfp4, tensors=tensors)
    with pytest.raises(CheckpointError, match=r"checkpoint is missing 1 tensor\(s\)") as exc:
        qdit.load_transformer(folder)
    e = exc.value
    layer = key.rpartition(".")[0]
    assert e.tensor == key
    assert e.layer.startswith(f"{layer} (")
    assert e.expected == expected
    assert e.found == "absent"
    assert e.file == str(folder)
    assert key in str(e)


def test_missing_tensor_of_an_unquantized_layer_reports_the_model_dtype(flux_nvfp4, nvfp4_tensors, ckpt_variant):
    """proj_out stays BF16: the message must not ask for float32 (the meta skeleton's default dtype)."""
    tensors = dict(nvfp4_tensors)
    del tensors["proj_out.bias"]
    with pytest.raises(CheckpointError, match=r"missing 1 tensor\(s\)") as exc:
        qdit.load_transformer(ckpt_variant(flux_nvfp4, tensors=tensors), dtype=torch.bfloat16)
    assert exc.value.tensor == "proj_out.bias"
    assert exc.value.layer == "proj_out (Linear)"
    assert exc.value.expected == "bias bfloat16[64]"


def test_several_missing_tensors_are_all_named(flux_nvfp4, nvfp4_tensors, ckpt_variant):
    gone = [f"{TO_Q}.input_scale", f"{MLP}.weight_scale", "proj_out.weight"]
    tensors = {k: v for k, v in nvfp4_tensors.items() if k not in gone}
    with pytest.raises(CheckpointError, match=r"missing 3 tensor\(s\)") as exc:
        qdit.load_transformer(ckpt_variant(flux_nvfp4, tensors=tensors))
    named = [exc.value.tensor] + exc.value.found.split("also missing: ")[1].rstrip(")").split(", ")
    assert sorted(named) == sorted(gone)


@pytest.mark.parametrize("key, bad_shape", [
    (f"{TO_Q}.weight_scale", (64, 2)),  # K/32 block scales: W4A8_NVFP4_FP8's layout, same dtypes
    (f"{TO_Q}.weight_scale", (4, 64)),
    (f"{TO_Q}.weight", (64, 16)),
    (f"{TO_Q}.input_scale", (1,)),
    (f"{MLP}.bias", (128,)),
    ("proj_out.weight", (64, 32)),
])
def test_wrong_shape(flux_nvfp4, nvfp4_tensors, ckpt_variant, key, bad_shape):
    tensors = dict(nvfp4_tensors)
    good = tensors[key]
    flat = good.reshape(-1)
    n = 1
    for d in bad_shape:
        n *= d
    tensors[key] = (flat[:n] if n <= flat.numel() else flat.repeat(n // flat.numel() + 1)[:n]).reshape(bad_shape)
    folder = ckpt_variant(flux_nvfp4, tensors=tensors)
    with pytest.raises(CheckpointError, match="tensor has the wrong shape") as exc:
        qdit.load_transformer(folder)
    e = exc.value
    assert e.tensor == key
    assert e.layer.startswith(key.rpartition(".")[0] + " (")
    assert e.expected == str(list(good.shape))
    assert e.found == str(list(bad_shape))
    assert e.file == str(folder / SAFETENSORS)


@pytest.mark.parametrize("key, dtype, expected", [
    (f"{TO_Q}.weight_scale", torch.bfloat16, "torch.float8_e4m3fn"),
    (f"{TO_Q}.weight_scale", torch.float32, "torch.float8_e4m3fn"),
    (f"{TO_Q}.weight_scale_2", torch.bfloat16, "torch.float32"),
    (f"{MLP}.input_scale", torch.float16, "torch.float32"),
    (f"{TO_Q}.bias", torch.float8_e4m3fn, "a 16/32-bit floating dtype"),
    ("proj_out.bias", torch.float8_e4m3fn, "a 16/32-bit float"),
])
def test_wrong_dtype(flux_nvfp4, nvfp4_tensors, ckpt_variant, key, dtype, expected):
    tensors = dict(nvfp4_tensors)
    tensors[key] = tensors[key].float().to(dtype)
    folder = ckpt_variant(flux_nvfp4, tensors=tensors)
    with pytest.raises(CheckpointError, match="tensor has the wrong dtype") as exc:
        qdit.load_transformer(folder)
    e = exc.value
    assert e.tensor == key
    assert e.layer.startswith(key.rpartition(".")[0] + " (")
    assert e.expected == expected
    assert e.found == str(dtype)
    assert e.file == str(folder / SAFETENSORS)


@pytest.mark.parametrize("key, message, layer", [
    (f"{TO_Q}.foo", "tensor this layer's scheme does not use", TO_Q),
    (f"{TO_Q}.svdquant_lora_a", "tensor this layer's scheme does not use", TO_Q),  # NVFP4, not NVFP4_SVD
    ("proj_out.weight_scale", "tensor the module does not own", "proj_out"),
    ("nonexistent_module.weight", "belongs to no module of the model", None),
])
def test_unexpected_tensor(flux_nvfp4, nvfp4_tensors, ckpt_variant, key, message, layer):
    tensors = dict(nvfp4_tensors)
    tensors[key] = torch.ones(32, dtype=torch.bfloat16)
    folder = ckpt_variant(flux_nvfp4, tensors=tensors)
    with pytest.raises(CheckpointError, match=message) as exc:
        qdit.load_transformer(folder)
    e = exc.value
    assert e.tensor == key
    assert e.file == str(folder / SAFETENSORS)
    if layer is None:
        assert e.layer is None
    else:
        assert e.layer.startswith(layer + " (")


# ---------------------------------------------------------------------------------------------
# NaN bytes in float8_e4m3fn scales
# ---------------------------------------------------------------------------------------------

# (tensor, flat byte index, NaN byte)
NAN_BYTES = [(f"{TO_Q}.weight_scale", 0, 0x7F), (f"{TO_Q}.weight_scale", 5, 0xFF), (f"{TO_Q}.weight_scale", 17, 0x7F),
             (f"{MLP}.weight_scale", 3, 0xFF), (f"{MLP}.weight_scale", 100, 0x7F)]


def _nan_records(caplog):
    return [r for r in caplog.records if r.name.startswith("qdit") and "NaN" in r.getMessage()]


def test_nan_scale_bytes_are_clamped_with_one_warning(flux_nvfp4, nvfp4_tensors, ckpt_variant, flux_forward, caplog):
    tensors = dict(nvfp4_tensors)
    expected: dict[str, torch.Tensor] = {}
    for key, index, byte in NAN_BYTES:
        raw = tensors[key].view(torch.uint8).clone()
        raw.view(-1)[index] = byte
        tensors[key] = raw.view(torch.float8_e4m3fn)
        fixed = expected.setdefault(key, nvfp4_tensors[key].view(torch.uint8).clone())
        fixed.view(-1)[index] = 0x7E
    assert all(torch.isnan(tensors[k].float()).sum() > 0 for k in expected)
    folder = ckpt_variant(flux_nvfp4, tensors=tensors)

    with caplog.at_level(logging.INFO, logger="qdit"):
        model = qdit.load_transformer(folder)

    records = _nan_records(caplog)
    assert len(records) == 1, [r.getMessage() for r in records]
    assert records[0].levelno == logging.WARNING
    assert records[0].getMessage().startswith(f"{len(NAN_BYTES)} float8_e4m3fn scale byte(s) held NaN")
    assert model.qdit_load_report.repairs["e4m3_nan_scale_bytes"] == len(NAN_BYTES)
    for key, want in expected.items():
        layer = model.get_submodule(key.rpartition(".")[0])
        got = layer.tensor("weight_scale").view(torch.uint8)
        assert torch.equal(got, want), key
        assert not torch.isnan(layer.tensor("weight_scale").float()).any()
    out = flux_forward(model)
    assert not torch.isnan(out).any()
    assert torch.isfinite(out).all()


def test_no_nan_warning_on_a_clean_checkpoint(flux_nvfp4, caplog):
    with caplog.at_level(logging.INFO, logger="qdit"):
        model = qdit.load_transformer(flux_nvfp4)
    assert _nan_records(caplog) == []
    assert model.qdit_load_report.repairs.get("e4m3_nan_scale_bytes", 0) == 0


def test_nan_bytes_in_an_fp8_weight_are_an_error(flux_fp8, ckpt_variant):
    """Scales are clamped (a known exporter bug); NaN bytes in an FP8 *weight* are corrupt data."""
    key = f"{TO_Q}.weight"
    tensors = _tensors(flux_fp8)
    raw = tensors[key].view(torch.uint8).clone()
    raw.view(-1)[:3] = torch.tensor([0x7F, 0xFF, 0x7F], dtype=torch.uint8)
    tensors[key] = raw.view(torch.float8_e4m3fn)
    folder = ckpt_variant(flux_fp8, tensors=tensors)
    with pytest.raises(CheckpointError) as exc:
        qdit.load_transformer(folder)
    msg = str(exc.value)
    assert key in msg and "3 NaN byte(s)" in msg


# ---------------------------------------------------------------------------------------------
# Load-time quantization requests
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
def test_quantizing_an_already_quantized_checkpoint(flux_nvfp4, fmt):
    with pytest.raises(QditError, match="already quantized") as exc:
        qdit.load_transformer(flux_nvfp4, quantize=fmt)
    message = str(exc.value)
    assert str(flux_nvfp4) in message
    assert "modelopt NVFP4" in message
    assert f"to {fmt}" in message


def test_unknown_quantize_format(flux_bf16):
    with pytest.raises(QditError, match="unknown quantization format 'int3'") as exc:
        qdit.load_transformer(flux_bf16, quantize="int3")
    for name in LOAD_TIME_FORMATS:
        assert name in str(exc.value)


@pytest.mark.parametrize("quantize", [None, "none"])
def test_no_quantization_keeps_bf16_linears(flux_bf16, quantize):
    model = qdit.load_transformer(flux_bf16, quantize=quantize)
    assert all(not lq.quantized for lq in model.qdit_plan.values())
    assert not any(type(m).__name__ == "QuantLinear" for m in model.modules())
