"""`qdit bench`'s results files (the timing itself needs a GPU; these are the parts that do not)."""

import argparse
import json

import pytest
import torch

from qdit import bench


def test_results_name_the_run_and_compare_within_it(tmp_path, monkeypatch):
    monkeypatch.setattr(bench.torch.cuda, "get_device_name", lambda: "Test GPU")
    monkeypatch.setattr(bench.sys, "argv", ["qdit", "bench", "--model", "qwen-image"])
    args = argparse.Namespace(model="qwen-image", height=1024, width=1024, batch=1, text_tokens=256,
                              compile_mode="", out=str(tmp_path))
    rows = [{"format": "bf16", "backends": {}, "load_s": 1.0, "weight_gb": 40.0, "compiled_ms": 140.0,
             "compiled_graph_ms": 136.0, "conditioning_ms": 3.7, "peak_gb": 41.0},
            {"format": "fp8_static", "backends": {"fp8-scaled-mm": 784}, "load_s": 2.0, "weight_gb": 21.0,
             "compiled_ms": 112.0, "compiled_graph_ms": 102.0, "conditioning_ms": 2.4, "peak_gb": 22.0}]
    bench.write_results(args, rows, bench.run_meta(args))
    meta = json.loads((tmp_path / "qwen-image-1024x1024-b1.json").read_text())["meta"]
    assert {k: meta[k] for k in ("gpu", "command", "model", "height", "width", "batch", "compile_mode")} == {
        "gpu": "Test GPU", "command": "qdit bench --model qwen-image", "model": "qwen-image", "height": 1024,
        "width": 1024, "batch": 1, "compile_mode": "default"}
    table = (tmp_path / "qwen-image-1024x1024-b1.md").read_text()
    assert "GPU: Test GPU" in table and "Command: `qdit bench --model qwen-image`" in table
    fp8 = next(line for line in table.splitlines() if line.startswith("| fp8_static"))
    assert "| 0.80x | 0.75x | 2.4 |" in fp8


def test_weight_bytes_counts_what_a_tensor_subclass_holds():
    """torchao's FP8 weights are wrapper subclasses whose logical dtype is BF16; count their inner tensors."""
    import torch
    from torch.testing._internal.two_tensor import TwoTensor

    plain = torch.nn.Linear(8, 4, bias=False).to(torch.bfloat16)
    assert bench.weight_bytes(plain) == 8 * 4 * 2
    wrapped = torch.nn.Linear(8, 4, bias=False)
    wrapped.weight = torch.nn.Parameter(TwoTensor(torch.zeros(4, 8), torch.zeros(4, 8)), requires_grad=False)
    assert bench.weight_bytes(wrapped) == 2 * 8 * 4 * 4  # both inner float32 tensors


def test_profile_parts_sort_kernels_by_their_names():
    kernels = [
        ("nvjet_sm90_qqtst_128x128_128x6_1x1_h_bz_coopA_algo2_ovscale_TNT", 80.0),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7", 40.0),
        ("triton_poi_fused__scaled_dot_product_cudnn_attention__to_copy_add_cat", 4.0),
        ("void at::native::elementwise_kernel<128, 2, at::native::gpu_kernel_impl>", 8.0),
        ("_w4_gemv_kernel", 6.0),
        ("_expand_fp8_kernel", 12.0),
        ("_expand_fp8_kernel", 2.0),
        ("some_unknown_thing", 1.0),
        ("void cublasLt::splitKreduce_kernel<32, 16, int, float>(cublasLt::cublasSplitKParams<float>)", 0.2),
    ]
    parts = bench.kernel_time_by_part(kernels, steps=2)
    assert parts["GEMM (cuBLAS/CUTLASS)"] == 40.1  # cuBLAS's split-K reduce is not a qdit kernel
    assert parts["attention (SDPA)"] == 20.0
    assert parts["inductor-fused elementwise/norm (Triton)"] == 2.0  # not attention, despite its name
    assert parts["ATen elementwise (not fused)"] == 4.0  # not a qdit kernel, despite "_kernel"
    assert parts["qdit _expand_fp8_kernel"] == 7.0 and parts["qdit _w4_gemv_kernel"] == 3.0
    assert parts["other"] == 0.5
    assert parts["total"] == pytest.approx(76.6)
    assert list(parts)[0] == "GEMM (cuBLAS/CUTLASS)"


