"""Converted Nunchaku SVDQuant checkpoints on the reference backend.

Layer level: a converted layer's reference output against the spec's forward math, written here
independently from the canonical tensors (../shared/specs/nunchaku-svdquant.md section 4).
Model level: tiny FLUX / Qwen-Image / Z-Image transformers packed by DeepCompressor into Nunchaku's
merged file, converted with `qdit convert nunchaku`, loaded with qdit.load_transformer and run.
"""

from __future__ import annotations

import json

import pytest
import torch

import qdit
from qdit.api import random_transformer
from qdit.cli import main
from qdit.errors import BackendUnavailableError
from qdit.kernels.reference import ReferenceBackend
from qdit.models import adapter_by_name
from qdit.quant.layer import QuantLinear
from qdit.quant.scheme import LayerQuant, Scheme

from tests.helpers.nunchaku_models import CONFIGS, awq_pack, nunchaku_state_dict, svdq_pack, write_merged_file

DTYPE = torch.bfloat16
SHIFT = 0.171875
MAGS = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


# ------------------------------------------------------------------------------------------------
# The spec's forward math, from the canonical tensors (independent of qdit.quant)
# ------------------------------------------------------------------------------------------------

def nibbles(qweight):
    q = qweight.to(torch.int32)
    return torch.stack([q & 15, q >> 4], dim=-1).reshape(q.shape[0], -1)


def e2m1_value(code):
    return torch.where(code >= 8, -MAGS[(code - 8).long()], MAGS[(code & 7).long()])


def e2m1_round(v):
    """Nearest E2M1 value, ties to the even mantissa (even index in MAGS), saturating at 6."""
    mag = v.abs().clamp(max=6.0)
    dist = (mag[..., None] - MAGS).abs()
    best = dist.argmin(-1)
    nxt = (best + 1).clamp(max=7)
    tie = (dist.gather(-1, nxt[..., None])[..., 0] == dist.gather(-1, best[..., None])[..., 0]) & (best % 2 == 1)
    best = torch.where(tie, nxt, best)
    return torch.sign(v) * MAGS[best]


def spec_forward(t, x, precision, gelu_shift=False):
    """y[m, n] per spec section 4, float32, from canonical tensors t (x in the model dtype)."""
    m, k = x.shape
    lora = x.float() @ t["proj_down"].float()
    codes = nibbles(t["qweight"])
    if precision == "int4":
        g = 64
        w = torch.where(codes >= 8, codes - 16, codes).float() * t["wscales"].float().repeat_interleave(g, 1)
    else:
        g = 16
        w = e2m1_value(codes) * t["wscales"].float().repeat_interleave(g, 1)
        if "wtscale" in t:
            w = w * t["wtscale"].float()
        if "wcscales" in t:
            w = w * t["wcscales"].float()[:, None]
    if gelu_shift:
        xs = ((x + SHIFT) / t["smooth_factor"].to(x.dtype)).float()
    else:
        xs = (x / t["smooth_factor"].to(x.dtype)).float()
    xq = torch.empty_like(xs)
    for j in range(0, k, g):
        blk = xs[:, j:j + g]
        if gelu_shift:
            s = blk.max(dim=1, keepdim=True).values.clamp(min=0) / 15
            q = torch.where(s > 0, torch.round(blk / torch.where(s > 0, s, 1)), 0).clamp(0, 15)
            xq[:, j:j + g] = q * s
        elif precision == "int4":
            s = blk.abs().max(dim=1, keepdim=True).values / 7
            q = torch.where(s > 0, torch.round(blk / torch.where(s > 0, s, 1)), 0).clamp(-8, 7)
            xq[:, j:j + g] = q * s
        else:
            raw = (blk.abs().max(dim=1, keepdim=True).values / 6).clamp(max=448)
            s = raw.to(torch.float8_e4m3fn).float()
            inv = torch.where(raw > 0, 1 / torch.where(raw > 0, raw, 1), 0)
            xq[:, j:j + g] = e2m1_round(blk * inv) * s
    y = xq @ w.t()
    if "bias" in t:
        y = y + t["bias"].float()
    return y + lora @ t["proj_up"].float().t()


