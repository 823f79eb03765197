"""load_pipeline / generate on tiny Qwen-Image, Z-Image and FLUX pipelines (diffusers' own classes)."""

import numpy as np
import pytest
import torch

import qdit
from qdit.errors import CheckpointError, QditError
from qdit.quant.storage import weight_bytes
from qdit.pipelines.load import check_writable
from qdit.pipelines.tiny import build_tiny_pipeline
from qdit.tools.quantize import quantize_pipeline

MODELS = ["qwen-image", "z-image", "flux"]
PROMPT = "a large red circle on the left"
GEN = dict(steps=2, height=64, width=64, seed=0, progress=False)
# PSNR of quantized against BF16 images from the same seed, measured on these random-weight tiny
# pipelines (2 steps, 64x64); the floors sit a few dB under the lowest value measured.
MIN_PSNR = {"fp8": 25.0, "nvfp4": 15.0}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {m: build_tiny_pipeline(m, tmp_path_factory.mktemp(m)) for m in MODELS}


@pytest.fixture(scope="module")
def bf16_images(folders):
    out = {}
    for m in MODELS:
        pipe = qdit.load_pipeline(folders[m], device="cpu", quantize="none")
        out[m] = np.asarray(qdit.generate(pipe, PROMPT, **GEN).images[0], dtype=np.float64)
    return out


