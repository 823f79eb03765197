"""CPU smoke test of the shapes model's training script: a tiny transformer and VAE, a handful of
steps; the folder it writes loads with qdit and generates. The pieces are checked on their own too."""

from __future__ import annotations

import functools
import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

import qdit
from qdit.eval import scenes
from qdit.tools import train_shapes
from qdit.tools.train_shapes import (
    caption_embeddings, latent_dataset, main, set_latent_statistics, train, train_transformer, train_vae,
    untrained_pipeline,
)

# Smallest configs the pipeline accepts: 4 latent channels (in_channels = 4 x 2x2 patch), rope axes
# summing to the head dim, a text width divisible by 32 (the tiny Qwen2.5-VL encoder's mrope split).
TINY_TRANSFORMER = {
    "patch_size": 2, "in_channels": 16, "out_channels": 4, "num_layers": 1, "attention_head_dim": 16,
    "num_attention_heads": 2, "joint_attention_dim": 32, "axes_dims_rope": [4, 6, 6], "guidance_embeds": False,
}
TINY_VAE = {
    "base_dim": 4, "z_dim": 4, "dim_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_scales": [],
    "temperal_downsample": [False, True, True],
}
VAE_STEPS, DIT_STEPS, BATCH, DATASET = 6, 12, 4, 16
CPU = torch.device("cpu")


from tests.helpers.threads import one_thread  # noqa: E402,F401 (autouse: one intra-op thread)


def _fewer_statistics_samples(monkeypatch):
    # train() has no knob for set_latent_statistics' 2048 renders (30+ s through the VAE on CPU);
    # one batch of 256 exercises the same code.
    monkeypatch.setattr(train_shapes, "set_latent_statistics",
                        functools.partial(train_shapes.set_latent_statistics, n=256))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        _fewer_statistics_samples(mp)
        return train(tmp_path_factory.mktemp("train") / "shapes", device="cpu", minutes=1.0, max_steps=DIT_STEPS,
                     vae_steps=VAE_STEPS, batch=BATCH, dataset=DATASET, seed=0,
                     transformer_config=TINY_TRANSFORMER, vae_config=TINY_VAE)


def _log(folder) -> dict:
    return json.loads((folder / "train_log.json").read_text())


# ---------------------------------------------------------------------------------------------
# train(): the whole script, tiny
# ---------------------------------------------------------------------------------------------

