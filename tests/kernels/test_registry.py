"""Kernel-backend registry and per-layer selection: qdit.kernels.registry."""

from __future__ import annotations

import logging

import pytest
import torch

import qdit
from qdit.errors import BackendUnavailableError
from qdit.kernels import registry
from qdit.kernels.registry import BACKEND_ENV, YES, BackendSelector, Verdict, backend_by_name, backends
from qdit.quant.scheme import ActivationScale, LayerQuant, Scheme

NVFP4 = LayerQuant(Scheme.NVFP4, ActivationScale.STATIC)
FP8 = LayerQuant(Scheme.FP8, ActivationScale.STATIC)


class StubBackend:
    """A backend that refuses (or accepts) with a given reason, and counts what it was asked to do."""

    def __init__(self, name="zz-stub", device_reason=None, scheme_reason=None, accepts=()):
        self.name = name
        self.device_reason = device_reason
        self.scheme_reason = scheme_reason
        self.accepts = accepts
        self.prepared: list[str] = []

    def supports_device(self, device):
        return Verdict(False, self.device_reason) if self.device_reason else YES

    def can_implement(self, layer_quant, in_features, out_features):
        if layer_quant.scheme in self.accepts:
            return YES
        return Verdict(False, self.scheme_reason or f"stub does not do {layer_quant.scheme.value}")

    def prepare(self, layer):
        self.prepared.append(layer.name)

    def apply(self, layer, x):
        return backend_by_name("reference").apply(layer, x)


@pytest.fixture
def isolated_registry(monkeypatch):
    """The registry's module-level list, copied: backends registered in a test vanish afterwards."""
    monkeypatch.setattr(registry, "_BACKENDS", list(registry._BACKENDS))
    return registry


@pytest.fixture(autouse=True)
def _no_backend_env(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)


def _kernel_records(caplog, text):
    return [r for r in caplog.records if r.name == "qdit.kernels" and text in r.getMessage()]


# ---------------------------------------------------------------------------------------------
# Names and order
# ---------------------------------------------------------------------------------------------


def test_reference_is_registered_and_last():
    names = [b.name for b in backends()]
    assert names[-1] == "reference"
    assert names.count("reference") == 1
    assert backend_by_name("reference").name == "reference"


def test_reference_stays_last_after_registering_another(isolated_registry):
    before = [b.name for b in backends()]
    registry.register_backend(StubBackend("zz-stub"))
    names = [b.name for b in backends()]
    assert names == [*before[:-1], "zz-stub", "reference"]


def test_registering_a_duplicate_name_is_refused(isolated_registry):
    with pytest.raises(ValueError, match="'reference' is already registered"):
        registry.register_backend(StubBackend("reference"))


