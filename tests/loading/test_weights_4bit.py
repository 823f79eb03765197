"""weights_4bit at load: which layers it asks to expand, what it says when a backend keeps packed weights,
and bad values (the expansion itself: tests/kernels/test_nvfp4_routes.py and the GPU tests)."""

import logging

import pytest
import torch

from qdit.api import random_transformer
from qdit.errors import QditError
from qdit.quant.layer import QuantLinear


def test_the_reference_backend_keeps_packed_weights_and_says_so(caplog):
    with caplog.at_level(logging.INFO, logger="qdit.loading"):
        model = random_transformer("qwen-image", quantize="nvfp4", weights_4bit="expanded_fp8", dtype=torch.float32)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.expand_fp8_at_load and not m.released for m in layers)
    said = [r.getMessage() for r in caplog.records if "weights_4bit='expanded_fp8'" in r.getMessage()]
    assert said == [f"weights_4bit='expanded_fp8': {len(layers)} layer(s) keep their packed 4-bit weights, their "
                    f"backend computing from the codes ({len(layers)} nvfp4 on reference)"]


def test_fp8_layers_are_not_asked_to_expand(caplog):
    with caplog.at_level(logging.INFO, logger="qdit.loading"):
        model = random_transformer("qwen-image", quantize="fp8", weights_4bit="expanded_fp8", dtype=torch.float32)
    assert not any(m.expand_fp8_at_load for m in model.modules() if isinstance(m, QuantLinear))
    assert not any("weights_4bit" in r.getMessage() for r in caplog.records)


def test_an_unknown_value_is_an_error():
    with pytest.raises(QditError, match="weights_4bit='fp4' is not one of packed, expanded_fp8"):
        random_transformer("qwen-image", quantize="nvfp4", weights_4bit="fp4")
