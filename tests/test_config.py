import pytest

from qdit.config import QditConfig, resolve_config
from qdit.errors import QditError


def test_yaml_round_trip(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("quantize: nvfp4\nsteps: 8\nvae_fp8: true\n")
    cfg = QditConfig.from_yaml(f)
    assert (cfg.quantize, cfg.steps, cfg.vae_fp8, cfg.height) == ("nvfp4", 8, True, 512)


def test_unknown_yaml_key_is_an_error(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("quantize: fp8\nnum_steps: 8\n")
    with pytest.raises(QditError, match="unknown key.*num_steps"):
        QditConfig.from_yaml(f)


@pytest.mark.parametrize("text,match", [("quantize: int3\n", "quantize"), ("steps: 0\n", "steps"),
                                        ("height: 100\n", "multiples of 16"), ("- a\n- b\n", "mapping"),
                                        ("a: [\n", "not valid YAML"),
                                        ("weights_4bit: fp4\n", "weights_4bit='fp4' is not one of packed, expanded_fp8")])
def test_bad_values(tmp_path, text, match):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(QditError, match=match):
        QditConfig.from_yaml(f)


def test_overrides_and_unknown_override():
    cfg = resolve_config(QditConfig(steps=3), {"seed": 7, "steps": None})
    assert (cfg.steps, cfg.seed) == (3, 7)
    with pytest.raises(QditError, match="unknown option"):
        resolve_config(None, {"stepz": 3})


def test_example_configs_load():
    from pathlib import Path

    files = sorted((Path(__file__).parents[1] / "examples" / "configs").glob("*.yaml"))
    assert len(files) == 9
    for f in files:
        QditConfig.from_yaml(f)


def test_quantize_layers_from_yaml_and_cli(tmp_path):
    from qdit.cli import build_parser

    f = tmp_path / "c.yaml"
    f.write_text("quantize: fp8\nquantize_layers: blocks\n")
    assert QditConfig.from_yaml(f).quantize_layers == "blocks"
    assert QditConfig().quantize_layers == "recipe"
    args = build_parser().parse_args(["generate", "--quantize", "fp8", "--quantize-layers", "blocks"])
    assert args.quantize_layers == "blocks"


def test_weights_4bit_from_yaml_and_cli(tmp_path):
    from qdit.cli import build_parser

    f = tmp_path / "c.yaml"
    f.write_text("quantize: nvfp4\nweights_4bit: expanded_fp8\n")
    assert QditConfig.from_yaml(f).weights_4bit == "expanded_fp8"
    assert QditConfig().weights_4bit == "packed"
    args = build_parser().parse_args(["generate", "--weights-4bit", "expanded_fp8"])
    assert args.weights_4bit == "expanded_fp8"
