"""cuDNN's FP8 attention against qdit's PyTorch reference of it, and models using it (device)."""

import pytest
import torch

from qdit.kernels.attention_fp8 import (fp8_attention, fp8_attention_reference, fp8_attention_verdict, fp8_sdpa,
                                        quantize_per_tensor)

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
if not fp8_attention_verdict(torch.device("cuda")).ok:
    pytest.skip(fp8_attention_verdict(torch.device("cuda")).reason, allow_module_level=True)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _exact(q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(
        *(t.float().transpose(1, 2) for t in (q, k, v))).transpose(1, 2)


@pytest.mark.parametrize("batch,seq_q,seq_kv,heads,sharpness", [
    (1, 4352, 4352, 4, 1.0),  # Qwen-Image's joint length at 1024² (fewer heads)
    (1, 4352, 4352, 4, 3.0),  # peakier softmax
    (2, 333, 333, 3, 2.0),    # odd length, batch 2
    (1, 77, 1029, 2, 2.0),    # queries and keys of different lengths
])
def test_cudnn_kernel_matches_the_reference(batch, seq_q, seq_kv, heads, sharpness):
    gen = torch.Generator(device="cuda").manual_seed(seq_q + seq_kv)
    q = (torch.randn(batch, seq_q, heads, 128, device="cuda", generator=gen) * sharpness).bfloat16()
    k, v = ((torch.randn(batch, seq_kv, heads, 128, device="cuda", generator=gen)).bfloat16() for _ in range(2))
    (q8, sq), (k8, sk), (v8, sv) = (quantize_per_tensor(t) for t in (q, k, v))
    got = fp8_sdpa(q8, k8, v8, sq, sk, sv).float() * sv
    want = fp8_attention_reference(q8, k8, v8, sq, sk, sv).float() * sv
    # Same codes in. The kernel's blockwise softmax rounds P relative to a running maximum, the
    # reference relative to the row's maximum, so P's E4M3 roundings differ (3.9% in norm on flat
    # random attention, where P's rounding is a large share of the error): the kernel must be as close
    # to exact attention as the reference is, and near it.
    exact = _exact(q, k, v)
    assert _rel(got, exact) <= 1.1 * _rel(want, exact) + 5e-3, (_rel(got, exact), _rel(want, exact))
    assert _rel(got, want) < 0.06 and _rel(want, exact) < 0.12
    assert _rel(fp8_attention(q, k, v), exact) < 0.12


@pytest.mark.parametrize("model", ["qwen-image", "z-image", "flux"])
def test_models_with_fp8_attention_eager_compiled_and_graphed(model):
    from qdit.api import random_transformer
    from qdit.models import adapter_by_name

    adapter = adapter_by_name(model)
    fp8 = random_transformer(model, device="cuda", seed=5, attention="fp8")
    bf16 = random_transformer(model, device="cuda", seed=5)
    inputs = adapter.example_inputs(dict(fp8.config), height=256, width=256, text_tokens=32, device="cuda")
    with torch.no_grad():
        out, exact = adapter.output_tensor(fp8(**inputs)).float(), adapter.output_tensor(bf16(**inputs)).float()
        for block in getattr(fp8, adapter.block_lists[0]):
            block.compile(fullgraph=True)
        compiled = adapter.output_tensor(fp8(**inputs)).float()
        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            adapter.output_tensor(fp8(**inputs))
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph):
            graphed = adapter.output_tensor(fp8(**inputs))
        graph.replay()
        torch.cuda.synchronize()
    torch._dynamo.reset()
    assert 0 < _rel(out, exact) < 0.1
    assert _rel(compiled, out) < 2e-2 and _rel(graphed.float(), compiled) < 1e-3
