"""qdit.compile: blocks compiled with qdit's inductor heuristics (persistent row reductions)."""

from types import SimpleNamespace

import pytest
import sympy
import torch
from torch._inductor.choices import InductorChoices
from torch._inductor.runtime.hints import ReductionHint

from qdit.compile import PERSISTENT_ROW_MAX, PersistentRowReductions, inductor_with_qdit_heuristics


def _features(hint, numel):
    return SimpleNamespace(get_reduction_hint=lambda: hint, reduction_numel=numel)


@pytest.mark.parametrize("width", [3072, 3840, PERSISTENT_ROW_MAX])
def test_row_reductions_up_to_the_limit_are_persistent(width):
    features = _features(ReductionHint.INNER, sympy.Integer(width))
    assert PersistentRowReductions.should_use_persistent_reduction(features, cooperative_reduction=False)


def test_wider_rows_other_hints_and_cooperative_reductions_keep_inductors_choice(monkeypatch):
    asked = []

    def stock(features, cooperative_reduction):
        asked.append((features.get_reduction_hint(), int(features.reduction_numel), cooperative_reduction))
        return False

    monkeypatch.setattr(InductorChoices, "should_use_persistent_reduction", staticmethod(stock))
    cases = [(ReductionHint.INNER, PERSISTENT_ROW_MAX * 2, False), (ReductionHint.OUTER, 3072, False),
             (ReductionHint.INNER, 3072, True)]
    for hint, numel, cooperative in cases:
        features = _features(hint, sympy.Integer(numel))
        assert not PersistentRowReductions.should_use_persistent_reduction(features, cooperative)
    assert asked == cases  # each was inductor's own decision


def test_uuid_names_the_heuristic_and_its_limit():
    assert str(PERSISTENT_ROW_MAX) in PersistentRowReductions().uuid()


def _norm_modulate(t):
    return (torch.nn.functional.layer_norm(t, (t.shape[-1],)) * 1.5 + 0.25).clamp(-4, 4)


def test_the_backend_compiles_with_the_heuristics_even_after_a_stock_compile(monkeypatch):
    import torch._inductor.compile_fx as compile_fx_module
    from torch._inductor.virtualized import V

    x = torch.randn(8, 3072)
    torch.compile(lambda t: t.sin() + 1, fullgraph=True)(x)  # inductor has handed out its stock heuristics
    seen = []
    real = compile_fx_module.compile_fx

    def spy(graph_module, example_inputs, **kwargs):
        seen.append((type(V.choices), kwargs.get("config_patches")))
        return real(graph_module, example_inputs, **kwargs)

    monkeypatch.setattr(compile_fx_module, "compile_fx", spy)
    fn = torch.compile(_norm_modulate, fullgraph=True, backend=inductor_with_qdit_heuristics)
    torch.testing.assert_close(fn(x), _norm_modulate(x), atol=1e-5, rtol=1e-5)  # CPU inductor's code
    # compile_fx applies the patches and calls itself again: both calls saw qdit's heuristics
    assert seen[0] == (PersistentRowReductions, {"inductor_choices_class": PersistentRowReductions})
    assert {choices for choices, _ in seen} == {PersistentRowReductions}
    assert type(V.choices) is not PersistentRowReductions  # only while compiling qdit's graph
    torch._dynamo.reset()
