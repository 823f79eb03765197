"""qdit.quant.shared_input: which groups are fused, where the fused module lives, how processors use it.
The fused W4A8 arithmetic itself is checked on the GPU (tests/kernels/test_svdquant_hopper_gpu.py)."""

import logging

import torch
from torch import nn

from qdit.api import random_transformer
from qdit.models.rotary import IMAGE_QKV, TEXT_QKV
from qdit.quant.layer import QuantLinear
from qdit.quant.shared_input import FUSED_PREFIX, fuse_shared_inputs, fused_name, project


class SumOfInputs(nn.Module):
    """Stands in for a backend's fused module: distinguishable from the layers' own outputs."""

    def __init__(self, n):
        super().__init__()
        self.n = n

    def forward(self, x):
        return [x.sum(-1, keepdim=True) + i for i in range(self.n)]


class FusingBackend:
    name = "fusing"

    def __init__(self, reason=""):
        self.reason = reason
        self.seen = []

    def fuse_shared_input(self, layers):
        self.seen.append([layer.name for layer in layers])
        return (None, self.reason) if self.reason else (SumOfInputs(len(layers)), "")


def fused_modules(model):
    return [name for name, _ in model.named_modules() if name.rpartition(".")[2].startswith(FUSED_PREFIX)]


def test_reference_backend_fuses_nothing_and_says_why(caplog):
    """On the reference backend (CPU) every layer computes alone: no fused module, the reason logged
    once, and the processor's outputs are the layers' own."""
    with caplog.at_level(logging.INFO, logger="qdit"):
        model = random_transformer("qwen-image", quantize="fp8", quantize_layers="blocks")
    assert fused_modules(model) == []
    depth = model.config.num_layers
    lines = [r.getMessage() for r in caplog.records if "reading one input" in r.getMessage()]
    assert lines == [f"groups of quantized projections reading one input: {2 * depth} not fused: backend "
                     f"reference computes each layer alone"]
    attn = model.transformer_blocks[0].attn
    x = torch.randn(1, 5, attn.to_q.in_features, dtype=torch.bfloat16)
    for got, layer in zip(project(attn, IMAGE_QKV, x), (attn.to_q, attn.to_k, attn.to_v)):
        assert torch.equal(got, layer(x))


def test_groups_are_fused_where_the_backend_can():
    model = random_transformer("qwen-image", quantize="fp8", quantize_layers="blocks")
    backend = FusingBackend()
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.backend = backend
    blocks = model.transformer_blocks
    outcome = fuse_shared_inputs([b.attn for b in blocks], (IMAGE_QKV, TEXT_QKV))
    assert outcome == {"fused (to_q, to_k, to_v)": len(blocks), "fused (add_q_proj, add_k_proj, add_v_proj)": len(blocks)}
    assert backend.seen[0] == [f"transformer_blocks.0.attn.{n}" for n in IMAGE_QKV]
    assert sorted(fused_modules(model))[:2] == [f"transformer_blocks.0.attn.{fused_name(TEXT_QKV)}",
                                                 f"transformer_blocks.0.attn.{fused_name(IMAGE_QKV)}"]
    assert not any(k.split(".")[-2].startswith(FUSED_PREFIX) for k in model.state_dict())  # no new checkpoint keys
    fused_first = blocks[0].attn._modules[fused_name(IMAGE_QKV)]
    again = fuse_shared_inputs([b.attn for b in blocks], (IMAGE_QKV, TEXT_QKV))  # installed a second time
    assert again == {"already fused (to_q, to_k, to_v)": len(blocks),
                     "already fused (add_q_proj, add_k_proj, add_v_proj)": len(blocks)}
    assert len(backend.seen) == 2 * len(blocks) and blocks[0].attn._modules[fused_name(IMAGE_QKV)] is fused_first
    x = torch.randn(2, 3, 8)
    assert [t.tolist() for t in project(blocks[1].attn, TEXT_QKV, x)] == [
        (x.sum(-1, keepdim=True) + i).tolist() for i in range(3)]


def test_a_refusal_leaves_the_group_alone_and_counts_the_reason():
    model = random_transformer("qwen-image", quantize="fp8", quantize_layers="blocks")
    refusing = FusingBackend("their input smoothing or shift differ")
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.backend = refusing
    attns = [b.attn for b in model.transformer_blocks]
    outcome = fuse_shared_inputs(attns, (IMAGE_QKV,))
    assert outcome == {"not fused: their input smoothing or shift differ": model.config.num_layers}
    attns[0].to_k.backend = FusingBackend()
    assert fuse_shared_inputs(attns[:1], (IMAGE_QKV,)) == {"not fused: their kernel backends differ": 1}
    assert fused_modules(model) == []


def test_unquantized_groups_and_missing_projections_are_skipped():
    """A BF16 model has nothing to fuse (no log line); a parent without the group's Linears is skipped."""
    model = random_transformer("qwen-image")
    assert fuse_shared_inputs([b.attn for b in model.transformer_blocks], (IMAGE_QKV, TEXT_QKV)) == {}
    assert fuse_shared_inputs([model.transformer_blocks[0].attn], (("to_q", "no_such_projection"),)) == {}
