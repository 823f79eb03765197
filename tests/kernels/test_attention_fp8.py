"""FP8 attention (qdit.kernels.attention_fp8): its reference math, the processors that use it, and the
refusals. CPU; cuDNN's kernel against this reference is in test_attention_fp8_gpu.py."""

import dataclasses
import logging
import math

import pytest
import torch

import qdit.kernels.attention_fp8 as attention_fp8
from qdit.api import random_transformer
from qdit.config import QditConfig
from qdit.errors import QditError
from qdit.kernels.attention_fp8 import (E4M3_MAX, fp8_attention, fp8_attention_reference, fp8_attention_verdict,
                                        fp8_sdpa, quantize_per_tensor)
from qdit.models import adapter_by_name


def _exact(q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(
        *(t.double().transpose(1, 2) for t in (q, k, v))).transpose(1, 2)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _qkv(batch=2, seq_q=40, seq_kv=40, heads=3, dim=64, seed=0, sharpness=2.0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq_q, heads, dim, generator=gen) * sharpness
    k, v = (torch.randn(batch, seq_kv, heads, dim, generator=gen) for _ in range(2))
    return q, k, v


def test_per_tensor_quantization_maps_amax_to_448_and_rounds_to_e4m3():
    x = torch.randn(4, 16, 2, 32) * 3
    codes, scale = quantize_per_tensor(x)
    assert codes.dtype == torch.float8_e4m3fn and scale.shape == (1, 1, 1, 1)
    assert codes.float().abs().max().item() == E4M3_MAX
    back = codes.float() * scale
    normal = x.abs() > 2**-6 * scale  # E4M3 normals: 3 mantissa bits, so within half a step (2**-4)
    assert ((back - x).abs()[normal] <= x.abs()[normal] * 2**-4 + 1e-7).all()


def test_reference_is_attention_up_to_fp8_rounding():
    q, k, v = _qkv()
    (q8, sq), (k8, sk), (v8, sv) = (quantize_per_tensor(t) for t in (q, k, v))
    out = fp8_attention_reference(q8, k8, v8, sq, sk, sv)
    assert out.dtype == torch.float8_e4m3fn and out.shape == q.shape
    err = _rel(out.float() * sv, _exact(q, k, v))
    assert 0 < err < 0.1
    # Rounding only the inputs accounts for most of it; the probabilities and O add a little.
    inputs_only = _rel(_exact(q8.float() * sq, k8.float() * sk, v8.float() * sv), _exact(q, k, v))
    assert inputs_only < err < inputs_only + 0.05


def test_output_scale_of_v_never_saturates():
    q, k, v = _qkv(seed=1)
    v[0, 3, 1, 5] = 200.0  # one outlier sets amax(v); rows attending to it stay within it
    q[0, :, 1] = k[0, 3, 1] * 4  # every query of that head attends to the outlier's key
    (q8, sq), (k8, sk), (v8, sv) = (quantize_per_tensor(t) for t in (q, k, v))
    out = fp8_attention_reference(q8, k8, v8, sq, sk, sv)
    assert torch.isfinite(out.float()).all() and out.float().abs().max().item() <= E4M3_MAX
    assert _rel(out.float() * sv, _exact(q, k, v)) < 0.1


def test_the_op_runs_the_reference_off_cuda_and_takes_different_lengths():
    q, k, v = _qkv(seq_q=24, seq_kv=57, seed=2)
    (q8, sq), (k8, sk), (v8, sv) = (quantize_per_tensor(t) for t in (q, k, v))
    assert torch.equal(fp8_sdpa(q8, k8, v8, sq, sk, sv).float(), fp8_attention_reference(q8, k8, v8, sq, sk, sv).float())
    out = fp8_attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    assert _rel(out, _exact(q, k, v)) < 0.1


def test_verdict_names_what_is_missing(monkeypatch):
    assert "CUDA" in fp8_attention_verdict(torch.device("cpu")).reason
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert "9.0" in fp8_attention_verdict(torch.device("cuda", 0)).reason
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(attention_fp8, "cudnn", None)
    assert "nvidia-cudnn-frontend" in fp8_attention_verdict(torch.device("cuda", 0)).reason


def _model_outputs(model, attention, mask=False, compile_block=False):
    adapter = adapter_by_name(model)
    transformer = random_transformer(model, dtype=torch.float32, seed=4, attention=attention)
    inputs = adapter.example_inputs(dict(transformer.config), batch=2, height=64, width=48, text_tokens=8,
                                    dtype=torch.float32)
    if mask:
        inputs["encoder_hidden_states_mask"] = torch.ones(2, 8, dtype=torch.bool)
        inputs["encoder_hidden_states_mask"][1, 5:] = False
    if compile_block:  # fullgraph: the op's fake implementation lets dynamo trace through it
        getattr(transformer, adapter.block_lists[0])[0].compile(backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        out = adapter.output_tensor(transformer(**inputs))
    torch._dynamo.reset()
    return out


@pytest.mark.parametrize("model", ["qwen-image", "z-image", "flux"])
def test_models_with_fp8_attention_stay_close_to_bf16_attention(model, caplog):
    with caplog.at_level(logging.WARNING, logger="qdit"):
        fp8 = _model_outputs(model, "fp8")
    assert "PyTorch reference" in caplog.text  # off CUDA the reference runs, and says so
    exact = _model_outputs(model, "bf16")
    assert 0 < _rel(fp8, exact) < 0.1
    assert torch.equal(_model_outputs(model, "fp8", compile_block=True), fp8)


def test_masked_calls_use_bf16_attention_and_say_so(caplog):
    with caplog.at_level(logging.WARNING, logger="qdit"):
        fp8 = _model_outputs("qwen-image", "fp8", mask=True)
    assert "attention mask" in caplog.text
    assert torch.equal(fp8, _model_outputs("qwen-image", "bf16", mask=True))
    # and they compile with fullgraph: nothing is logged from inside the block
    assert torch.equal(_model_outputs("qwen-image", "fp8", mask=True, compile_block=True), fp8)


def test_models_without_a_qdit_processor_and_unknown_choices_are_refused():
    no_processor = dataclasses.replace(adapter_by_name("flux"), attention_processor=None)
    with pytest.raises(QditError, match="not available for FluxTransformer2DModel"):
        no_processor.install_compile_friendly_modules(random_transformer("flux"), attention="fp8")
    with pytest.raises(QditError, match="attention='fp16' is not one of"):
        random_transformer("qwen-image", attention="fp16")
    with pytest.raises(QditError, match="attention='fp16'"):
        QditConfig(attention="fp16")


def test_scores_use_the_softmax_scale_of_the_head_dimension():
    # A key equal to the query dominates exactly as 1/sqrt(D) scaling says.
    q = torch.zeros(1, 1, 1, 16)
    q[..., 0] = 4.0
    k = torch.zeros(1, 2, 1, 16)
    k[0, 0, 0, 0] = 4.0
    v = torch.tensor([1.0, -1.0]).reshape(1, 2, 1, 1).expand(1, 2, 1, 16).contiguous()
    (q8, sq), (k8, sk), (v8, sv) = (quantize_per_tensor(t) for t in (q, k, v))
    out = fp8_attention_reference(q8, k8, v8, sq, sk, sv).float() * sv
    p0 = 1 / (1 + math.exp(-16 / 4))
    assert abs(out[0, 0, 0, 0].item() - (2 * p0 - 1)) < 0.05



def test_the_cudnn_path_refuses_a_device_that_cannot_run_it(monkeypatch):
    q8, scale = torch.zeros(1, 4, 1, 16, dtype=torch.float8_e4m3fn), torch.ones(1, 1, 1, 1)
    with pytest.raises(QditError, match="cannot run on cpu: needs a CUDA device"):
        attention_fp8.cudnn_fp8_sdpa(q8, q8, q8, scale, scale, scale, scale)
    monkeypatch.setattr(attention_fp8, "fp8_attention_verdict",
                        lambda device: attention_fp8.Verdict(False, "cudnn-frontend is not installed"))
    with pytest.raises(QditError, match="cudnn-frontend is not installed"):
        attention_fp8.cudnn_fp8_sdpa(q8, q8, q8, scale, scale, scale, scale)
