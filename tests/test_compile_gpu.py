"""compile_blocks on the GPU: a quantized model's blocks compiled with qdit's heuristics (device)."""

import pytest
import torch

from qdit.api import random_transformer
from qdit.compile import compile_blocks
from qdit.models import adapter_by_name

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)


@pytest.mark.parametrize("model", ["qwen-image", "z-image"])
def test_compiled_fp8_blocks_match_eager(model):
    adapter = adapter_by_name(model)
    transformer = random_transformer(model, device="cuda", seed=6, quantize="fp8")
    inputs = adapter.example_inputs(dict(transformer.config), height=256, width=256, text_tokens=32, device="cuda")
    with torch.no_grad():
        eager = adapter.output_tensor(transformer(**inputs)).float()
        compile_blocks(transformer)
        compiled = adapter.output_tensor(transformer(**inputs)).float()
    torch._dynamo.reset()
    # Under compile the activation quantization is fused into the norm kernels (float32 intermediates),
    # so a few activations round to the neighbouring E4M3 value.
    assert ((compiled - eager).norm() / eager.norm()).item() < 2e-2
