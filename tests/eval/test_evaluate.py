"""`qdit eval` on the shipped shapes model: every format qdit supports, with quality thresholds set from the
committed 200-prompt results (benchmarks/results/eval-shapes-h200/eval.md).

That run measured, against BF16 (accuracy 1.000): FP8 and FP8 per-channel (at load and as ModelOpt exports)
accuracy 1.000, PSNR 43.8-45.0 dB; NVFP4 and W4A16 NVFP4 0.995, 36.5 dB; NVFP4_SVD 1.000, 41.7 dB; mixed
FP8/NVFP4 1.000, 39.5-39.7 dB; converted Nunchaku INT4 1.000, 33.6 dB and NVFP4 1.000, 36.3 dB. Here 24
held-out prompts on the CPU reference backends keep the suite fast; one wrong image costs 4.2 points, so
"FP8 within 2 points of BF16" means no FP8 image may go wrong where BF16's is right.
"""

from __future__ import annotations

import json

import pytest

from qdit.errors import QditError
from qdit.eval.evaluate import (EvalSettings, SHIPPED_MODEL, evaluate, parse_formats, run_header,
                                write_report)
from qdit.eval.scenes import held_out_prompts

PROMPTS = 24

# format: (largest accuracy drop against BF16, lowest PSNR vs BF16 in dB, largest weight bytes vs BF16)
THRESHOLDS = {
    "fp8": (0.02, 40.0, 0.80),
    "fp8_per_channel": (0.02, 40.0, 0.80),
    "modelopt-fp8": (0.02, 40.0, 0.80),
    "modelopt-fp8_per_channel": (0.02, 40.0, 0.80),
    "nvfp4": (0.05, 32.0, 0.70),
    "w4a16_nvfp4": (0.05, 32.0, 0.70),
    "modelopt-nvfp4": (0.05, 32.0, 0.70),
    "nvfp4_svd": (0.05, 38.0, 0.95),
    "modelopt-nvfp4_svd": (0.05, 38.0, 0.95),
    "mixed_fp8_nvfp4": (0.05, 36.0, 0.72),
    "modelopt-mixed_fp8_nvfp4": (0.05, 36.0, 0.72),
    "nunchaku-int4": (0.05, 30.0, 0.45),
    "nunchaku-nvfp4": (0.05, 32.0, 0.45),
}


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    from tests.helpers.nunchaku_models import nunchaku_transformers

    work = tmp_path_factory.mktemp("nunchaku")
    folders = nunchaku_transformers(SHIPPED_MODEL, work, rank=16)
    names = [n for n in THRESHOLDS if not n.startswith("nunchaku-")]
    formats = parse_formats(",".join(["bf16", *names, *(f"{k}={v}" for k, v in folders.items())]))
    results, grid = evaluate(formats=formats, prompts=held_out_prompts(PROMPTS), device="cpu",
                             settings=EvalSettings(batch_size=PROMPTS))
    return {r.format: r for r in results}, grid


def test_bf16_model_draws_what_the_captions_say(evaluated):
    results, _ = evaluated
    bf16 = results["bf16"]
    assert bf16.accuracy["all"] >= 0.90  # the bar; measured 1.000 on 200 prompts
    assert bf16.psnr_vs_bf16 is None and bf16.weights_vs_bf16 == 1.0
    assert bf16.quantized_linears.startswith("0 of ")


@pytest.mark.parametrize("name", list(THRESHOLDS))
def test_format_quality_against_bf16(evaluated, name):
    results, _ = evaluated
    max_drop, min_psnr, max_weights = THRESHOLDS[name]
    r, bf16 = results[name], results["bf16"]
    assert r.accuracy["all"] >= bf16.accuracy["all"] - max_drop, (name, r.accuracy)
    assert r.psnr_vs_bf16 >= min_psnr, (name, r.psnr_vs_bf16)
    assert 0.9 < r.ssim_vs_bf16 < 1.0, (name, r.ssim_vs_bf16)  # < 1: the format really changed the images
    assert r.weights_vs_bf16 <= max_weights, (name, r.weights_vs_bf16)
    quantized, total = (int(x) for x in r.quantized_linears.split(" of "))
    assert quantized > 0 and total == int(bf16.quantized_linears.split(" of ")[1])


def test_low_rank_branch_recovers_quality(evaluated):
    results, _ = evaluated
    assert results["nvfp4_svd"].psnr_vs_bf16 > results["nvfp4"].psnr_vs_bf16 + 2


def test_report_files(evaluated, tmp_path):
    results, grid = evaluated
    header = run_header(SHIPPED_MODEL, held_out_prompts(PROMPTS), EvalSettings(), "cpu", "qdit eval (test)")
    table = write_report(list(results.values()), grid, tmp_path, header=header)
    assert (tmp_path / "eval.md").read_text() == table
    assert table.count("\n| ") == len(results) + 1  # header row + one row per format
    records = json.loads((tmp_path / "eval.json").read_text())["results"]
    assert [r["format"] for r in records] == list(results)
    for field in ("accuracy", "psnr_vs_bf16", "ssim_vs_bf16", "lpips_vs_bf16", "weight_bytes", "activation_bytes",
                  "peak_bytes", "seconds_per_image"):
        assert all(field in r for r in records)
    from PIL import Image

    with Image.open(tmp_path / "grid.png") as png:
        # Rows: the first 8 prompts; columns: one 128-px image per format.
        assert png.size == (128 * len(results), 128 * 8)
    assert "LPIPS not computed" in table or all(r["lpips_vs_bf16"] is not None for r in records[1:])


def test_parse_formats():
    assert parse_formats("fp8") == [("bf16", None), ("fp8", None)]  # BF16 always comes first: the reference
    with pytest.raises(QditError, match="unknown format 'fp9'"):
        parse_formats("bf16,fp9")
    with pytest.raises(QditError, match="not a folder"):
        parse_formats("mine=/no/such/folder")
    with pytest.raises(QditError, match="empty"):
        parse_formats(" , ")
    assert parse_formats("nvfp4+blocks,modelopt-fp8+blocks") == [
        ("bf16", None), ("nvfp4+blocks", None), ("modelopt-fp8+blocks", None)]
    for bad in ("bf16+blocks", "nvfp4+all", "modelopt-fp9+blocks"):
        with pytest.raises(QditError, match="unknown format"):
            parse_formats(bad)


def test_cli_eval_writes_table_json_and_grid(tmp_path, capsys):
    from qdit.cli import main

    out = tmp_path / "eval"
    assert main(["eval", "--formats", "fp8", "--prompts", "2", "--steps", "4", "--out", str(out),
                 "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "| bf16 |" in printed and "| fp8 |" in printed
    records = json.loads((out / "eval.json").read_text())
    assert records["header"]["prompts"] == 2 and records["header"]["steps"] == 4
    assert [r["format"] for r in records["results"]] == ["bf16", "fp8"]
    assert (out / "eval.md").exists() and (out / "grid.png").exists()


def test_cli_eval_reads_a_prompts_file(tmp_path):
    from qdit.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a small green square at the bottom on a gray background\n\n")
    assert main(["eval", "--formats", "bf16", "--prompts", str(prompts), "--steps", "2",
                 "--out", str(tmp_path / "o"), "--device", "cpu"]) == 0
    assert json.loads((tmp_path / "o" / "eval.json").read_text())["header"]["prompts"] == 1
