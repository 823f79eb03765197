"""ModelOpt quantization-config detection and parsing, ignore-list semantics: qdit.formats.modelopt."""

from __future__ import annotations

import copy
import json
import logging
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import qdit
from qdit import formats
from qdit.errors import CheckpointError, UnsupportedFormatError
from qdit.formats import modelopt
from qdit.formats.checkpoint import open_checkpoint
from qdit.quant.scheme import Scheme

SAFETENSORS = "diffusion_pytorch_model.safetensors"


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def _state_bytes(model: torch.nn.Module) -> dict[str, bytes]:
    return {k: bytes(v.contiguous().reshape(-1).view(torch.uint8).numpy()) for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# Where the config is found
# ---------------------------------------------------------------------------------------------


def test_flat_config_in_config_json(flux_fp8):
    qc = _config(flux_fp8)["quantization_config"]
    fmt = formats.detect(open_checkpoint(flux_fp8))
    assert (fmt.name, fmt.quant_algo) == ("modelopt", "FP8")
    assert fmt.modelopt.source == str(flux_fp8 / "config.json")
    assert fmt.modelopt.ignore == qc["ignore"]
    assert "proj_out" in fmt.modelopt.ignore
    assert fmt.modelopt.producer == {"name": "modelopt", "version": "0.47.0"}


def test_bf16_checkpoint_has_no_quantization_config(flux_bf16):
    fmt = formats.detect(open_checkpoint(flux_bf16))
    assert (fmt.name, fmt.quant_algo, fmt.modelopt) == ("bf16", None, None)


def _nested_sidecar(flat: dict) -> dict:
    return {
        "producer": flat["producer"],
        "quantization": {"quant_algo": flat["quant_algo"], "group_size": 16, "exclude_modules": flat["ignore"],
                         "kv_cache_quant_algo": None, "has_zero_point": False, "pre_quant_scale": False},
    }


def test_nested_hf_quant_config_json(flux_nvfp4, ckpt_variant):
    config = _config(flux_nvfp4)
    flat = config.pop("quantization_config")
    folder = ckpt_variant(flux_nvfp4, config=config)
    (folder / "hf_quant_config.json").write_text(json.dumps(_nested_sidecar(flat)))

    fmt = formats.detect(open_checkpoint(folder))
    assert (fmt.name, fmt.quant_algo) == ("modelopt", "NVFP4")
    assert fmt.modelopt.source == str(folder / "hf_quant_config.json")
    assert fmt.modelopt.ignore == flat["ignore"]  # exclude_modules -> ignore
    assert fmt.modelopt.producer["name"] == "modelopt"

    from_sidecar = qdit.load_transformer(folder)
    from_flat = qdit.load_transformer(flux_nvfp4)
    assert from_sidecar.qdit_plan == from_flat.qdit_plan
    assert from_sidecar.qdit_plan["proj_out"].scheme is Scheme.BF16
    assert from_sidecar.qdit_plan["transformer_blocks.0.attn.to_q"].scheme is Scheme.NVFP4
    assert _state_bytes(from_sidecar) == _state_bytes(from_flat)


def test_config_json_takes_priority_over_hf_quant_config(flux_fp8, ckpt_variant):
    folder = ckpt_variant(flux_fp8)
    sidecar = _nested_sidecar(_config(flux_fp8)["quantization_config"])
    sidecar["quantization"]["quant_algo"] = "W8A8_SQ_PER_CHANNEL"  # would be refused if it were read
    (folder / "hf_quant_config.json").write_text(json.dumps(sidecar))
    fmt = formats.detect(open_checkpoint(folder))
    assert fmt.quant_algo == "FP8"
    assert fmt.modelopt.source == str(folder / "config.json")


def test_config_in_safetensors_header_metadata(flux_fp8, ckpt_variant):
    config = _config(flux_fp8)
    flat = config.pop("quantization_config")
    folder = ckpt_variant(flux_fp8, config=config)
    tensors = load_file(str(folder / SAFETENSORS))
    save_file(tensors, str(folder / SAFETENSORS), metadata={"format": "pt", "quantization_config": json.dumps(flat)})
    fmt = formats.detect(open_checkpoint(folder))
    assert (fmt.name, fmt.quant_algo) == ("modelopt", "FP8")
    assert fmt.modelopt.source == f"{folder / SAFETENSORS} (header metadata)"
    model = qdit.load_transformer(folder)
    assert model.qdit_plan == qdit.load_transformer(flux_fp8).qdit_plan


@pytest.mark.parametrize("method", ["modelopt", "modelopt_fp4", "modelopt_mixed"])
def test_quant_method_aliases(flux_fp8, ckpt_variant, method):
    config = _config(flux_fp8)
    config["quantization_config"]["quant_method"] = method
    folder = ckpt_variant(flux_fp8, config=config)
    fmt = formats.detect(open_checkpoint(folder))
    assert (fmt.name, fmt.quant_algo) == ("modelopt", "FP8")
    model = qdit.load_transformer(folder)
    assert model.qdit_load_report.backends and sum(model.qdit_load_report.backends.values()) == 24


def test_producer_name_alone_identifies_modelopt():
    raw = {"producer": {"name": "modelopt", "version": "0.47.0"}, "quant_algo": "NVFP4", "ignore": ["proj_out"]}
    cfg = modelopt.parse_modelopt_config(raw, "somewhere/config.json")
    assert cfg is not None
    assert (cfg.quant_algo, cfg.ignore, cfg.source) == ("NVFP4", ["proj_out"], "somewhere/config.json")


def test_non_modelopt_quantization_config(flux_fp8, ckpt_variant):
    config = _config(flux_fp8)
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    folder = ckpt_variant(flux_fp8, config=config)
    assert modelopt.parse_modelopt_config(config["quantization_config"], "x") is None
    with pytest.raises(UnsupportedFormatError, match="quantization config qdit does not read") as exc:
        qdit.load_transformer(folder)
    assert exc.value.file == str(folder / "config.json")
    assert "bitsandbytes" in exc.value.found


@pytest.mark.parametrize("algo", ["W8A8_SQ_PER_CHANNEL", "fp8_pb_wo", "MXFP8", "W4A8_NVFP4_FP8"])
def test_unknown_quant_algo(flux_fp8, ckpt_variant, algo):
    config = _config(flux_fp8)
    config["quantization_config"]["quant_algo"] = algo
    folder = ckpt_variant(flux_fp8, config=config)
    for call in (qdit.load_transformer, qdit.inspect):
        with pytest.raises(UnsupportedFormatError, match="unknown ModelOpt quant_algo") as exc:
            call(folder)
        assert exc.value.file == str(folder / "config.json")
        assert algo in exc.value.found
        message = str(exc.value)
        assert str(folder / "config.json") in message and algo in message


def test_unknown_quant_algo_in_nested_sidecar(flux_fp8, ckpt_variant):
    config = _config(flux_fp8)
    flat = config.pop("quantization_config")
    flat["quant_algo"] = "fp8_pb_wo"
    folder = ckpt_variant(flux_fp8, config=config)
    (folder / "hf_quant_config.json").write_text(json.dumps(_nested_sidecar(flat)))
    with pytest.raises(UnsupportedFormatError) as exc:
        qdit.load_transformer(folder)
    assert exc.value.file == str(folder / "hf_quant_config.json")
    assert "fp8_pb_wo" in exc.value.found


# ---------------------------------------------------------------------------------------------
# Ignore-list semantics
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, pattern, expected", [
    ("transformer_blocks.1.attn.to_q", "transformer_blocks.1*", True),
    ("transformer_blocks.10.attn.to_q", "transformer_blocks.1*", True),
    ("transformer_blocks.19.ff.net.2", "transformer_blocks.1*", True),
    ("transformer_blocks.2.attn.to_q", "transformer_blocks.1*", False),
    ("transformer_blocks.21.attn.to_q", "transformer_blocks.1*", False),
    ("single_transformer_blocks.1.attn.to_q", "transformer_blocks.1*", False),
    ("transformer_blocks.1.attn.to_q", "transformer_blocks.1.*", True),
    ("transformer_blocks.10.attn.to_q", "transformer_blocks.1.*", False),
    ("transformer_blocks.1", "transformer_blocks.1.*", False),
    ("proj_out", "proj_out", True),
    ("single_transformer_blocks.0.proj_out", "proj_out", False),
    ("proj_out_2", "proj_out", False),
    ("norm_out.linear", "norm_out*", True),
    ("Transformer_blocks.1.attn.to_q", "transformer_blocks.1*", False),
])
def test_matches_ignore(name, pattern, expected):
    assert modelopt.matches_ignore(name, pattern) is expected


