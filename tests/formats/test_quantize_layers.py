"""quantize_layers: which Linears load-time quantization covers (qdit.formats.plan_for)."""

import pytest

import qdit
from qdit.api import random_transformer
from qdit.config import QditConfig
from qdit.errors import QditError


def _quantized(model) -> set[str]:
    return {name for name, lq in model.qdit_plan.items() if lq.quantized}


def test_qwen_image_blocks_adds_the_first_and_last_blocks_and_nothing_outside_them():
    recipe = _quantized(random_transformer("qwen-image", quantize="fp8"))
    blocks = random_transformer("qwen-image", quantize="fp8", quantize_layers="blocks")
    everything = set(blocks.qdit_plan)
    in_blocks = {n for n in everything if n.startswith("transformer_blocks.")}
    assert _quantized(blocks) == in_blocks
    # The recipe (6 tiny blocks) quantizes only blocks 2 and 3; "blocks" adds 0, 1, 4 and 5.
    assert recipe == {n for n in in_blocks if n.split(".")[1] in ("2", "3")}
    assert {"img_in", "txt_in", "proj_out", "norm_out.linear"} <= everything - _quantized(blocks)


def test_flux_blocks_quantizes_the_single_blocks_proj_out_the_recipe_keeps():
    recipe = _quantized(random_transformer("flux", quantize="nvfp4"))
    blocks = _quantized(random_transformer("flux", quantize="nvfp4", quantize_layers="blocks"))
    assert blocks - recipe == {"single_transformer_blocks.0.proj_out", "single_transformer_blocks.1.proj_out"}
    assert "proj_out" not in blocks and "x_embedder" not in blocks


def test_blocks_runs_close_to_bf16(flux_forward):
    bf16 = flux_forward(random_transformer("flux", seed=1)).float()
    errors = {}
    for layers in ("recipe", "blocks"):
        out = flux_forward(random_transformer("flux", seed=1, quantize="fp8", quantize_layers=layers)).float()
        errors[layers] = ((out - bf16).norm() / bf16.norm()).item()
    assert errors["recipe"] < errors["blocks"] < 0.05, errors  # more layers quantized, a little more error


def test_blocks_is_refused_where_the_checkpoint_decides(flux_fp8, flux_bf16):
    with pytest.raises(QditError, match=r"quantize_layers='blocks'.*loaded as it is \(modelopt FP8"):
        qdit.load_transformer(flux_fp8, quantize_layers="blocks")
    with pytest.raises(QditError, match=r"loaded as it is \(a BF16 checkpoint, run unquantized\)"):
        qdit.load_transformer(flux_bf16, quantize_layers="blocks")
    assert "single_transformer_blocks.0.proj_out" in _quantized(
        qdit.load_transformer(flux_bf16, quantize="fp8", quantize_layers="blocks"))


def test_unknown_value_is_an_error():
    with pytest.raises(QditError, match="quantize_layers='all' is not one of recipe, blocks"):
        random_transformer("flux", quantize="fp8", quantize_layers="all")
    with pytest.raises(QditError, match="quantize_layers='all'"):
        QditConfig(quantize_layers="all")
