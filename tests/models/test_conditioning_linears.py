"""The adapters' conditioning-only Linears are exactly those that see one row per image."""

import pytest
import torch

from qdit.api import random_transformer
from qdit.models import adapter_by_name


@pytest.mark.parametrize("model", ["qwen-image", "flux", "z-image"])
def test_conditioning_linears_are_those_fed_one_row_per_image(model):
    adapter = adapter_by_name(model)
    transformer = random_transformer(model, dtype=torch.float32)
    batch = 2
    rows: dict[str, int] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=name: rows.__setitem__(name, args[0].numel() // args[0].shape[-1]))
             for name, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)]
    inputs = adapter.example_inputs(dict(transformer.config), batch=batch, height=64, width=64, text_tokens=8,
                                    dtype=torch.float32)
    with torch.no_grad():
        transformer(**inputs)
    for h in hooks:
        h.remove()
    marked = {name for name in rows if adapter.is_conditioning_linear(name)}
    per_image = {name for name, n in rows.items() if n == batch}
    # Embedders of the timestep/pooled text also see one row per image; the adapter marks the
    # modulation Linears, which hold almost all of those weights.
    embedders = {n for n in per_image if "embed" in n}
    assert marked, "no conditioning Linear marked"
    assert marked == per_image - embedders
