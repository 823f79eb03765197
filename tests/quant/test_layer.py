import torch

from qdit.api import random_transformer
from qdit.models import adapter_by_name
from qdit.quant.layer import QuantLinear


def test_dtype_casts_leave_quantized_tensors_alone():
    """pipe.to(dtype) casts every component: stored codes and scales must survive it bit for bit."""
    model = random_transformer("flux", quantize="nvfp4")
    adapter = adapter_by_name("flux")
    inputs = adapter.example_inputs(dict(model.config))
    with torch.no_grad():
        before = adapter.output_tensor(model(**inputs))
    layer = model.transformer_blocks[0].attn.to_q
    stored = {n: layer.tensor(n).clone() for n in ("weight", "weight_scale", "weight_scale_2")}
    model.to(torch.float32).to(torch.bfloat16)
    for name, t in stored.items():
        assert layer.tensor(name).dtype == t.dtype
        assert torch.equal(layer.tensor(name).reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8))
    with torch.no_grad():
        assert torch.equal(adapter.output_tensor(model(**inputs)), before)


def test_weight_property_is_the_dequantized_weight_in_compute_dtype():
    model = random_transformer("qwen-image", quantize="fp8")
    layer = next(m for m in model.modules() if isinstance(m, QuantLinear))
    w = layer.weight
    assert w.dtype == torch.bfloat16 and w.shape == (layer.out_features, layer.in_features)
    expected = layer.tensor("weight").float() * layer.tensor("weight_scale").float()
    assert torch.equal(w, expected.to(torch.bfloat16))
    assert model.dtype == torch.bfloat16  # diffusers reads the first floating parameter
