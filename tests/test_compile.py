"""qdit.compile: blocks compiled with qdit's inductor heuristics (persistent row reductions)."""

from types import SimpleNamespace

import pytest
import sympy
import torch
from torch._inductor.choices import InductorChoices
from torch._inductor.runtime.hints import ReductionHint

from qdit.compile import PERSISTENT_ROW_MAX, PersistentRowReductions


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


def test_compiled_layer_norm_with_the_heuristics_matches_eager():
    # The option is accepted by torch.compile and the compiled code (here inductor's CPU backend)
    # computes what eager does.
    norm = torch.nn.LayerNorm(3072, elementwise_affine=False)
    x = torch.randn(8, 3072)
    fn = torch.compile(lambda t: (norm(t) * 1.5 + 0.25).clamp(-4, 4), fullgraph=True,
                       options={"inductor_choices_class": PersistentRowReductions})
    torch.testing.assert_close(fn(x), (norm(x) * 1.5 + 0.25).clamp(-4, 4), atol=1e-5, rtol=1e-5)
