"""qdit's tanh-GELU modules compute F.gelu(approximate="tanh") and replace diffusers' without renaming; the
MLP's GELU is deferred to the output Linear where its backend agrees."""

import logging

import pytest
import torch
import torch.nn.functional as F

from qdit.api import random_transformer
from qdit.kernels import backend_by_name
from qdit.kernels.registry import YES, Verdict
from qdit.models import adapter_by_name
from qdit.models.activations import (LinearDeferredGELU, LinearTanhGELU, TanhGELU, defer_gelu_to_next_linear,
                                     gelu_tanh)
from qdit.quant.layer import QuantLinear


def test_gelu_tanh_is_f_gelu():
    x = torch.linspace(-12, 12, 200001)
    torch.testing.assert_close(gelu_tanh(x), F.gelu(x, approximate="tanh"), rtol=2e-6, atol=2e-7)
    # In bf16 they agree but for rare roundings of float32 results a hair apart, and in the far negative
    # tail, where 1 + tanh(u) cancels in float32 and the sigmoid form keeps more digits of tiny values.
    xb = (torch.randn(100000) * 4).to(torch.bfloat16)
    ours, theirs = gelu_tanh(xb), F.gelu(xb, approximate="tanh")
    assert (ours != theirs)[xb > -3].float().mean().item() < 5e-3
    assert (ours.float() - theirs.float()).abs().max().item() < 1e-4


@pytest.mark.parametrize("model,replaced", [("qwen-image", LinearTanhGELU), ("flux", TanhGELU)])
def test_loaded_models_use_them_with_unchanged_names_and_output(model, replaced):
    adapter = adapter_by_name(model)
    ours = random_transformer(model, dtype=torch.float32, seed=5)
    theirs = random_transformer(model, dtype=torch.float32, seed=5, diffusers_modules=True)
    assert any(isinstance(m, replaced) for m in ours.modules())
    assert not any(isinstance(m, (TanhGELU, LinearTanhGELU)) for m in theirs.modules())
    assert list(ours.state_dict()) == list(theirs.state_dict())
    inputs = adapter.example_inputs(dict(ours.config), height=64, width=64, text_tokens=8, dtype=torch.float32)
    with torch.no_grad():
        out, expected = adapter.output_tensor(ours(**inputs)), adapter.output_tensor(theirs(**inputs))
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


class GeluFusingBackend:
    """The reference backend's math, taking the pre-activation (and the previous layer's bias) where the
    layer is told to; with hands_over_bias, a layer gives its bias away when asked."""

    name = "gelu-fusing"

    def __init__(self, refusal="", hands_over_bias=False):
        self.refusal = refusal
        self.reference = backend_by_name("reference")
        self.without_bias = set()
        if hands_over_bias:
            self.release_output_bias = self._release

    def fuse_input_gelu(self, layer):
        return Verdict(False, self.refusal) if self.refusal else YES

    def _release(self, layer):
        self.without_bias.add(layer.name)
        return layer.bias

    def apply(self, layer, x):
        if layer.input_gelu:
            x = gelu_tanh(x + layer.input_gelu_bias if layer.input_gelu_bias is not None else x)
        y = self.reference.apply(layer, x)
        return y - layer.bias if layer.name in self.without_bias else y


def quantized_qwen_image():
    model = random_transformer("qwen-image", quantize="fp8", quantize_layers="blocks", seed=3)
    adapter = adapter_by_name("qwen-image")
    inputs = adapter.example_inputs(dict(model.config), height=64, width=64, text_tokens=8, dtype=torch.bfloat16)
    return model, adapter, inputs


def test_reference_backend_keeps_the_gelu_and_says_why(caplog):
    with caplog.at_level(logging.INFO, logger="qdit"):
        model, _, _ = quantized_qwen_image()
    mlps = 2 * model.config.num_layers  # img_mlp and txt_mlp per block
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("MLPs")] == [
        f"MLPs: {mlps} GELU not deferred: backend reference has no fused GELU input"]
    assert not any(isinstance(m, LinearDeferredGELU) for m in model.modules())


@pytest.mark.parametrize("hands_over_bias", [False, True])
def test_gelu_deferred_where_the_backend_agrees(hands_over_bias):
    model, adapter, inputs = quantized_qwen_image()
    with torch.no_grad():
        before = adapter.output_tensor(model(**inputs))
    names = list(model.state_dict())
    backend = GeluFusingBackend(hands_over_bias=hands_over_bias)
    for layer in model.modules():
        if isinstance(layer, QuantLinear):
            layer.backend = backend
    outcome = defer_gelu_to_next_linear(model)
    what = "GELU deferred to the output Linear's input quantization"
    what += " with the first Linear's bias" if hands_over_bias else ""
    assert outcome == {what: 2 * model.config.num_layers}
    for mlp in (model.transformer_blocks[0].img_mlp, model.transformer_blocks[0].txt_mlp):
        assert isinstance(mlp.net[0], LinearDeferredGELU) and mlp.net[2].input_gelu
        assert not mlp.net[0].proj.input_gelu  # fc1 itself takes its input as before
        handed = mlp.net[2].input_gelu_bias
        assert (handed is not None and handed.data_ptr() == mlp.net[0].proj.bias.data_ptr()) == hands_over_bias
        assert (mlp.net[0].proj.name in backend.without_bias) == hands_over_bias
    assert list(model.state_dict()) == names  # the handed-over bias is no new checkpoint tensor
    with torch.no_grad():
        after = adapter.output_tensor(model(**inputs))
    if hands_over_bias:  # the stub's bias removed and added again in bf16: rounding only
        assert ((after.float() - before.float()).norm() / before.float().norm()).item() < 2e-2
    else:
        assert torch.equal(after, before)
    assert defer_gelu_to_next_linear(model) == {}  # installed again: nothing left to defer


def test_gelu_kept_where_the_backend_refuses():
    model, _, _ = quantized_qwen_image()
    for layer in model.modules():
        if isinstance(layer, QuantLinear):
            layer.backend = GeluFusingBackend(refusal="static activation scales")
    outcome = defer_gelu_to_next_linear(model)
    assert outcome == {"GELU not deferred: static activation scales": 2 * model.config.num_layers}
    assert not any(isinstance(m, LinearDeferredGELU) or getattr(m, "input_gelu", False) for m in model.modules())
