"""torch.compile of a transformer's repeated blocks (qdit's ops are custom ops: no graph breaks)."""

from __future__ import annotations

import time

import torch

from qdit.models import adapter_for_class

# One graph per kind of block and token count: Z-Image alone has three kinds of blocks (noise refiner,
# caption refiner, main) seeing three sequence lengths, and qdit's NVFP4 route branches on the token
# count; dynamo's default of 8 recompilations per code object is too few for that.
RECOMPILE_LIMIT = 64


def compile_blocks(transformer: torch.nn.Module, *, fullgraph: bool = True, mode: str | None = None) -> float:
    """Wrap every repeated block with torch.compile; returns the seconds spent wrapping (compilation
    itself happens on the first call: time that call to report compile time)."""
    adapter = adapter_for_class(type(transformer).__name__, source=type(transformer).__name__)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    start = time.perf_counter()
    for attr in adapter.block_lists:
        for block in getattr(transformer, attr):
            block.compile(fullgraph=fullgraph, mode=mode)
    return time.perf_counter() - start
