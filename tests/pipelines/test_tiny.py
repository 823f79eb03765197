"""Tiny diffusers pipeline folders: build, reload offline, generate on CPU, swap in qdit's transformer."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from safetensors import safe_open

from qdit.pipelines.tiny import MODELS, QWEN_IMAGE_DROP, QWEN_IMAGE_TEMPLATE, build_tiny_pipeline, tiny_pipeline

CLASSES = {"qwen-image": "QwenImagePipeline", "z-image": "ZImagePipeline", "flux": "FluxPipeline"}
# What each published pipeline is run with: Qwen-Image true CFG with a negative prompt, FLUX-dev
# distilled guidance, Z-Image CFG with a negative prompt.
CALL_KWARGS = {
    "qwen-image": {"negative_prompt": " ", "true_cfg_scale": 4.0},
    "z-image": {"negative_prompt": "", "guidance_scale": 4.0},
    "flux": {"guidance_scale": 3.5},
}


@pytest.fixture(scope="module", params=MODELS)
def folder(request, tmp_path_factory):
    return request.param, build_tiny_pipeline(request.param, tmp_path_factory.mktemp("pipe") / request.param)


def _load(path, **kwargs):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(path, dtype=torch.bfloat16, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe, model, *, seed=0, output_type="pil", height=64, width=64):
    return pipe(prompt="a red circle", num_inference_steps=2, height=height, width=width,
                generator=torch.Generator().manual_seed(seed), output_type=output_type,
                **CALL_KWARGS[model]).images[0]


def test_folder_layout(folder):
    model, path = folder
    index = json.loads((path / "model_index.json").read_text())
    assert index["_class_name"] == CLASSES[model]
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert size < 10 * 2**20, f"{model}: {size / 2**20:.1f} MB"
    tr = path / "transformer"
    assert sorted(f.name for f in tr.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    with safe_open(tr / "diffusion_pytorch_model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    from qdit.models import adapter_by_name

    config = json.loads((tr / "config.json").read_text())
    assert {k: config[k] for k in adapter_by_name(model).tiny_config} == json.loads(
        json.dumps(adapter_by_name(model).tiny_config))


def test_generates_deterministically(folder):
    model, path = folder
    pipe = _load(path)
    assert type(pipe).__name__ == CLASSES[model]
    _generate(pipe, model)  # warm-up (first-call costs)
    t = time.perf_counter()
    image = _generate(pipe, model)
    seconds = time.perf_counter() - t
    assert image.size == (64, 64)
    again = _generate(pipe, model)
    assert np.array_equal(np.asarray(image), np.asarray(again))
    other = _generate(pipe, model, seed=1)
    assert not np.array_equal(np.asarray(image), np.asarray(other))
    wide = _generate(pipe, model, height=64, width=96)
    assert wide.size == (96, 64)
    # ~0.03-0.06 s on 2 CPU threads; the bound only catches pathologies (a loaded host can be 50x slower).
    assert seconds < 30, f"{model}: {seconds:.2f} s per 2-step generation"


def test_qdit_transformer_swaps_in(folder):
    """qdit.load_transformer reads the pipeline folder; swapped into the pipeline, it draws the same image."""
    import qdit

    model, path = folder
    reference = _generate(_load(path), model, output_type="np")
    transformer = qdit.load_transformer(path)
    pipe = _load(path, transformer=transformer)
    assert pipe.transformer is transformer
    assert np.array_equal(_generate(pipe, model, output_type="np"), reference)


def test_build_is_reproducible(folder, tmp_path):
    model, path = folder
    again = build_tiny_pipeline(model, tmp_path / model)
    files = sorted(f.relative_to(path) for f in path.rglob("*") if f.is_file())
    assert files == sorted(f.relative_to(again) for f in again.rglob("*") if f.is_file())
    for f in files:
        assert (path / f).read_bytes() == (again / f).read_bytes(), f


def test_qwen_image_template_drop(tmp_path):
    """QwenImagePipeline drops the first 34 tokens of its template: exactly the template's prefix here."""
    from qdit.pipelines.tiny import qwen_tokenizer

    path = tmp_path / "tok"
    qwen_tokenizer().save_pretrained(path)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    assert type(tok).__name__ == "Qwen2Tokenizer"
    prefix, suffix = QWEN_IMAGE_TEMPLATE.split("{}")
    assert len(tok(prefix).input_ids) == QWEN_IMAGE_DROP
    full = tok(QWEN_IMAGE_TEMPLATE.format("a red circle")).input_ids
    assert tok.decode(full[QWEN_IMAGE_DROP:]) == "a red circle" + suffix


def test_tiny_pipeline_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QDIT_CACHE", str(tmp_path))
    path = tiny_pipeline("z-image", seed=3)
    assert path == tmp_path / "embedded" / "z-image-pipeline-seed3"
    assert (path / "model_index.json").is_file()
    stamp = (path / "model_index.json").stat().st_mtime_ns
    assert tiny_pipeline("z-image", seed=3) == path
    assert (path / "model_index.json").stat().st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "embedded").iterdir()] == [path.name]


def test_unknown_model(tmp_path, monkeypatch):
    from qdit.errors import UnsupportedFormatError

    monkeypatch.setenv("QDIT_CACHE", str(tmp_path))
    with pytest.raises(UnsupportedFormatError):
        tiny_pipeline("sdxl")
    with pytest.raises(UnsupportedFormatError):
        build_tiny_pipeline("sdxl", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_loads_without_dtype(folder):
    """Non-transformer components are stored in float32: a load without dtype= runs in float32 throughout."""
    from diffusers import DiffusionPipeline

    model, path = folder

    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.transformer.dtype == pipe.text_encoder.dtype == pipe.vae.dtype == torch.float32
    assert _generate(pipe, model).size == (64, 64)
