"""The transformer's forward replayed from CUDA graphs (config `cuda_graph: true`, CLI `--cuda-graph`).

At batch 1 a quantized DiT step launches thousands of small kernels (activation quantization, weight
expansion, GEMMs, low-rank branches); launching them from Python costs more than running them. A
CUDA graph captures one whole forward and replays it with a single launch.

One graph per call signature: the shapes, dtypes and devices of the tensor arguments and the values
of every other argument (diffusers passes image shapes and text lengths as Python lists). The first
call with a new signature runs the forward twice to warm up (Triton autotuning, torch.compile, lazy
caches), then captures it; every call copies its tensors into the graph's static inputs, replays, and
returns clones of the outputs, so two calls per step (classifier-free guidance) do not overwrite each
other. All graphs share one memory pool: they replay one at a time on one stream.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from qdit.errors import QditError

log = logging.getLogger("qdit.cuda_graph")

WARMUP_CALLS = 2


def call_signature(args: tuple, kwargs: dict) -> tuple:
    """What must match for a captured graph to be replayed: the argument structure, each tensor's
    shape/dtype/device and every non-tensor value."""
    return _signature(*tree_flatten((args, kwargs)))


def _signature(leaves: list, spec) -> tuple:
    parts = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            parts.append(("tensor", tuple(leaf.shape), leaf.dtype, str(leaf.device)))
        else:
            parts.append(("value", type(leaf).__name__, repr(leaf)))
    return str(spec), tuple(parts)


@dataclass
class _Captured:
    graph: Any  # torch.cuda.CUDAGraph
    static_inputs: list  # the tensor leaves the graph reads, in flattening order
    output: Any


class GraphedForward:
    """Replaces a module's forward (on that instance only) with CUDA-graph replay."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.eager_forward = module.forward
        self.graphs: dict[tuple, _Captured] = {}
        self.pool = torch.cuda.graph_pool_handle()

    def __call__(self, *args, **kwargs):
        if torch.is_grad_enabled():
            raise QditError("cuda_graph: the transformer was called with gradients enabled; CUDA-graph replay is "
                            "for inference only. Call it under torch.no_grad() (diffusers pipelines do), or load "
                            "without cuda_graph.")
        leaves, spec = tree_flatten((args, kwargs))
        key = _signature(leaves, spec)
        captured = self.graphs.get(key)
        if captured is None:
            captured = self.graphs[key] = self._capture(leaves, spec)
        for static, new in zip(captured.static_inputs, (t for t in leaves if isinstance(t, torch.Tensor))):
            static.copy_(new)
        captured.graph.replay()
        return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, captured.output)

    def _capture(self, leaves: list, spec) -> _Captured:
        devices = {t.device.type for t in leaves if isinstance(t, torch.Tensor)}
        if devices != {"cuda"}:
            raise QditError(f"cuda_graph: every tensor argument of the transformer must be on a CUDA device, "
                            f"found {sorted(devices) or 'no tensors'}")
        static_leaves = [t.clone() if isinstance(t, torch.Tensor) else t for t in leaves]
        static_args, static_kwargs = tree_unflatten(static_leaves, spec)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_CALLS):
                self.eager_forward(*static_args, **static_kwargs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            output = self.eager_forward(*static_args, **static_kwargs)
        log.info("cuda_graph: captured %s's forward for a new input signature (%d graphs)",
                 type(self.module).__name__, len(self.graphs) + 1)
        return _Captured(graph, [t for t in static_leaves if isinstance(t, torch.Tensor)], output)


def enable_cuda_graphs(transformer: torch.nn.Module) -> GraphedForward:
    """Make `transformer(...)` replay CUDA graphs (see the module docstring). Only this instance changes."""
    device = next(transformer.parameters()).device
    if device.type != "cuda":
        raise QditError(f"cuda_graph needs the transformer on a CUDA device, it is on {device}; "
                        f"leave cuda_graph off on this machine")
    if isinstance(transformer.forward, GraphedForward):
        return transformer.forward
    graphed = GraphedForward(transformer)
    transformer.forward = graphed  # an instance attribute: nn.Module.__call__ calls it
    return graphed
