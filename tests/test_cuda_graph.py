"""qdit.cuda_graph: replaying the transformer's forward from CUDA graphs (config cuda_graph)."""

import numpy as np
import pytest
import torch

import qdit
from qdit.config import QditConfig
from qdit.cuda_graph import call_signature, enable_cuda_graphs
from qdit.errors import QditError


def test_signature_is_equal_for_equal_shapes_and_values():
    a = call_signature((torch.zeros(2, 3),), {"img_shapes": [[(1, 8, 8)]], "mask": None, "t": torch.ones(1)})
    b = call_signature((torch.ones(2, 3),), {"img_shapes": [[(1, 8, 8)]], "mask": None, "t": torch.zeros(1)})
    assert a == b  # tensor values do not matter: they are copied into the graph's inputs


@pytest.mark.parametrize("change", [
    lambda: ((torch.zeros(2, 4),), {"img_shapes": [[(1, 8, 8)]], "mask": None, "t": torch.ones(1)}),  # shape
    lambda: ((torch.zeros(2, 3, dtype=torch.bfloat16),), {"img_shapes": [[(1, 8, 8)]], "mask": None,
                                                          "t": torch.ones(1)}),  # dtype
    lambda: ((torch.zeros(2, 3),), {"img_shapes": [[(1, 16, 8)]], "mask": None, "t": torch.ones(1)}),  # value
    lambda: ((torch.zeros(2, 3),), {"img_shapes": [[(1, 8, 8)]], "mask": torch.ones(2), "t": torch.ones(1)}),
    lambda: ((torch.zeros(2, 3),), {"img_shapes": [[(1, 8, 8)]], "t": torch.ones(1)}),  # structure
])
def test_signature_changes_with_shape_dtype_values_and_structure(change):
    base = call_signature((torch.zeros(2, 3),), {"img_shapes": [[(1, 8, 8)]], "mask": None, "t": torch.ones(1)})
    assert call_signature(*change()) != base


def test_enabling_on_a_cpu_model_is_a_clear_error():
    with pytest.raises(QditError, match="cuda_graph needs the transformer on a CUDA device, it is on cpu"):
        enable_cuda_graphs(torch.nn.Linear(4, 4))


def test_config_and_cli_option(tmp_path):
    from qdit.pipelines.tiny import build_tiny_pipeline

    folder = build_tiny_pipeline("flux", tmp_path / "flux")
    with pytest.raises(QditError, match="cuda_graph needs the transformer on a CUDA device"):
        qdit.load_pipeline(folder, device="cpu", cuda_graph=True)
    assert QditConfig().cuda_graph is False


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graphed_module_matches_eager_and_keeps_earlier_outputs():
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 32)).cuda()
    x1, x2, x3 = (torch.randn(5, 64, device="cuda") for _ in range(3))
    with torch.no_grad():
        want = [model(x) for x in (x1, x2, x3)] + [model(x1[:3])]
        graphed = enable_cuda_graphs(model)
        got = [model(x) for x in (x1, x2, x3)] + [model(x1[:3])]
    assert len(graphed.graphs) == 2  # [5, 64] and [3, 64]
    for g, w in zip(got, want):
        assert torch.equal(g, w)  # the same kernels; each output survives the later replays


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("quantize", ["none", "fp8", "svdq_int4"])
def test_shipped_pipeline_with_cuda_graph_matches_eager(quantize):
    """The shipped Qwen-Image pipeline with true CFG (two transformer calls per step): the same image."""
    from qdit.eval.evaluate import SHIPPED_MODEL

    config = QditConfig.from_yaml(SHIPPED_MODEL / "qdit.yaml").replace(quantize=quantize, steps=4)
    pipe = qdit.load_pipeline(SHIPPED_MODEL, device="cuda", config=config)
    prompt = "a large red circle at the top left on a white background"
    eager = np.asarray(qdit.generate(pipe, prompt, progress=False).images[0])
    graphed = enable_cuda_graphs(pipe.transformer)
    replayed = np.asarray(qdit.generate(pipe, prompt, progress=False).images[0])
    assert graphed.graphs  # the forward really was captured
    assert np.array_equal(eager, replayed)