def make_layer(tensors, n, k, lq):
    layer = QuantLinear("blk.lin", k, n, "bias" in tensors, lq, DTYPE)
    for name, value in tensors.items():
        layer.method.check("blk.lin", name, value, source="test")
        layer.set_tensor(name, value)
    layer.backend = ReferenceBackend()
    return layer


@pytest.mark.parametrize("precision,gelu,fused", [("int4", False, False), ("int4", True, False),
                                                  ("nvfp4", False, False), ("nvfp4", False, True)])
def test_layer_matches_spec_forward(precision, gelu, fused):
    n, k, r = 384, 256, 32
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(n, k, generator=gen) / k**0.5
    bias = (torch.randn(n, generator=gen) * 0.1).to(DTYPE)
    state = svdq_pack(w, bias, precision, r, gen, prefix="blk.lin", parts=[128, 128, 128] if fused else None,
                      gelu_shift=gelu)
    canon = qdit.convert_nunchaku_tensors(state, precision=precision, group_size=64 if precision == "int4" else 16)
    t = {key.rpartition(".")[2]: v for key, v in canon.items()}
    scheme = Scheme.SVDQ_INT4 if precision == "int4" else Scheme.SVDQ_NVFP4
    lq = LayerQuant(scheme, lora_rank=r, wtscale="wtscale" in t, wcscales="wcscales" in t, gelu_shift=gelu)
    layer = make_layer(t, n, k, lq)
    x = torch.randn(2, 5, k, generator=gen).to(DTYPE)
    if gelu:
        x = torch.nn.functional.gelu(x.float() * 2, approximate="tanh").to(DTYPE)
    got = layer(x).float().reshape(-1, n)
    ref = spec_forward(t, x.reshape(-1, k), precision, gelu)
    # both computed in float32 from the same quantized values; the output is rounded to bf16
    assert (got - ref).abs().max() <= 2 ** -7 * ref.abs().max()
    # and the layer approximates the float weight: W_eff = deq / smooth + up @ down^T
    dense = x.reshape(-1, k).float() @ w.t() + bias.float()
    rel = ((got - dense).norm() / dense.norm()).item()
    # the dense equivalent (spec section 4) recovers the float weight up to the weight's rounding
    w_eff = layer.method.dequantize(layer) / t["smooth_factor"].float()
    w_eff = w_eff + t["proj_up"].float() @ t["proj_down"].float().t()
    w_rel = ((w_eff - w).norm() / w.norm()).item()
    print(f"{precision} gelu={gelu} fused={fused}: rel. error vs float layer {rel:.4f} (weight alone {w_rel:.4f})")
    assert w_rel < 0.2 and rel < 0.35


def test_awq_layer_dequantizes_and_runs():
    n, k = 768, 128
    gen = torch.Generator().manual_seed(8)
    w = torch.randn(n, k, generator=gen) / k**0.5
    bias = torch.randn(n, generator=gen) * 0.1
    state = awq_pack(w, bias, 6, prefix="transformer_blocks.0.img_mod.1")
    canon = qdit.convert_nunchaku_tensors(state, precision="int4", group_size=64)
    t = {key.rpartition(".")[2]: v for key, v in canon.items()}
    layer = make_layer(t, n, k, LayerQuant(Scheme.AWQ_W4A16))
    x = torch.randn(3, k, generator=gen).to(DTYPE)
    codes = nibbles(t["qweight"]).float()
    deq = codes * t["wscales"].float().repeat_interleave(64, 1) + t["wzeros"].float().repeat_interleave(64, 1)
    ref = x.float() @ deq.t() + t["bias"]
    assert (layer(x).float() - ref).abs().max() <= 2 ** -7 * ref.abs().max()
    rel = ((layer(x).float() - (x.float() @ w.t() + bias)).norm() / ref.norm()).item()
    assert rel < 0.15


def test_only_the_svdquant_backends_take_svdquant_schemes():
    from qdit.kernels import backends  # importing the package registers every backend

    for backend in backends():
        for scheme in (Scheme.SVDQ_INT4, Scheme.SVDQ_NVFP4, Scheme.AWQ_W4A16):
            verdict = backend.can_implement(LayerQuant(scheme, lora_rank=32), 256, 256)
            # svdq-hopper-exact: Nunchaku's own W4A4 math, which Hopper can run exactly for INT4 only
            expected = backend.name in ("reference", "svdq-hopper") or (
                backend.name == "svdq-hopper-exact" and scheme is not Scheme.SVDQ_NVFP4)
            assert verdict.ok == expected, (backend.name, scheme)


