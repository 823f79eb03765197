"""qdit's tanh-GELU modules compute F.gelu(approximate="tanh") and replace diffusers' without renaming."""

import pytest
import torch
import torch.nn.functional as F

from qdit.api import random_transformer
from qdit.models import adapter_by_name
from qdit.models.activations import LinearTanhGELU, TanhGELU, gelu_tanh


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
