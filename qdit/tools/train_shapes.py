"""Train qdit's shipped text-to-image model: a small Qwen-Image pipeline that draws captioned shapes.

    python -m qdit.tools.train_shapes --out DIR [--minutes 7] [--device cuda]

Two phases on the procedural scenes of `qdit.eval.scenes` (training captions only):
1. the VAE (diffusers AutoencoderKLQwenImage, small widths, 8 latent channels) learns to
   reconstruct the scenes; its latents' per-channel mean and std go into its config, as the
   pipeline expects;
2. the transformer (diffusers QwenImageTransformer2DModel, small config) learns rectified-flow
   velocity (noise - x0) on the normalized, packed latents, conditioned on the frozen text
   encoder's prompt embeddings (computed by QwenImagePipeline.encode_prompt, so training sees exactly
   what generation feeds it); 10 % of the captions are dropped to the empty prompt, so
   classifier-free guidance works. Weights are an exponential moving average.

The text encoder and tokenizer are the seeded ones of qdit's tiny Qwen-Image pipeline (the encoder
is not trained: its embeddings are a fixed function of the caption, which is all the transformer
needs). DIR receives the pipeline folder (`save_pretrained`, transformer in BF16) and
`train_log.json`: losses, settings and timings.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from qdit.eval import scenes

TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": 2, "in_channels": 32, "out_channels": 8, "num_layers": 8, "attention_head_dim": 32,
    "num_attention_heads": 4, "joint_attention_dim": 128, "axes_dims_rope": [8, 12, 12], "guidance_embeds": False,
}
VAE_CONFIG: dict[str, Any] = {
    "base_dim": 16, "z_dim": 8, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 1, "attn_scales": [],
    "temperal_downsample": [False, True, True],
}
CAPTION_DROPOUT = 0.1


def untrained_pipeline(seed: int = 0, transformer_config: dict[str, Any] | None = None,
                       vae_config: dict[str, Any] | None = None):
    """A QwenImagePipeline with the shapes model's components, transformer and VAE untrained (float32)."""
    from diffusers import AutoencoderKLQwenImage, QwenImagePipeline, QwenImageTransformer2DModel

    from qdit.pipelines.tiny import components_around

    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(**(transformer_config or TRANSFORMER_CONFIG))
    components = components_around("qwen-image", transformer, seed=seed)
    vae_cfg = dict(vae_config or VAE_CONFIG)
    z = vae_cfg["z_dim"]
    torch.manual_seed(seed + 2)
    components["vae"] = AutoencoderKLQwenImage(**vae_cfg, latents_mean=[0.0] * z, latents_std=[1.0] * z)
    return QwenImagePipeline(**components)


def _batch(n: int, gen: torch.Generator, device, split: str = "train"):
    pool = scenes.TRAIN_SCENES if split == "train" else scenes.ALL_SCENES
    idx = torch.randint(len(pool), (n,), generator=gen).tolist()
    seeds = torch.randint(2**31 - 1, (n,), generator=gen).tolist()
    picked = [pool[i] for i in idx]
    return picked, scenes.render(picked, seeds, device=device) * 2 - 1


def _encode(vae, images: torch.Tensor) -> torch.Tensor:
    """Latent means [B, z, h, w] of images in [-1, 1]."""
    return vae.encode(images[:, :, None]).latent_dist.mode()[:, :, 0]