def test_svdquant_hopper_backend_refuses_cpu_and_odd_ranks():
    from qdit.kernels import backend_by_name

    backend = backend_by_name("svdq-hopper")
    assert "CUDA" in backend.supports_device(torch.device("cpu")).reason
    verdict = backend.can_implement(LayerQuant(Scheme.SVDQ_INT4, lora_rank=24), 256, 256)
    assert not verdict.ok and "rank % 16" in verdict.reason


@pytest.mark.parametrize("model", ["qwen-image", "flux", "z-image"])
@pytest.mark.parametrize("precision", ["int4", "nvfp4"])
def test_bf16_checkpoint_quantized_to_svdquant_at_load(model, precision):
    """quantize="svdq_<precision>": Nunchaku's recipe made at load (W4A4 in every block, AWQ W4A16 for
    the modulation linears), close to the BF16 model."""
    adapter = adapter_by_name(model)
    bf16 = random_transformer(model, config=CONFIGS[model], dtype=DTYPE, seed=3)
    quant = random_transformer(model, config=CONFIGS[model], dtype=DTYPE, seed=3, quantize=f"svdq_{precision}")
    schemes = {name: lq.scheme for name, lq in quant.qdit_plan.items()}
    w4a4 = Scheme.SVDQ_INT4 if precision == "int4" else Scheme.SVDQ_NVFP4
    assert sum(s is w4a4 for s in schemes.values()) >= 10
    for name, scheme in schemes.items():
        in_block = name.startswith(tuple(f"{b}." for b in adapter.block_lists))
        if not in_block:
            assert scheme is Scheme.BF16, name
        elif name.endswith(("img_mod.1", "txt_mod.1", "norm1.linear", "norm1_context.linear")):
            assert scheme is Scheme.AWQ_W4A16, name
    inputs = adapter.example_inputs(bf16.config, batch=1, height=128, width=128)
    with torch.no_grad():
        ref, got = bf16(**inputs)[0], quant(**inputs)[0]
    ref, got = (torch.stack(t) if isinstance(t, list) else t for t in (ref, got))
    rel = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
    assert 0 < rel < 0.25, rel  # measured 0.04-0.20 (Z-Image, every Linear quantized, highest)


# ------------------------------------------------------------------------------------------------
# Tiny models end to end
# ------------------------------------------------------------------------------------------------

def converted(tmp_path, model, precision, rank=32):
    bf16 = random_transformer(model, config=CONFIGS[model], dtype=DTYPE, seed=1)
    state = nunchaku_state_dict(model, bf16.state_dict(), precision, rank)
    src = write_merged_file(tmp_path / f"svdq-{precision}_r{rank}-{model}.safetensors", model, state, precision, rank)
    dst = tmp_path / f"{model}-{precision}"
    assert main(["convert", "nunchaku", str(src), str(dst)]) == 0
    return bf16, dst


def run(model_name, transformer):
    adapter = adapter_by_name(model_name)
    inputs = adapter.example_inputs(CONFIGS[model_name], height=128, width=128, text_tokens=8, dtype=DTYPE)
    with torch.no_grad():
        return adapter.output_tensor(transformer(**inputs)).float()


@pytest.mark.parametrize("model", ["qwen-image", "z-image", "flux"])
@pytest.mark.parametrize("precision", ["int4", "nvfp4"])
def test_tiny_model_converts_loads_and_runs(tmp_path, model, precision, capsys):
    bf16, folder = converted(tmp_path, model, precision)
    q = qdit.load_transformer(folder)
    schemes = {lq.scheme for lq in q.qdit_plan.values()}
    assert (Scheme.SVDQ_INT4 if precision == "int4" else Scheme.SVDQ_NVFP4) in schemes
    assert (Scheme.AWQ_W4A16 in schemes) == (model != "z-image")
    assert q.qdit_load_report.backends == {"reference": sum(lq.quantized for lq in q.qdit_plan.values())}
    if model == "qwen-image" and precision == "int4":
        assert q.qdit_plan["transformer_blocks.0.img_mlp.net.2"].gelu_shift
        assert not q.qdit_plan["transformer_blocks.0.img_mlp.net.0.proj"].gelu_shift
    ref, out = run(model, bf16), run(model, q)
    assert torch.isfinite(out).all()
    rel = ((out - ref).norm() / ref.norm()).item()
    with capsys.disabled():
        print(f"\n{model} {precision}: rel. error vs BF16 {rel:.4f}")
    assert rel < 0.35

    info = qdit.inspect(folder)
    assert info["format"] == "nunchaku-svdquant" and info["quant_algo"] == precision
    assert any(s.startswith(f"svdq_{precision}") for s in info["scheme_counts"])
    assert main(["inspect", str(folder)]) == 0