def test_train_writes_a_pipeline_folder(trained):
    index = json.loads((trained / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImagePipeline"
    for component in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (trained / component).is_dir(), component
    config = json.loads((trained / "transformer" / "config.json").read_text())
    assert {k: config[k] for k in TINY_TRANSFORMER} == TINY_TRANSFORMER
    with safe_open(trained / "transformer" / "diffusion_pytorch_model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}  # shipped in BF16


def test_train_log_records_settings_and_every_phase(trained):
    summary = _log(trained)
    assert summary["transformer_steps"] == DIT_STEPS
    assert (summary["vae_steps"], summary["batch"], summary["dataset"], summary["seed"]) == (
        VAE_STEPS, BATCH, DATASET, 0)
    assert summary["device"] == "cpu" and summary["checks"] == []
    assert summary["transformer_config"] == TINY_TRANSFORMER and summary["vae_config"] == TINY_VAE
    assert summary["init"] is None and summary["previous"] is None
    log = summary["log"]
    vae = [e for e in log if e["phase"] == "vae"]
    dit = [e for e in log if e["phase"] == "transformer" and "step" in e]
    assert [e["step"] for e in vae] == [0, VAE_STEPS - 1]  # first and last step are always logged
    assert [e["step"] for e in dit] == [0, DIT_STEPS - 1]
    losses = [e["recon"] for e in vae] + [e["kl"] for e in vae] + [e["loss"] for e in dit]
    assert all(math.isfinite(v) for v in losses), losses
    assert all(e["loss"] > 0 for e in dit)
    assert summary["seconds_total"] >= summary["seconds_vae"] > 0


def test_vae_config_carries_the_latent_statistics(trained):
    config = json.loads((trained / "vae" / "config.json").read_text())
    z = TINY_VAE["z_dim"]
    mean, std = config["latents_mean"], config["latents_std"]
    assert len(mean) == len(std) == z
    assert all(math.isfinite(v) for v in mean + std) and all(v > 0 for v in std)
    assert (mean, std) != ([0.0] * z, [1.0] * z)  # not the untrained pipeline's placeholders


def test_trained_folder_loads_with_qdit_and_generates(trained):
    pipe = qdit.load_pipeline(trained, device="cpu")
    assert type(pipe.transformer).__name__ == "QwenImageTransformer2DModel"
    result = qdit.generate(pipe, "a large red circle at the top left on a white background", height=128,
                           width=128, steps=2, progress=False)
    assert len(result.images) == 1 and result.images[0].size == (128, 128)
    # PIL would hide NaNs (as black): check the decoded tensor too.
    pixels = pipe(prompt="a small blue square in the center on a gray background", height=128, width=128,
                  num_inference_steps=2, true_cfg_scale=3.0, negative_prompt="", output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    assert pixels.shape == (1, 3, 128, 128)
    assert torch.isfinite(pixels).all() and pixels.min() >= 0 and pixels.max() <= 1


def test_continue_training_from_a_folder_keeps_its_vae(trained, tmp_path):
    more = train(tmp_path / "more", device="cpu", minutes=1.0, max_steps=3, batch=BATCH, dataset=8, seed=1,
                 init=trained)
    before, after = load_file(trained / "vae" / "diffusion_pytorch_model.safetensors"), load_file(
        more / "vae" / "diffusion_pytorch_model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    old_t = load_file(trained / "transformer" / "diffusion_pytorch_model.safetensors")
    new_t = load_file(more / "transformer" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(old_t[k], new_t[k]) for k in old_t)  # the transformer did train
    summary = _log(more)
    assert summary["vae_steps"] == 0 and summary["transformer_steps"] == 3
    assert summary["init"] == str(trained)
    assert summary["previous"] == _log(trained)
    assert not any(e["phase"] == "vae" for e in summary["log"])


# ---------------------------------------------------------------------------------------------
# The pieces
# ---------------------------------------------------------------------------------------------

def test_untrained_pipeline_uses_the_given_configs():
    pipe = untrained_pipeline(0, TINY_TRANSFORMER, TINY_VAE)
    assert type(pipe).__name__ == "QwenImagePipeline"
    assert {k: pipe.transformer.config[k] for k in TINY_TRANSFORMER} == TINY_TRANSFORMER
    assert pipe.vae.config.z_dim == 4 and list(pipe.vae.config.latents_std) == [1.0] * 4
    # Same seed, same weights (a training run is reproducible from its log).
    again = untrained_pipeline(0, TINY_TRANSFORMER, TINY_VAE)
    for a, b in zip(pipe.transformer.parameters(), again.transformer.parameters()):
        assert torch.equal(a, b)


@pytest.fixture(scope="module")
def pieces():
    """An untrained tiny pipeline with latent statistics, its normalized dataset and caption embeddings."""
    pipe = untrained_pipeline(0, TINY_TRANSFORMER, TINY_VAE)
    pipe.vae.requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    set_latent_statistics(pipe.vae, device=CPU, gen=gen, n=256)
    data = latent_dataset(pipe, 96, device=CPU, gen=gen, chunk=64)
    return pipe, data, caption_embeddings(pipe, CPU)


def test_latent_dataset_is_normalized_by_the_statistics(pieces):
    pipe, (caps, latents, (h, w)), _ = pieces
    z = TINY_VAE["z_dim"]
    assert (h, w) == (8, 8)  # 128 px / 8 (VAE) / 2 (packing)
    assert latents.shape == (96, h * w, 4 * z)  # two chunks (64 + 32 of a second 64), cut to n
    assert caps.shape == (96,) and caps.min() >= 0 and caps.max() < len(scenes.TRAIN_SCENES)
    # Packing keeps each latent channel in 4 adjacent features; fresh renders, not the statistics' own.
    per_channel = latents.view(96, h * w, z, 4).transpose(0, 2).reshape(z, -1)
    assert per_channel.mean(1).abs().max() < 0.25, per_channel.mean(1)
    assert ((per_channel.std(1) - 1).abs() < 0.25).all(), per_channel.std(1)


def test_caption_embeddings_are_what_generation_computes(pieces):
    pipe, _, (emb, mask) = pieces
    prompts = [s.caption for s in scenes.TRAIN_SCENES] + [""]
    assert emb.shape[:1] == mask.shape[:1] == (len(prompts),)
    assert emb.shape[2] == TINY_TRANSFORMER["joint_attention_dim"]
    for i in (0, 300, len(prompts) - 1):  # a caption, another, the empty prompt (for dropout / CFG)
        e, m = pipe.encode_prompt(prompt=prompts[i], device=CPU)
        n = e.shape[1]
        assert torch.allclose(emb[i, :n], e[0]) and not emb[i, n:].any()
        assert mask[i, :n].tolist() == (m[0] if m is not None else torch.ones(n)).long().tolist()
        assert not mask[i, n:].any()  # padding is masked out
    assert not torch.equal(emb[0], emb[1])  # captions differ, so do their embeddings


def _velocity_loss(transformer, data, embeddings, n: int = 32) -> float:
    """Rectified-flow loss on a fixed batch (fixed sigmas and noise): comparable before and after."""
    caps, latents, (h, w) = data
    emb, mask = embeddings
    g = torch.Generator().manual_seed(7)
    x0, cap = latents[:n], caps[:n]
    sigma = torch.rand(n, generator=g) * 0.8 + 0.1
    noise = torch.randn(x0.shape, generator=g)
    xt = (1 - sigma.view(-1, 1, 1)) * x0 + sigma.view(-1, 1, 1) * noise
    with torch.no_grad():
        pred = transformer(hidden_states=xt, encoder_hidden_states=emb[cap], encoder_hidden_states_mask=mask[cap],
                           timestep=sigma, img_shapes=[[(1, h, w)]] * n, return_dict=False)[0]
    return F.mse_loss(pred, noise - x0).item()


def test_train_transformer_reduces_the_loss(pieces):
    pipe, data, embeddings = pieces
    before = _velocity_loss(pipe.transformer, data, embeddings)
    trained_module = pipe.transformer
    log = []
    steps = train_transformer(pipe, data, embeddings, batch=8, minutes=1.0, max_steps=60, device=CPU, seed=0,
                              log=log, lr=5e-3, compile=False)
    assert steps == 60
    ema = pipe.transformer
    assert ema is not trained_module  # the pipeline keeps the moving average, frozen
    assert not ema.training and not any(p.requires_grad for p in ema.parameters())
    after = _velocity_loss(ema, data, embeddings)
    assert math.isfinite(after) and after < 0.9 * before, (before, after)
    assert [e["step"] for e in log] == [0, 59] and all(math.isfinite(e["loss"]) for e in log)


def test_train_vae_logs_finite_losses_and_leaves_eval_mode():
    pipe = untrained_pipeline(0, TINY_TRANSFORMER, TINY_VAE)
    start = {k: v.clone() for k, v in pipe.vae.state_dict().items()}
    log = []
    train_vae(pipe.vae, steps=3, batch=2, device=CPU, gen=torch.Generator().manual_seed(0), log=log)
    assert [e["step"] for e in log] == [0, 2]
    assert all(e["phase"] == "vae" and math.isfinite(e["recon"]) and math.isfinite(e["kl"]) for e in log)
    assert not pipe.vae.training
    assert any(not torch.equal(start[k], v) for k, v in pipe.vae.state_dict().items())


# ---------------------------------------------------------------------------------------------
# Step counts at the edges of the schedules
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("steps", [3, 20])  # 20: 5 % warm-up is one step, which OneCycleLR cannot divide by
def test_train_vae_short_schedules(steps):
    pipe = untrained_pipeline(0, TINY_TRANSFORMER, TINY_VAE)
    log: list = []
    train_vae(pipe.vae, steps=steps, batch=1, device=CPU, gen=torch.Generator().manual_seed(0), log=log)
    assert log


def test_train_vae_refuses_too_few_steps():
    pipe = untrained_pipeline(0, TINY_TRANSFORMER, TINY_VAE)
    with pytest.raises(ValueError, match="at least 3 steps"):
        train_vae(pipe.vae, steps=2, batch=1, device=CPU, gen=torch.Generator().manual_seed(0), log=[])


def test_train_transformer_never_exceeds_max_steps():
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    pipe = SimpleNamespace(transformer=QwenImageTransformer2DModel(**TINY_TRANSFORMER))
    h = w = 2
    data = (torch.zeros(8, dtype=torch.long), torch.randn(8, h * w, 16), (h, w))
    embeddings = (torch.randn(2, 5, 32), torch.ones(2, 5, dtype=torch.long))
    steps = train_transformer(pipe, data, embeddings, batch=2, minutes=10.0, max_steps=80, device=CPU, seed=0,
                              log=[], compile=False)
    assert steps == 80


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def test_main_passes_the_options_to_train(monkeypatch, tmp_path, capsys):
    calls = []

    def fake_train(out, **kwargs):
        calls.append((out, kwargs))
        return tmp_path / "written"

    monkeypatch.setattr(train_shapes, "train", fake_train)
    main(["--out", str(tmp_path / "a"), "--device", "cpu", "--minutes", "0.5", "--max-steps", "9", "--vae-steps",
          "7", "--batch", "3", "--dataset", "11", "--seed", "5", "--lr", "0.002", "--init", "prev", "--check", "0"])
    assert calls == [(str(tmp_path / "a"), {
        "device": "cpu", "minutes": 0.5, "max_steps": 9, "vae_steps": 7, "batch": 3, "dataset": 11, "seed": 5,
        "check_prompts": 0, "init": "prev", "lr": 0.002})]
    assert f"wrote {tmp_path / 'written'}" in capsys.readouterr().out

    calls.clear()
    main(["--out", "b"])  # the defaults of the shipped model's training run
    assert calls == [("b", {"device": "cuda", "minutes": 7.0, "max_steps": 60000, "vae_steps": 2000, "batch": 256,
                            "dataset": 100_000, "seed": 0, "check_prompts": 200, "init": None, "lr": 7e-4})]


def test_main_requires_out():
    with pytest.raises(SystemExit):
        main([])
