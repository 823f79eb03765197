"""torch.compile of a transformer's repeated blocks (qdit's ops are custom ops: no graph breaks)."""

from __future__ import annotations

import time

import sympy
import torch
from torch._inductor import config as inductor_config
from torch._inductor.choices import InductorChoices
from torch._inductor.runtime.hints import ReductionHint
from torch._inductor.virtualized import V

from qdit.kernels.fp8_scaled_mm import PERSISTENT_ROW_MAX  # widest row a reduction keeps in registers
from qdit.models import adapter_for_class

# One graph per kind of block and token count: Z-Image alone has three kinds of blocks (noise refiner,
# caption refiner, main) seeing three sequence lengths, and qdit's NVFP4 route branches on the token
# count; dynamo's default of 8 recompilations per code object is too few for that.
RECOMPILE_LIMIT = 64


class PersistentRowReductions(InductorChoices):
    """Inductor's own heuristics, except that a reduction along rows of up to PERSISTENT_ROW_MAX elements
    is persistent (the row held in registers) instead of looped. Inductor loops above 1024 elements; the
    LayerNorm + modulation + FP8 quantization kernels that feed the quantized GEMMs then read each
    3072-wide row two or three times. Held whole, the largest of them took 41 us instead of 65 us per
    call on an H200 (Qwen-Image, 4096 tokens, chosen by inductor's multi-kernel benchmarking;
    benchmarks/results/h200-2026-12-03e)."""

    @staticmethod
    def should_use_persistent_reduction(features, cooperative_reduction: bool) -> bool:
        numel = features.reduction_numel
        if (inductor_config.triton.persistent_reductions and not cooperative_reduction
                and features.get_reduction_hint() == ReductionHint.INNER
                and isinstance(numel, (int, sympy.Integer)) and int(numel) <= PERSISTENT_ROW_MAX):
            return True
        return InductorChoices.should_use_persistent_reduction(features, cooperative_reduction)

    def uuid(self) -> str:  # part of inductor's compile-cache key
        return f"qdit.PersistentRowReductions/{PERSISTENT_ROW_MAX}"


def inductor_with_qdit_heuristics(graph_module: torch.fx.GraphModule, example_inputs):
    """torch.compile backend: inductor, with PersistentRowReductions as its heuristics while it compiles
    this graph. Inductor keeps the first heuristics object a thread asks for, so the config option alone
    does nothing once anything else was compiled first; the option still goes into the compile-cache
    key, so a graph compiled with stock heuristics is not reused."""
    from torch._inductor.compile_fx import compile_fx

    with V.set_choices_handler(PersistentRowReductions()):
        return compile_fx(graph_module, example_inputs,
                          config_patches={"inductor_choices_class": PersistentRowReductions})


def compile_blocks(transformer: torch.nn.Module, *, fullgraph: bool = True, mode: str | None = None,
                   qdit_heuristics: bool = True) -> float:
    """Wrap every repeated block with torch.compile; returns the seconds spent wrapping (compilation
    itself happens on the first call: time that call to report compile time). qdit_heuristics=False
    (or a compile mode) compiles with inductor's stock heuristics (how the benchmark's diffusers peers
    are compiled)."""
    adapter = adapter_for_class(type(transformer).__name__, source=type(transformer).__name__)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    how = {"backend": inductor_with_qdit_heuristics} if qdit_heuristics and mode is None else {"mode": mode}
    start = time.perf_counter()
    for attr in adapter.block_lists:
        for block in getattr(transformer, attr):
            block.compile(fullgraph=fullgraph, **how)
    return time.perf_counter() - start