@pytest.mark.parametrize("precision", ["int4", "nvfp4"])
def test_flux_single_block_proj_out_is_two_layers_split_along_k(tmp_path, precision):
    from qdit.quant.layer import SplitKLinear

    _, folder = converted(tmp_path, "flux", precision)
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    q = qdit.load_transformer(folder)
    p = "single_transformer_blocks.0.proj_out"
    assert isinstance(q.get_submodule(p), SplitKLinear) and p not in q.qdit_plan
    first, second = q.qdit_plan[f"{p}.linears.0"], q.qdit_plan[f"{p}.linears.1"]
    assert (first.k_slice, second.k_slice) == ((0, 128), (128, 640))
    assert second.gelu_shift == (precision == "int4") and not first.gelu_shift
    assert (f"{p}.linears.1" in qc.get("gelu_shift", {}).get("layers", [])) == (precision == "int4")
    assert q.qdit_plan["transformer_blocks.0.ff.net.2"].gelu_shift == (precision == "int4")
    assert q.qdit_plan["single_transformer_blocks.0.norm.linear"].scheme is Scheme.AWQ_W4A16
    info = qdit.inspect(folder)
    assert info["layers"][f"{p}.linears.1"].startswith(f"svdq_{precision}")


def test_split_k_parts_must_cover_the_linear(tmp_path):
    from qdit.errors import CheckpointError

    _, folder = converted(tmp_path, "flux", "int4")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["svdquant_layers"].remove("single_transformer_blocks.0.proj_out.linears.0")
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="does not have all its parts"):
        qdit.load_transformer(folder)


def test_gpu_only_backend_request_is_refused_clearly(tmp_path):
    _, folder = converted(tmp_path, "qwen-image", "nvfp4")
    with pytest.raises(BackendUnavailableError, match="nvfp4-hopper"):
        qdit.load_transformer(folder, backend="nvfp4-hopper")


def test_converted_checkpoint_cannot_be_quantized_again(tmp_path):
    _, folder = converted(tmp_path, "qwen-image", "int4")
    with pytest.raises(qdit.errors.QditError, match="already quantized"):
        qdit.load_transformer(folder, quantize="fp8")


def test_gpu_backend_refusal_names_layer_and_scheme(tmp_path, monkeypatch):
    from qdit.kernels.nvfp4_hopper import NVFP4HopperBackend
    from qdit.kernels.registry import YES

    _, folder = converted(tmp_path, "qwen-image", "nvfp4")
    monkeypatch.setattr(NVFP4HopperBackend, "supports_device", lambda self, device: YES)  # as if on a Hopper GPU
    with pytest.raises(BackendUnavailableError, match=r"computes NVFP4 layers only, not (svdq_nvfp4|awq_w4a16)") as e:
        qdit.load_transformer(folder, backend="nvfp4-hopper")
    assert "transformer_blocks.0." in str(e.value)


def test_strict_loading_names_a_missing_part_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    from qdit.errors import CheckpointError

    _, folder = converted(tmp_path, "qwen-image", "int4")
    path = folder / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(path))
    del tensors["transformer_blocks.1.attn.add_qkv_proj.proj_up"]
    scales = "transformer_blocks.0.img_mlp.net.2.wscales"
    tensors[scales] = tensors[scales].float()
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError) as e:
        qdit.load_transformer(folder)
    # float32 scales are cast to the model dtype; the missing low-rank factor is named per diffusers part
    assert "transformer_blocks.1.attn.add_q_proj.proj_up" in str(e.value)