def test_each_format_starts_from_the_inductor_config_the_run_began_with(tmp_path, monkeypatch):
    """torchao's quantize_ turns on coordinate-descent tuning for the whole process; a format measured
    after it must not compile under that (it did: ten times the compile time, different tuning)."""
    import torch._inductor.config as inductor_config

    seen = []

    def fake_bench_format(args, fmt, adapter, device):
        seen.append((fmt, inductor_config.coordinate_descent_tuning, inductor_config.pre_grad_custom_pass))
        inductor_config.coordinate_descent_tuning = True  # what torchao's recommended setter does
        inductor_config.pre_grad_custom_pass = lambda graph: None
        return {"format": fmt, "backends": {}, "load_s": 1.0, "weight_gb": 1.0, "peak_gb": 1.0}

    monkeypatch.setattr(bench, "bench_format", fake_bench_format)
    monkeypatch.setattr(bench.torch.cuda, "get_device_name", lambda: "Test GPU")
    before = (inductor_config.coordinate_descent_tuning, inductor_config.pre_grad_custom_pass)
    args = argparse.Namespace(model="z-image", text_tokens=None, formats="torchao_fp8,fp8_static",
                              compile_mode="", out=str(tmp_path))
    bench.run_one(args, 256, 256, 1)
    assert [s[1:] for s in seen] == [before, before]
    assert (inductor_config.coordinate_descent_tuning, inductor_config.pre_grad_custom_pass) == before


def test_inductor_config_and_matmul_precision_are_restored_after_an_error():
    import torch._inductor.config as inductor_config

    before = inductor_config.coordinate_descent_tuning, bench.torch.get_float32_matmul_precision()
    with pytest.raises(RuntimeError):
        with bench.isolated_inductor_config():
            inductor_config.coordinate_descent_tuning = not before[0]
            bench.torch.set_float32_matmul_precision("high" if before[1] != "high" else "medium")
            raise RuntimeError("a format failed")
    assert (inductor_config.coordinate_descent_tuning, bench.torch.get_float32_matmul_precision()) == before


def test_format_names_and_their_options():
    from qdit.bench import parse_format

    assert parse_format("fp8_static+fp8attn+blocks") == ("fp8_static", {"fp8attn", "blocks"})
    assert parse_format("torchao_fp8+blocks") == ("torchao_fp8", {"blocks"})
    assert parse_format("bf16") == ("bf16", set())
    for bad, match in (("fp8+fast", "unknown format option"), ("bf16+blocks", "takes no options"),
                       ("torchao_fp8+fp8attn", "takes only")):
        with pytest.raises(SystemExit, match=match):
            parse_format(bad)


@pytest.mark.parametrize("layers", ["recipe", "blocks"])
def test_torchao_peer_quantizes_the_linears_qdit_does(monkeypatch, layers):
    """The torchao peer's filter picks the same Linears as qdit's plan for the same quantize_layers
    (torchao's quantize_ replaced by a recorder: torchao is a GPU-machine dependency)."""
    import sys
    import types

    import torch

    from qdit.api import random_transformer
    from qdit.models import adapter_by_name

    picked = []
    fake = types.ModuleType("torchao.quantization")
    fake.Float8DynamicActivationFloat8WeightConfig = lambda granularity: None
    fake.PerRow = lambda: None
    fake.quantize_ = lambda model, config, filter_fn: picked.extend(
        name for name, m in model.named_modules() if filter_fn(m, name))
    monkeypatch.setitem(sys.modules, "torchao", types.ModuleType("torchao"))
    monkeypatch.setitem(sys.modules, "torchao.quantization", fake)
    peer = random_transformer("flux", diffusers_modules=True)
    bench.torchao_fp8(peer, adapter_by_name("flux"), layers)
    qdit_model = random_transformer("flux", quantize="fp8", quantize_layers=layers)
    assert sorted(picked) == sorted(n for n, lq in qdit_model.qdit_plan.items() if lq.quantized)
    assert all(isinstance(peer.get_submodule(n), torch.nn.Linear) for n in picked)


def test_weight_bytes_counts_shared_storage_once():
    """A fused projection's layers hold views of its stacked weight: the bytes are there once."""
    from qdit.bench import weight_bytes

    parent = torch.nn.Module()
    parent.register_buffer("stacked", torch.zeros(6, 4, dtype=torch.float8_e4m3fn))
    child = torch.nn.Module()
    child.register_buffer("view", parent.stacked[2:4])
    parent.child = child
    parent.extra = torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16), requires_grad=False)
    assert weight_bytes(parent) == 6 * 4 + 3 * 2