def train_vae(vae, *, steps: int, batch: int, device, gen: torch.Generator, log: list) -> None:
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.0)
    if steps < 3:
        raise ValueError(f"train_vae needs at least 3 steps (got {steps}): its one-cycle schedule has two phases")
    # At least two warm-up steps: OneCycleLR divides by (warm-up steps - 1).
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps,
                                                pct_start=min(1.0, max(0.05, 2 / steps)))
    for step in range(steps):
        _, images = _batch(batch, gen, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            posterior = vae.encode(images[:, :, None]).latent_dist
            recon = vae.decode(posterior.sample())[0][:, :, 0]
        rec = F.mse_loss(recon.float(), images) + 0.1 * F.l1_loss(recon.float(), images)
        kl = posterior.kl().mean() / images[0].numel()
        loss = rec + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log.append({"phase": "vae", "step": step, "recon": rec.item(), "kl": kl.item()})
            print(f"vae {step:5d} recon {rec.item():.5f} kl {kl.item():.4f}", flush=True)
    vae.eval()


@torch.no_grad()
def set_latent_statistics(vae, *, device, gen: torch.Generator, n: int = 2048) -> None:
    latents = torch.cat([_encode(vae, _batch(256, gen, device)[1]) for _ in range(n // 256)])
    mean = latents.mean(dim=(0, 2, 3))
    std = latents.std(dim=(0, 2, 3))
    vae.register_to_config(latents_mean=[round(v, 5) for v in mean.tolist()],
                           latents_std=[round(v, 5) for v in std.tolist()])


@torch.no_grad()
def latent_dataset(pipe, n: int, *, device, gen: torch.Generator, chunk: int = 512):
    """n (training-caption index, normalized packed latents) pairs."""
    vae = pipe.vae
    z = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean, device=device).view(1, z, 1, 1)
    std = torch.tensor(vae.config.latents_std, device=device).view(1, z, 1, 1)
    index = {s: i for i, s in enumerate(scenes.TRAIN_SCENES)}
    caps, lats = [], []
    chunk = min(chunk, n)
    for _ in range(math.ceil(n / chunk)):
        picked, images = _batch(chunk, gen, device)
        latents = (_encode(vae, images) - mean) / std
        b, c, h, w = latents.shape
        lats.append(pipe._pack_latents(latents, b, c, h, w))
        caps.append(torch.tensor([index[s] for s in picked], device=device))
    return torch.cat(caps)[:n], torch.cat(lats)[:n], (h // 2, w // 2)


@torch.no_grad()
def caption_embeddings(pipe, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt embeddings and masks of every training caption, plus the empty prompt last, padded to one length."""
    prompts = [s.caption for s in scenes.TRAIN_SCENES] + [""]
    embeds, masks = [], []
    for prompt in prompts:  # one at a time: exactly what generation computes for a single prompt
        e, m = pipe.encode_prompt(prompt=prompt, device=device)
        embeds.append(e[0])
        masks.append(torch.ones(e.shape[1], dtype=torch.long, device=device) if m is None else m[0])
    length = max(e.shape[0] for e in embeds)
    emb = torch.zeros(len(prompts), length, embeds[0].shape[-1], device=device)
    mask = torch.zeros(len(prompts), length, dtype=torch.long, device=device)
    for i, (e, m) in enumerate(zip(embeds, masks)):
        emb[i, : e.shape[0]] = e
        mask[i, : m.shape[0]] = m
    return emb, mask


def train_transformer(pipe, data, embeddings, *, batch: int, minutes: float, max_steps: int, device,
                      seed: int, log: list, lr: float = 7e-4, compile: bool = True):
    transformer = pipe.transformer
    transformer.train()
    ema = copy.deepcopy(transformer).eval().requires_grad_(False)
    ema_params, params = list(ema.parameters()), list(transformer.parameters())
    # Compiled: the eager step is bound by Python overhead (small layers, many kernels).
    forward = torch.compile(transformer) if compile else transformer
    caps, latents, (h, w) = data
    emb, mask = embeddings
    empty = emb.shape[0] - 1
    gen = torch.Generator(device).manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.01)
    start = time.perf_counter()
    total, step, t_warm = max_steps, 0, None
    while step < total:
        if step == 20:
            t_warm = time.perf_counter()
        if step == 70:  # fit the schedule into the time budget, measured after compilation and warm-up
            per_step = (time.perf_counter() - t_warm) / 50
            left = minutes * 60 - (time.perf_counter() - start)
            total = min(max_steps, max(100, 70 + int(left / per_step)))
            log.append({"phase": "transformer", "seconds_per_step": per_step, "planned_steps": total,
                        "seconds_to_step_20": t_warm - start})
            print(f"{per_step * 1000:.1f} ms/step -> {total} steps", flush=True)
        warm = min(1.0, (step + 1) / 200)
        for g in opt.param_groups:
            g["lr"] = lr * warm * 0.5 * (1 + math.cos(math.pi * min(step / total, 1.0)))
        pick = torch.randint(latents.shape[0], (batch,), generator=gen, device=device)
        x0 = latents[pick]
        cap = caps[pick]
        cap = torch.where(torch.rand(batch, generator=gen, device=device) < CAPTION_DROPOUT,
                          torch.full_like(cap, empty), cap)
        sigma = torch.sigmoid(torch.randn(batch, generator=gen, device=device))
        noise = torch.randn(x0.shape, generator=gen, device=device)
        s = sigma.view(-1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            pred = forward(hidden_states=xt, encoder_hidden_states=emb[cap], encoder_hidden_states_mask=mask[cap],
                           timestep=sigma, img_shapes=[[(1, h, w)]] * batch, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        if step % 500 == 0 or step == total - 1:
            log.append({"phase": "transformer", "step": step, "loss": loss.item(),
                        "seconds": time.perf_counter() - start})
            print(f"dit {step:6d}/{total} loss {loss.item():.4f} {time.perf_counter() - start:.0f}s", flush=True)
        step += 1
    pipe.transformer = ema
    return step


@torch.no_grad()
def check_accuracy(pipe, n: int, device, guidances=(1.0, 3.0, 5.0), steps: int = 20,
                   grid: Path | None = None) -> list[dict[str, Any]]:
    """Scorer accuracy of the trained BF16 pipeline on n held-out and n training captions, per guidance."""
    from qdit.eval.sampling import sample_images
    from qdit.eval.scorer import accuracy, score

    pipe.set_progress_bar_config(disable=True)
    results = []
    for split in ("held_out", "train"):
        prompts = [s.caption for s in scenes.random_scenes(n, split=split, seed=1)]
        for guidance in guidances:
            images = sample_images(pipe.to(torch.bfloat16), prompts, list(range(n)), steps=steps, guidance=guidance,
                                   batch_size=100)
            acc = accuracy([score(img, p) for img, p in zip(images, prompts)])
            results.append({"split": split, "guidance": guidance, "steps": steps, "n": n, **acc})
            if grid is not None and split == "held_out" and guidance == guidances[len(guidances) // 2]:
                from PIL import Image

                row = torch.cat(list(images[:16]), dim=2)
                Image.fromarray((row.permute(1, 2, 0) * 255).round().byte().numpy()).save(grid)
            print(f"check {split} guidance {guidance}: {acc}", flush=True)
    return results


def train(out: str | Path, *, device: str = "cuda", minutes: float = 7.0, max_steps: int = 60000,
          vae_steps: int = 2000, batch: int = 256, dataset: int = 100_000, seed: int = 0, check_prompts: int = 0,
          transformer_config: dict[str, Any] | None = None, vae_config: dict[str, Any] | None = None,
          init: str | Path | None = None, lr: float = 7e-4) -> Path:
    out = Path(out)
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    log: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    previous = None
    if init is None:
        pipe = untrained_pipeline(seed, transformer_config, vae_config).to(device)
        pipe.text_encoder.requires_grad_(False)
        train_vae(pipe.vae, steps=vae_steps, batch=min(batch, 64), device=device, gen=gen, log=log)
        pipe.vae.requires_grad_(False)
        set_latent_statistics(pipe.vae, device=device, gen=gen)
    else:  # continue training the transformer of a trained pipeline folder (its VAE stays as it is)
        from diffusers import QwenImagePipeline

        pipe = QwenImagePipeline.from_pretrained(init, dtype=torch.float32).to(device)
        pipe.text_encoder.requires_grad_(False)
        pipe.vae.requires_grad_(False)
        previous = json.loads((Path(init) / "train_log.json").read_text())
        vae_steps = 0
    t_vae = time.perf_counter() - t0
    data = latent_dataset(pipe, dataset, device=device, gen=gen)
    embeddings = caption_embeddings(pipe, device)
    steps = train_transformer(pipe, data, embeddings, batch=batch, minutes=minutes, max_steps=max_steps,
                              device=device, seed=seed, log=log, lr=lr, compile=device.type == "cuda")
    pipe.to(torch.bfloat16)  # shipped in BF16: the pipeline runs in BF16, and it halves the files
    pipe.save_pretrained(out, safe_serialization=True)
    checks = check_accuracy(pipe, check_prompts, device, grid=out / "samples.png") if check_prompts else []
    summary = {"checks": checks, "seconds_total": time.perf_counter() - t0, "seconds_vae": t_vae, "transformer_steps": steps,
               "batch": batch, "vae_steps": vae_steps, "dataset": dataset, "seed": seed,
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "transformer_config": transformer_config or TRANSFORMER_CONFIG,
               "vae_config": vae_config or VAE_CONFIG, "lr": lr, "init": str(init) if init else None, "log": log,
               "previous": previous}
    (out / "train_log.json").write_text(json.dumps(summary, indent=1))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--minutes", type=float, default=7.0, help="time budget of the transformer phase")
    p.add_argument("--max-steps", type=int, default=60000)
    p.add_argument("--vae-steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--dataset", type=int, default=100_000, help="rendered training images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=7e-4)
    p.add_argument("--init", default=None, help="continue from this trained pipeline folder (skips the VAE phase)")
    p.add_argument("--check", type=int, default=200, help="score this many held-out captions after training")
    args = p.parse_args(argv)
    path = train(args.out, device=args.device, minutes=args.minutes, max_steps=args.max_steps,
                 vae_steps=args.vae_steps, batch=args.batch, dataset=args.dataset, seed=args.seed,
                 check_prompts=args.check, init=args.init, lr=args.lr)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
