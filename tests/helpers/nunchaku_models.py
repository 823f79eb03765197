"""Tiny transformers in Nunchaku's merged single-file format, packed by DeepCompressor (the real producer).

A qdit tiny model's BF16 Linear weights are quantized here (SVDQuant W4A4 INT4 or NVFP4: smoothing,
a rank-r SVD branch, the residual quantized per group; AWQ W4A16 for the modulation linears), the
codes and scales are packed with DeepCompressor's Nunchaku packers, and everything is written to one
safetensors file with the header metadata Nunchaku's merged files carry. Used only by tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from qdit.quant import numerics

import deepcompressor.backend.nunchaku.utils as nunchaku_utils  # noqa: E402 (installed by .ci/run, --no-deps)

DTYPE = torch.bfloat16
GELU_SHIFT = 0.171875
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])

# Configs of the tiny models with every quantized dimension a multiple of 128, as Nunchaku needs.
CONFIGS = {
    "qwen-image": {"patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 2,
                   "attention_head_dim": 32, "num_attention_heads": 4, "joint_attention_dim": 64,
                   "axes_dims_rope": [8, 12, 12], "guidance_embeds": False},
    "flux": {"patch_size": 1, "in_channels": 64, "num_layers": 1, "num_single_layers": 1,
             "attention_head_dim": 32, "num_attention_heads": 4, "joint_attention_dim": 64,
             "pooled_projection_dim": 32, "guidance_embeds": True, "axes_dims_rope": [8, 12, 12]},
    # dim 384 makes the FFN width int(384 / 3 * 8) = 1024 and the fused qkv 1152 = 9 * 128
    "z-image": {"all_patch_size": [2], "all_f_patch_size": [1], "in_channels": 16, "dim": 384, "n_layers": 1,
                "n_refiner_layers": 1, "n_heads": 12, "n_kv_heads": 12, "norm_eps": 1e-5, "qk_norm": True,
                "cap_feat_dim": 64, "rope_theta": 256.0, "t_scale": 1000.0, "axes_dims": [8, 12, 12],
                "axes_lens": [256, 64, 64]},
}
CLASS_NAMES = {"qwen-image": "QwenImageTransformer2DModel", "flux": "FluxTransformer2DModel",
               "z-image": "ZImageTransformer2DModel"}


def _svd_branch(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    root = s[:rank].sqrt()
    return (root[:, None] * vh[:rank]).to(DTYPE), (u[:, :rank] * root[None, :]).to(DTYPE)  # down [r,K], up [N,r]


def svdq_pack(w: torch.Tensor, bias: torch.Tensor | None, precision: str, rank: int, gen: torch.Generator | None, *,
              prefix: str, parts: list[int] | None = None, gelu_shift: bool = False) -> dict[str, torch.Tensor]:
    """One SVDQuant W4A4 linear (float weight [N, K]) -> Nunchaku v1 tensors packed by DeepCompressor.

    gen: draws random smoothing factors (exercising every code path); None: smoothing factors of 1.
    parts: row counts of a fused linear (NVFP4: one per-tensor scale per part, stored as wcscales).
    gelu_shift: INT4 layer whose input is quantized shifted (its bias compensates, as Nunchaku's does).
    """
    w = w.float()
    n, k = w.shape
    smooth = (torch.rand(k, generator=gen) * 1.5 + 0.5 if gen is not None else torch.ones(k)).to(DTYPE)
    down, up = _svd_branch(w, rank)
    target = (w - up.float() @ down.float()) * smooth.float()  # deq / smooth ~ the residual
    if precision == "int4":
        scales = (target.reshape(n, k // 64, 64).abs().amax(-1) / 7).clamp(min=1e-6).to(DTYPE)
        codes = (target / scales.float().repeat_interleave(64, 1)).round().clamp(-8, 7)
        deq = (codes * scales.float().repeat_interleave(64, 1)).to(DTYPE)
        packed = nunchaku_utils.convert_to_nunchaku_w4x4y16_linear_weight(
            deq, scales.view(n, 1, k // 64, 1), bias=bias, smooth=smooth, lora=(down, up), float_point=False)
        extra = {}
    else:
        sizes = parts or [n]
        tscale = torch.cat([(target[sum(sizes[:i]):sum(sizes[:i + 1])].abs().amax() / (6 * 448)).expand(m)
                            for i, m in enumerate(sizes)]).to(DTYPE)
        block = (target.reshape(n, k // 16, 16).abs().amax(-1) / (6 * tscale.float()[:, None]))
        block = numerics.to_e4m3(block.clamp(min=2.0**-9)).to(DTYPE)
        step = (block.float() * tscale.float()[:, None]).repeat_interleave(16, 1)
        codes = numerics.e2m1_encode(target / step).long()
        deq = (E2M1[codes] * step).to(DTYPE)
        scale = tscale[:1] if parts is None else tscale.view(n, 1, 1, 1)
        packed = nunchaku_utils.convert_to_nunchaku_w4x4y16_linear_weight(
            deq, scale, bias=bias, smooth=smooth, lora=(down, up), float_point=True,
            subscale=block.view(n, 1, k // 16, 1))
        extra = {"wtscale" if parts is None else "wcscales": packed[1]}
    qweight, wscales, pbias, psmooth, (pdown, pup), sub = packed
    if gelu_shift:
        if bias is None:
            bias = torch.zeros(n, dtype=DTYPE)
        # Nunchaku's stored bias: b0 - c * sum_k deq[n, k] / smooth[k]
        comp = bias.float() - GELU_SHIFT * (deq.float() / smooth.float()).sum(1)
        pbias = nunchaku_utils.convert_to_nunchaku_w4x4y16_linear_weight(
            deq, scales.view(n, 1, k // 64, 1), bias=comp.to(DTYPE), smooth=smooth, lora=(down, up))[2]
    out = {"qweight": qweight, "wscales": sub if precision == "nvfp4" else wscales, "smooth_factor": psmooth,
           "smooth_factor_orig": psmooth.clone(), "proj_down": pdown, "proj_up": pup, **extra}
    if bias is not None:
        out["bias"] = pbias
    return {f"{prefix}.{s}": t for s, t in out.items()}


def awq_pack(w: torch.Tensor, bias: torch.Tensor, chunks: int, *, prefix: str) -> dict[str, torch.Tensor]:
    n, k = w.shape
    scales = (w.float().reshape(n, k // 64, 64).abs().amax(-1) / 7).clamp(min=1e-6).to(DTYPE)
    codes = (w.float() / scales.float().repeat_interleave(64, 1)).round().clamp(-7, 7) + 7
    deq = ((codes - 7) * scales.float().repeat_interleave(64, 1)).to(DTYPE)
    q, s, z, b = nunchaku_utils.convert_to_nunchaku_w4x16_linear_weight(
        deq, scales.view(n, 1, k // 64, 1), bias=bias.to(DTYPE).clone(), adanorm_splits=chunks)
    return {f"{prefix}.qweight": q, f"{prefix}.wscales": s, f"{prefix}.wzeros": z, f"{prefix}.bias": b}


def _layers(model: str, sd: dict[str, torch.Tensor]):
    """(nunchaku name, [diffusers parts], kind, gelu_shift) of every quantized linear of a model."""
    out = []
    if model == "qwen-image":
        blocks = sorted({int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks.")})
        for i in blocks:
            p = f"transformer_blocks.{i}."
            out += [(p + "attn.to_qkv", [p + f"attn.to_{x}" for x in "qkv"], "svdq", False),
                    (p + "attn.add_qkv_proj", [p + f"attn.add_{x}_proj" for x in "qkv"], "svdq", False),
                    (p + "attn.to_out.0", [p + "attn.to_out.0"], "svdq", False),
                    (p + "attn.to_add_out", [p + "attn.to_add_out"], "svdq", False)]
            for mlp in ("img_mlp", "txt_mlp"):
                out += [(p + f"{mlp}.net.0.proj", [p + f"{mlp}.net.0.proj"], "svdq", False),
                        (p + f"{mlp}.net.2", [p + f"{mlp}.net.2"], "svdq", True)]
            out += [(p + "img_mod.1", [p + "img_mod.1"], 6, False), (p + "txt_mod.1", [p + "txt_mod.1"], 6, False)]
    elif model == "z-image":
        for group in ("layers", "noise_refiner", "context_refiner"):
            blocks = sorted({int(k.split(".")[1]) for k in sd if k.startswith(group + ".")})
            for i in blocks:
                p = f"{group}.{i}."
                out += [(p + "attention.to_qkv", [p + f"attention.to_{x}" for x in "qkv"], "svdq", False),
                        (p + "attention.to_out.0", [p + "attention.to_out.0"], "svdq", False),
                        (p + "feed_forward.net.0.proj", [p + "feed_forward.w3", p + "feed_forward.w1"], "svdq", False),
                        (p + "feed_forward.net.2", [p + "feed_forward.w2"], "svdq", False)]
    elif model == "flux":
        blocks = sorted({int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks.")})
        for i in blocks:
            p = f"transformer_blocks.{i}."
            out += [(p + "attn.to_qkv", [p + f"attn.to_{x}" for x in "qkv"], "svdq", False),
                    (p + "attn.add_qkv_proj", [p + f"attn.add_{x}_proj" for x in "qkv"], "svdq", False),
                    (p + "attn.to_out.0", [p + "attn.to_out.0"], "svdq", False),
                    (p + "attn.to_add_out", [p + "attn.to_add_out"], "svdq", False),
                    (p + "ff.net.0.proj", [p + "ff.net.0.proj"], "svdq", False),
                    (p + "ff.net.2", [p + "ff.net.2"], "svdq", True),
                    (p + "ff_context.net.0.proj", [p + "ff_context.net.0.proj"], "svdq", False),
                    (p + "ff_context.net.2", [p + "ff_context.net.2"], "svdq", True),
                    (p + "norm1.linear", [p + "norm1.linear"], 6, False),
                    (p + "norm1_context.linear", [p + "norm1_context.linear"], 6, False)]
        blocks = sorted({int(k.split(".")[1]) for k in sd if k.startswith("single_transformer_blocks.")})
        for i in blocks:
            p = f"single_transformer_blocks.{i}."
            out += [(p + "attn.to_qkv", [p + f"attn.to_{x}" for x in "qkv"], "svdq", False),
                    (p + "mlp_fc1", [p + "proj_mlp"], "svdq", False),
                    (p + "attn.to_out", [p + "proj_out"], "split-k-0", False),
                    (p + "mlp_fc2", [p + "proj_out"], "split-k-1", True),
                    (p + "norm.linear", [p + "norm.linear"], 3, False)]
    return out


def nunchaku_state_dict(model: str, bf16: dict[str, torch.Tensor], precision: str, rank: int,
                        seed: int | None = 0) -> dict[str, torch.Tensor]:
    """A BF16 diffusers state dict -> the Nunchaku state dict of the same model (v1/v2 names).

    seed: of the random smoothing factors; None keeps every smoothing factor at 1.
    """
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    sd = dict(bf16)
    out: dict[str, torch.Tensor] = {}
    for name, parts, kind, gelu in _layers(model, sd):
        if kind in ("split-k-0", "split-k-1"):  # FLUX single proj_out: halves of its input dimension
            w = sd[f"{parts[0]}.weight"].float()
            inner = sd[parts[0].rsplit(".", 1)[0] + ".attn.to_q.weight"].shape[0]
            w = w[:, :inner] if kind == "split-k-0" else w[:, inner:]
            b = sd[f"{parts[0]}.bias"] if kind == "split-k-0" else torch.zeros(w.shape[0], dtype=DTYPE)
            out.update(svdq_pack(w, b, precision, rank, gen, prefix=name, gelu_shift=gelu and precision == "int4"))
            continue
        w = torch.cat([sd[f"{p}.weight"].float() for p in parts])
        biases = [sd.get(f"{p}.bias") for p in parts]
        b = None if biases[0] is None else torch.cat(biases)
        if kind == "svdq":
            sizes = [sd[f"{p}.weight"].shape[0] for p in parts] if len(parts) > 1 else None
            out.update(svdq_pack(w, b, precision, rank, gen, prefix=name, parts=sizes,
                                 gelu_shift=gelu and precision == "int4"))
        else:
            out.update(awq_pack(w, b, kind, prefix=name))
    used = {f"{p}.{s}" for _, parts, _, _ in _layers(model, sd) for p in parts for s in ("weight", "bias")}
    out.update({k: v.to(DTYPE) for k, v in sd.items() if k not in used})
    return out


def write_merged_file(path: Path, model: str, state: dict[str, torch.Tensor], precision: str, rank: int,
                      config: dict | None = None) -> Path:
    config = dict(config or CONFIGS[model], _class_name=CLASS_NAMES[model])
    dtype, group = ("int4", 64) if precision == "int4" else ("fp4_e2m1_all", 16)
    scale_dtype = None if precision == "int4" else [None, "fp8_e4m3_nan"]
    qc = {"method": "svdquant", "weight": {"dtype": dtype, "scale_dtype": scale_dtype, "group_size": group},
          "activation": {"dtype": dtype, "scale_dtype": scale_dtype, "group_size": group}, "rank": rank}
    save_file({k: v.contiguous() for k, v in state.items()}, str(path),
              metadata={"config": json.dumps(config), "quantization_config": json.dumps(qc),
                        "model_class": f"Nunchaku{CLASS_NAMES[model]}"})
    return path


def nunchaku_transformers(pipeline: Path, work: Path, rank: int = 16,
                          precisions: tuple[str, ...] = ("int4", "nvfp4")) -> dict[str, Path]:
    """Nunchaku checkpoints of a trained Qwen-Image pipeline's BF16 transformer (smoothing factors of 1,
    packed by DeepCompressor's exporter), converted by qdit: {"nunchaku-<precision>": folder}."""
    from safetensors.torch import load_file

    from qdit.tools.convert_nunchaku import convert_nunchaku_checkpoint

    transformer = pipeline / "transformer"
    config = {k: v for k, v in json.loads((transformer / "config.json").read_text()).items()
              if not k.startswith("_")}
    bf16 = load_file(transformer / "diffusion_pytorch_model.safetensors")
    folders = {}
    for precision in precisions:
        state = nunchaku_state_dict("qwen-image", bf16, precision, rank, seed=None)
        merged = write_merged_file(work / f"svdq-{precision}_r{rank}.safetensors", "qwen-image", state,
                                   precision, rank, config=config)
        folders[f"nunchaku-{precision}"] = convert_nunchaku_checkpoint(merged, work / f"nunchaku-{precision}")
    return folders