QWEN_LAYERS = 12
_BLOCK = re.compile(r"^transformer_blocks\.(\d+)\.")


@pytest.fixture(scope="module")
def qwen12(tmp_path_factory):
    """A 12-block Qwen-Image (blocks 0-11: the pattern transformer_blocks.1* covers 1, 10 and 11)."""
    from qdit.models import adapter_by_name
    from qdit.tools.embedded import random_model

    config = {**adapter_by_name("qwen-image").tiny_config, "num_layers": QWEN_LAYERS}
    model = random_model("qwen-image", config=config)
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    base_config = {"_class_name": type(model).__name__,
                   **{k: v for k, v in dict(model.config).items() if not k.startswith("_")}}
    return tmp_path_factory.mktemp("qwen12"), linears, state, base_config


def _fp8_per_channel_checkpoint(qwen12, name: str, bf16_blocks: set[int], ignore: list[str]) -> Path:
    """Every Linear FP8 per-channel except those of `bf16_blocks`; quantization_config.ignore = `ignore`."""
    root, linears, state, base_config = qwen12
    tensors = dict(state)
    for layer in linears:
        m = _BLOCK.match(layer)
        if m and int(m.group(1)) in bf16_blocks:
            continue
        w = tensors[f"{layer}.weight"].float()
        scale = (w.abs().amax(dim=1) / 448.0).clamp(min=1e-12)
        tensors[f"{layer}.weight"] = (w / scale[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
        tensors[f"{layer}.weight_scale"] = scale
    folder = root / name
    folder.mkdir()
    config = dict(base_config, quantization_config={
        "quant_method": "modelopt", "producer": {"name": "modelopt", "version": "0.47.0"},
        "quant_algo": "FP8_PER_CHANNEL_PER_TOKEN", "ignore": ignore})
    (folder / "config.json").write_text(json.dumps(config, default=list))
    save_file(tensors, str(folder / SAFETENSORS), metadata={"format": "pt"})
    return folder


def _bf16_blocks(plan) -> set[int]:
    blocks = set()
    for name, lq in plan.items():
        m = _BLOCK.match(name)
        if lq.scheme is Scheme.BF16:
            assert m is not None, f"{name} should be quantized"
            blocks.add(int(m.group(1)))
        else:
            assert lq.scheme is Scheme.FP8_PER_CHANNEL
    return blocks


def test_prefix_wildcard_covers_blocks_1_and_10_to_19(qwen12):
    folder = _fp8_per_channel_checkpoint(qwen12, "star", {1, 10, 11}, ["transformer_blocks.1*"])
    model = qdit.load_transformer(folder)
    assert _bf16_blocks(model.qdit_plan) == {1, 10, 11}
    assert type(model.transformer_blocks[10].attn.to_q) is torch.nn.Linear
    assert type(model.transformer_blocks[2].attn.to_q).__name__ == "QuantLinear"


def test_dot_star_wildcard_covers_only_block_1(qwen12):
    folder = _fp8_per_channel_checkpoint(qwen12, "dotstar", {1}, ["transformer_blocks.1.*"])
    model = qdit.load_transformer(folder)
    assert _bf16_blocks(model.qdit_plan) == {1}
    assert type(model.transformer_blocks[10].attn.to_q).__name__ == "QuantLinear"


def test_prefix_wildcard_is_not_dot_star(qwen12):
    """Block 10 is FP8 on disk, but `transformer_blocks.1*` says it is BF16: that contradiction is an error."""
    folder = _fp8_per_channel_checkpoint(qwen12, "wrongstar", {1}, ["transformer_blocks.1*"])
    with pytest.raises(CheckpointError, match="does not have the dtype") as exc:
        qdit.load_transformer(folder)
    assert re.match(r"transformer_blocks\.1[01]\.", exc.value.layer)
    assert exc.value.found == "float8_e4m3fn"


def test_exact_names(qwen12):
    folder = _fp8_per_channel_checkpoint(qwen12, "exact", set(), ["transformer_blocks.3.attn.to_q"])
    # block 3's to_q must stay BF16 on disk for this checkpoint: rewrite just that layer
    tensors = load_file(str(folder / SAFETENSORS))
    _, _, state, _ = qwen12
    tensors["transformer_blocks.3.attn.to_q.weight"] = state["transformer_blocks.3.attn.to_q.weight"]
    del tensors["transformer_blocks.3.attn.to_q.weight_scale"]
    save_file(tensors, str(folder / SAFETENSORS), metadata={"format": "pt"})
    model = qdit.load_transformer(folder)
    excluded = sorted(n for n, lq in model.qdit_plan.items() if not lq.quantized)
    assert excluded == ["transformer_blocks.3.attn.to_q"]


def test_ignore_pattern_matching_no_linear_warns_and_loads(flux_fp8, ckpt_variant, caplog):
    config = _config(flux_fp8)
    config["quantization_config"]["ignore"].append("transformer.proj_out")  # a component-prefixed mistake
    folder = ckpt_variant(flux_fp8, config=config)
    with caplog.at_level(logging.WARNING, logger="qdit"):
        model = qdit.load_transformer(folder)
    warnings = [r for r in caplog.records if r.name.startswith("qdit.formats") and r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    message = warnings[0].getMessage()
    assert "'transformer.proj_out'" in message and "matches no Linear" in message
    assert str(folder / "config.json") in message
    assert model.qdit_plan == qdit.load_transformer(flux_fp8).qdit_plan


def test_config_ignore_patterns_all_match_no_warning(flux_fp8, caplog):
    with caplog.at_level(logging.WARNING, logger="qdit"):
        qdit.load_transformer(flux_fp8)
    assert not [r for r in caplog.records if "matches no Linear" in r.getMessage()]


# ---------------------------------------------------------------------------------------------
# Config vs tensors
# ---------------------------------------------------------------------------------------------


def test_layer_not_ignored_but_stored_bf16(flux_fp8, ckpt_variant):
    config = _config(flux_fp8)
    config["quantization_config"]["ignore"].remove("proj_out")
    folder = ckpt_variant(flux_fp8, config=config)
    with pytest.raises(CheckpointError, match="does not have the dtype its quantization config implies") as exc:
        qdit.load_transformer(folder)
    e = exc.value
    assert (e.layer, e.tensor, e.found) == ("proj_out", "proj_out.weight", "bfloat16")
    assert e.expected.startswith("float8_e4m3fn")
    assert e.file == str(folder / SAFETENSORS)
    for part in ("proj_out.weight", "float8_e4m3fn", "bfloat16"):
        assert part in str(e)


def test_layer_ignored_but_stored_quantized(flux_fp8, ckpt_variant):
    config = _config(flux_fp8)
    config["quantization_config"]["ignore"].append("transformer_blocks.0.attn.to_q")
    folder = ckpt_variant(flux_fp8, config=config)
    with pytest.raises(CheckpointError, match="does not have the dtype") as exc:
        qdit.load_transformer(folder)
    e = exc.value
    assert (e.layer, e.tensor, e.found) == ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_q.weight",
                                            "float8_e4m3fn")
    assert "bf16" in e.expected


def test_mixed_precision_quantized_layers_are_authoritative(flux_fp8, ckpt_variant):
    config = _config(flux_fp8)
    qc = config["quantization_config"]
    fp8_layers = sorted(n for n, lq in qdit.load_transformer(flux_fp8).qdit_plan.items() if lq.quantized)
    config["quantization_config"] = {
        "quant_method": "modelopt", "producer": qc["producer"], "quant_algo": "MIXED_PRECISION", "ignore": [],
        "quantized_layers": {n: {"quant_algo": "FP8"} for n in fp8_layers}}
    model = qdit.load_transformer(ckpt_variant(flux_fp8, "mixed", config=config))
    assert sorted(n for n, lq in model.qdit_plan.items() if lq.quantized) == fp8_layers

    dropped = copy.deepcopy(config)
    del dropped["quantization_config"]["quantized_layers"]["transformer_blocks.0.attn.to_k"]
    with pytest.raises(CheckpointError) as exc:
        qdit.load_transformer(ckpt_variant(flux_fp8, "mixed-dropped", config=dropped))
    assert exc.value.layer == "transformer_blocks.0.attn.to_k"
    assert exc.value.found == "float8_e4m3fn"


def test_mixed_precision_entry_that_is_not_an_object(flux_fp8, ckpt_variant):
    """A malformed quantized_layers entry is a CheckpointError naming the file and the layer."""
    config = _config(flux_fp8)
    config["quantization_config"] = {"quant_method": "modelopt", "quant_algo": "MIXED_PRECISION", "ignore": [],
                                     "quantized_layers": {"transformer_blocks.0.attn.to_q": "FP8"}}
    folder = ckpt_variant(flux_fp8, config=config)
    with pytest.raises(CheckpointError) as exc:
        qdit.load_transformer(folder)
    assert exc.value.file == str(folder / "config.json")
    assert exc.value.layer == "transformer_blocks.0.attn.to_q"


def test_load_time_quantization_logs_layers_kept_for_odd_dimensions(caplog):
    import logging

    from qdit.api import random_transformer
    from qdit.models import adapter_by_name

    config = dict(adapter_by_name("z-image").tiny_config, dim=64, n_heads=2, n_kv_heads=2)  # FFN width 170
    with caplog.at_level(logging.WARNING, logger="qdit.formats"):
        model = random_transformer("z-image", config=config, quantize="fp8")
    records = [r for r in caplog.records if "not multiples of 16" in r.getMessage()]
    assert len(records) == 1 and "170" in records[0].getMessage()
    assert model.qdit_plan["layers.0.feed_forward.w2"].quantized is False