def test_registry_is_restored_after_a_test(monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(registry, "_BACKENDS", list(registry._BACKENDS))
        registry.register_backend(StubBackend("zz-temporary"))
        assert "zz-temporary" in [b.name for b in backends()]
    assert "zz-temporary" not in [b.name for b in backends()]


def test_unknown_backend_name_lists_known_ones():
    with pytest.raises(BackendUnavailableError, match="unknown kernel backend 'no-such-backend'") as exc:
        backend_by_name("no-such-backend")
    for b in backends():
        assert b.name in str(exc.value)


def test_forcing_an_unknown_backend_at_load(flux_nvfp4):
    with pytest.raises(BackendUnavailableError, match="unknown kernel backend 'triton-nvfp4-v9'") as exc:
        qdit.load_transformer(flux_nvfp4, backend="triton-nvfp4-v9")
    assert "reference" in str(exc.value)


# ---------------------------------------------------------------------------------------------
# QDIT_BACKEND
# ---------------------------------------------------------------------------------------------


def test_env_var_reference_is_honoured(flux_nvfp4, monkeypatch, isolated_registry):
    greedy = StubBackend("aa-greedy", accepts=tuple(Scheme))  # would win every layer if not forced
    registry.register_backend(greedy)
    monkeypatch.setenv(BACKEND_ENV, "reference")
    model = qdit.load_transformer(flux_nvfp4)
    assert model.qdit_load_report.backends == {"reference": 24}
    assert greedy.prepared == []


def test_env_var_is_read(flux_nvfp4, monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "from-the-env")
    with pytest.raises(BackendUnavailableError, match="'from-the-env'"):
        qdit.load_transformer(flux_nvfp4)


def test_backend_argument_overrides_env_var(flux_nvfp4, monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "from-the-env")
    model = qdit.load_transformer(flux_nvfp4, backend="reference")
    assert model.qdit_load_report.backends == {"reference": 24}


def test_empty_env_var_means_automatic(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "")
    assert BackendSelector(torch.device("cpu")).forced is None


# ---------------------------------------------------------------------------------------------
# Selection and refusal logging
# ---------------------------------------------------------------------------------------------


def test_refusal_reason_logged_once_for_many_layers(flux_nvfp4, isolated_registry, caplog):
    reason = "stub needs an imaginary tensor core"
    registry.register_backend(StubBackend("zz-refuser", device_reason=reason))
    with caplog.at_level(logging.DEBUG, logger="qdit"):
        model = qdit.load_transformer(flux_nvfp4)
    quant_layers = [m for m in model.modules() if type(m).__name__ == "QuantLinear"]
    assert len(quant_layers) == 24
    assert model.qdit_load_report.backends == {"reference": 24}
    records = _kernel_records(caplog, reason)
    assert len(records) == 1, [r.getMessage() for r in records]
    message = records[0].getMessage()
    assert f"zz-refuser: {reason}" in message
    assert "reference backend" in message and "nvfp4" in message
    # On a CPU the reference backend is the expected one: the registry says so at INFO, not WARNING.
    assert records[0].levelno == logging.INFO


def test_refusal_on_a_gpu_device_is_one_warning(isolated_registry, caplog):
    """The selector alone (no GPU needed): on a CUDA device, falling back to the reference is a WARNING."""
    reason = "stub wants sm_100"
    isolated_registry._BACKENDS[:] = [StubBackend("zz-refuser", device_reason=reason), backend_by_name("reference")]
    selector = BackendSelector(torch.device("cuda"))
    with caplog.at_level(logging.DEBUG, logger="qdit.kernels"):
        chosen = [selector.select(f"blocks.{i}.attn.to_q", NVFP4, 64, 64) for i in range(50)]
        chosen += [selector.select(f"blocks.{i}.attn.to_k", FP8, 64, 64) for i in range(50)]
    assert {b.name for b in chosen} == {"reference"}
    records = _kernel_records(caplog, reason)
    assert [r.levelno for r in records] == [logging.WARNING, logging.WARNING]  # one per scheme, not per layer
    assert "scheme nvfp4 " in records[0].getMessage() and "scheme fp8 " in records[1].getMessage()


def test_scheme_refusal_reason_is_logged(isolated_registry, caplog):
    reason = "stub computes fp8 only"
    isolated_registry._BACKENDS[:] = [StubBackend("zz-fp8", scheme_reason=reason, accepts=(Scheme.FP8,)),
                                      backend_by_name("reference")]
    selector = BackendSelector(torch.device("cpu"))
    with caplog.at_level(logging.DEBUG, logger="qdit.kernels"):
        assert selector.select("a", FP8, 64, 64).name == "zz-fp8"
        assert selector.select("b", NVFP4, 64, 64).name == "reference"
        assert selector.select("c", NVFP4, 64, 64).name == "reference"
    records = _kernel_records(caplog, reason)
    assert len(records) == 1
    assert f"zz-fp8: {reason}" in records[0].getMessage()


def test_first_accepting_backend_wins_before_reference(flux_fp8, isolated_registry):
    stub = StubBackend("zz-fp8", accepts=(Scheme.FP8,))
    registry.register_backend(stub)
    model = qdit.load_transformer(flux_fp8)
    assert model.qdit_load_report.backends == {"zz-fp8": 24}
    assert len(stub.prepared) == 24
    assert model.get_submodule("transformer_blocks.0.attn.to_q").backend is stub


def test_forced_backend_that_cannot_run_on_the_device(flux_nvfp4, isolated_registry):
    registry.register_backend(StubBackend("zz-gpu-only", device_reason="needs CUDA"))
    with pytest.raises(BackendUnavailableError, match="'zz-gpu-only' was requested but cannot run on cpu: needs CUDA"):
        qdit.load_transformer(flux_nvfp4, backend="zz-gpu-only")


def test_forced_backend_that_cannot_compute_a_layer(flux_nvfp4, isolated_registry):
    registry.register_backend(StubBackend("zz-fp8", scheme_reason="fp8 only", accepts=(Scheme.FP8,)))
    with pytest.raises(BackendUnavailableError, match="'zz-fp8' was requested but cannot compute layer") as exc:
        qdit.load_transformer(flux_nvfp4, backend="zz-fp8")
    assert "nvfp4" in str(exc.value) and "fp8 only" in str(exc.value)


def test_no_backend_at_all(isolated_registry):
    isolated_registry._BACKENDS[:] = [StubBackend("zz-a", device_reason="reason A"),
                                      StubBackend("zz-b", scheme_reason="reason B")]
    with pytest.raises(BackendUnavailableError, match="no kernel backend computes layer x.to_q") as exc:
        BackendSelector(torch.device("cpu")).select("x.to_q", NVFP4, 64, 64)
    assert "zz-a: reason A" in str(exc.value) and "zz-b: reason B" in str(exc.value)


def test_a_forced_only_backend_is_chosen_by_name_only(isolated_registry):
    """An exact-but-slower variant (svdq-hopper-exact) never wins automatic selection, even when it is the
    first backend that accepts the layer; asked for by name, it computes the layer."""
    exact = StubBackend("aa-exact", accepts=(Scheme.FP8,))
    exact.forced_only = True
    isolated_registry._BACKENDS[:] = [exact, backend_by_name("reference")]
    auto = BackendSelector(torch.device("cpu")).select("blocks.0.proj", FP8, 64, 64)
    assert auto.name == "reference"
    forced = BackendSelector(torch.device("cpu"), forced="aa-exact").select("blocks.0.proj", FP8, 64, 64)
    assert forced is exact


def test_svdq_hopper_exact_is_forced_only_and_refuses_nvfp4():
    exact = backend_by_name("svdq-hopper-exact")
    assert exact.forced_only
    verdict = exact.can_implement(LayerQuant(Scheme.SVDQ_NVFP4, lora_rank=32), 256, 256)
    assert not verdict.ok and "FP4 tensor cores" in verdict.reason and "svdq-hopper" in verdict.reason
    assert exact.can_implement(LayerQuant(Scheme.SVDQ_INT4, lora_rank=32), 256, 256).ok