def psnr(a, b):
    mse = np.mean((a - b) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
@pytest.mark.parametrize("fp8_storage", [False, True], ids=["bf16-te-vae", "fp8-te-vae"])
@pytest.mark.parametrize("model", MODELS)
def test_quantized_pipeline_close_to_bf16(folders, bf16_images, model, fmt, fp8_storage):
    pipe = qdit.load_pipeline(folders[model], device="cpu", quantize=fmt, text_encoder_fp8=fp8_storage,
                              vae_fp8=fp8_storage)
    result = qdit.generate(pipe, PROMPT, **GEN)
    image = np.asarray(result.images[0], dtype=np.float64)
    assert image.shape == (64, 64, 3)
    value = psnr(image, bf16_images[model])
    print(f"{model} {fmt} fp8-te/vae={fp8_storage}: PSNR vs BF16 {value:.1f} dB, {result.seconds_per_step:.3f} s/step")
    assert value > MIN_PSNR[fmt]
    assert result.metadata["model"] == model and fmt in result.metadata["quantization"]


@pytest.mark.parametrize("model", MODELS)
def test_fp8_storage_halves_text_encoder_and_vae(folders, model):
    from qdit.pipelines.fp8_storage import FP8StorageLayer

    plain = qdit.load_pipeline(folders[model], device="cpu", quantize="fp8")
    fp8 = qdit.load_pipeline(folders[model], device="cpu", quantize="fp8", text_encoder_fp8=True, vae_fp8=True)
    for name in ("text_encoder", "text_encoder_2", "vae"):
        if getattr(plain, name, None) is None:
            continue
        before_all, after_all = weight_bytes(getattr(plain, name)), weight_bytes(getattr(fp8, name))
        converted = [n for n, m in getattr(fp8, name).named_modules() if isinstance(m, FP8StorageLayer)]
        plain_modules = dict(getattr(plain, name).named_modules())
        fp8_modules = dict(getattr(fp8, name).named_modules())
        before = sum(weight_bytes(plain_modules[n]) for n in converted)
        after = sum(weight_bytes(fp8_modules[n]) for n in converted)
        print(f"{model} {name}: whole component {before_all} -> {after_all} bytes; "
              f"{len(converted)} converted layers {before} -> {after} bytes")
        assert after_all <= before_all
        if converted:  # tiny CLIP layers are all under the size floor and stay BF16
            assert after < 0.6 * before and after_all < before_all
    assert fp8.vae.dtype == torch.bfloat16 and fp8.text_encoder.dtype == torch.bfloat16
    assert any(isinstance(m, FP8StorageLayer) for m in fp8.vae.modules())


def test_quantize_pipeline_then_generate(folders, tmp_path):
    dst = quantize_pipeline(folders["flux"], tmp_path / "flux-nvfp4", "nvfp4")
    info = qdit.inspect(dst)
    assert info["format"] == "modelopt" and info["quant_algo"] == "NVFP4"
    pipe = qdit.load_pipeline(dst, device="cpu")  # quantize=auto reads the export
    assert np.asarray(qdit.generate(pipe, PROMPT, **GEN).images[0]).shape == (64, 64, 3)
    with pytest.raises(QditError, match="quantize=none asks for BF16"):
        qdit.load_pipeline(dst, device="cpu", quantize="none")
    with pytest.raises(QditError, match="already quantized"):
        qdit.load_pipeline(dst, device="cpu", quantize="fp8")


def test_quantize_layers_reaches_the_pipeline_transformer(folders, tmp_path, capsys):
    """quantize_layers="blocks" from the API, the CLI and qdit quantize --pipeline; the PNG metadata and
    the CLI summary say how many Linears are quantized."""
    from PIL import Image

    from qdit.cli import main

    pipe = qdit.load_pipeline(folders["flux"], device="cpu", quantize="fp8", quantize_layers="blocks")
    plan = pipe.transformer.qdit_plan
    assert plan["single_transformer_blocks.0.proj_out"].quantized
    count = f"{sum(lq.quantized for lq in plan.values())} of {len(plan)}"
    assert qdit.generate(pipe, PROMPT, **GEN).metadata["quantized_linears"] == count
    with pytest.raises(QditError, match="loaded as it is"):  # quantize=auto on a BF16 pipeline
        qdit.load_pipeline(folders["flux"], device="cpu", quantize_layers="blocks")

    out = tmp_path / "blocks.png"
    assert main(["generate", "--model", str(folders["flux"]), "--prompt", PROMPT, "--quantize", "fp8",
                 "--quantize-layers", "blocks", "--steps", "2", "--height", "64", "--width", "64",
                 "--device", "cpu", "--output", str(out)]) == 0
    assert f"({count} Linears)" in capsys.readouterr().out
    assert Image.open(out).text["quantized_linears"] == count

    dst = quantize_pipeline(folders["flux"], tmp_path / "flux-fp8-blocks", "fp8", quantize_layers="blocks")
    assert "single_transformer_blocks.0.proj_out" not in qdit.inspect(dst)["excluded"]


def test_missing_component_folder(folders, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(folders["flux"], broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(CheckpointError, match="component folder vae/ is missing"):
        qdit.load_pipeline(broken, device="cpu")
    with pytest.raises(CheckpointError, match="model_index.json is missing"):
        qdit.load_pipeline(broken / "transformer", device="cpu")


def test_prompt_too_long(folders):
    pipe = qdit.load_pipeline(folders["z-image"], device="cpu", quantize="fp8")
    with pytest.raises(QditError, match="tokens long"):
        qdit.generate(pipe, "red circle " * 600, **GEN)


def test_unwritable_output(tmp_path):
    with pytest.raises(QditError, match="does not exist"):
        check_writable(tmp_path / "no-such-folder" / "x.png")


def test_cli_generate_embedded_default(tmp_path, monkeypatch, capsys):
    """No --model: the shipped shapes model, with its own defaults, draws the scene the prompt asks for."""
    from PIL import Image

    from qdit.cli import main
    from qdit.eval.scorer import score

    monkeypatch.setenv("QDIT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "img.png"
    prompt = "a large red circle at the top left on a white background"
    assert main(["generate", "--prompt", prompt, "--output", str(out), "--device", "cpu"]) == 0
    image = Image.open(out)
    assert image.size == (128, 128)  # the shipped model's qdit.yaml, not the generic defaults
    assert image.text["prompt"] == prompt and image.text["quantization"] == "bf16"
    pixels = torch.from_numpy(np.asarray(image.convert("RGB"))).permute(2, 0, 1).float() / 255
    assert score(pixels, prompt).all_correct
    assert "s/step" in capsys.readouterr().out
    assert main(["generate", "--prompt", "x", "--output", str(tmp_path / "nope" / "a.png")]) == 2


def test_compile_option_wraps_every_repeated_block(folders):
    pipe = qdit.load_pipeline(folders["flux"], device="cpu", quantize="fp8", compile=True)
    blocks = list(pipe.transformer.transformer_blocks) + list(pipe.transformer.single_transformer_blocks)
    assert blocks and all(getattr(b, "_compiled_call_impl", None) is not None for b in blocks)
