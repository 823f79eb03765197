"""Tiny Qwen-Image and Z-Image with FP8 Linears: eager, compiled with qdit's inductor heuristics and
compiled with inductor's stock ones, each against the BF16 model (relative error of the output). Set
the bound of tests/test_compile_gpu.py (benchmarks/results/h200-2026-12-03e/run4).
Run: python benchmarks/compile_accuracy.py
"""
import torch
from qdit.api import random_transformer
from qdit.compile import compile_blocks
from qdit.models import adapter_by_name
def rel(a, b): return ((a - b).norm() / b.norm()).item()
for model in ("z-image", "qwen-image"):
    adapter = adapter_by_name(model)
    bf16 = random_transformer(model, device="cuda", seed=6)
    inputs = adapter.example_inputs(dict(bf16.config), height=256, width=256, text_tokens=32, device="cuda")
    with torch.no_grad():
        exact = adapter.output_tensor(bf16(**inputs)).float()
        res = {}
        for heur in (True, False):
            t = random_transformer(model, device="cuda", seed=6, quantize="fp8")
            eager = adapter.output_tensor(t(**inputs)).float()
            compile_blocks(t, qdit_heuristics=heur)
            comp = adapter.output_tensor(t(**inputs)).float()
            torch._dynamo.reset()
            print(model, "heuristics" if heur else "stock", "eager-vs-bf16", rel(eager, exact), "compiled-vs-bf16", rel(comp, exact), "compiled-vs-eager", rel(comp, eager), flush=True)
