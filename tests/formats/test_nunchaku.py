"""Nunchaku SVDQuant W4A4 -> qdit canonical layout, against DeepCompressor's own packer.

DeepCompressor (PyPI `deepcompressor-toolkit`) is the producer of Nunchaku checkpoints: known codes,
scales and vectors go through its packing functions, and `qdit.convert_nunchaku_tensors` must give every
one of them back bit for bit (compared through integer views, so -0.0 / NaN patterns count too).
"""

from __future__ import annotations

import pytest
import torch

import qdit
from qdit.errors import CheckpointError

import deepcompressor.backend.nunchaku.utils as nunchaku_utils  # noqa: E402 (installed by .ci/run, --no-deps)
import deepcompressor.backend.nunchaku.convert as nunchaku_convert  # noqa: E402
pack_w4a4 = nunchaku_utils.convert_to_nunchaku_w4x4y16_linear_weight

DTYPE = torch.bfloat16
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[a.element_size()]
    return torch.equal(a.contiguous().view(ints), b.contiguous().view(ints))


def row_major_bytes(codes: torch.Tensor) -> torch.Tensor:
    """[N, K] 4-bit codes -> uint8 [N, K/2], even k in the low nibble (written here, not taken from qdit)."""
    c = codes.to(torch.int32) & 0xF
    return (c[:, 0::2] | (c[:, 1::2] << 4)).to(torch.uint8)


def pad_to(t: torch.Tensor, shape: tuple[int, ...], value: float) -> torch.Tensor:
    out = torch.full(shape, value, dtype=t.dtype)
    out[tuple(slice(0, s) for s in t.shape)] = t
    return out


def known_layer(n, k, r, gen):
    bias = (torch.randn(n, generator=gen) * 0.1).to(DTYPE)
    smooth = (torch.rand(k, generator=gen) * 3 + 0.25).to(DTYPE)
    down = (torch.randn(r, k, generator=gen) * 0.05).to(DTYPE)  # DeepCompressor's branch a.weight [r, K]
    up = (torch.randn(n, r, generator=gen) * 0.05).to(DTYPE)  # branch b.weight [N, r]
    return bias, smooth, down, up


def v1_dict(prefix, qweight, scale_key, scale, bias, smooth, lora, extra=None):
    d = {f"{prefix}.qweight": qweight, f"{prefix}.{scale_key}": scale, f"{prefix}.bias": bias,
         f"{prefix}.smooth_factor": smooth, f"{prefix}.smooth_factor_orig": smooth.clone(),
         f"{prefix}.proj_down": lora[0], f"{prefix}.proj_up": lora[1]}
    d.update(extra or {})
    return d


def check_vectors_and_lowrank(out, prefix, n, k, r, bias, smooth, down, up):
    np_, kp, rp = -(-n // 128) * 128, -(-k // 128) * 128, -(-r // 16) * 16
    assert same_bits(out[f"{prefix}.bias"], pad_to(bias, (np_,), 1.0))
    assert same_bits(out[f"{prefix}.smooth_factor"], pad_to(smooth, (kp,), 1.0))
    assert same_bits(out[f"{prefix}.proj_down"], pad_to(down.T.contiguous(), (kp, rp), 0.0))
    assert same_bits(out[f"{prefix}.proj_up"], pad_to(up, (np_, rp), 0.0))
    assert f"{prefix}.smooth_factor_orig" not in out


# N = 200 and r = 40 exercise DeepCompressor's padding (N to 128, rank to 16); the converter keeps it.
@pytest.mark.parametrize("n,k,r", [(256, 384, 48), (200, 384, 40)])
def test_int4_round_trip(n, k, r):
    gen = torch.Generator().manual_seed(1)
    codes = torch.randint(-8, 8, (n, k), generator=gen)
    scales = (torch.rand(n, k // 64, generator=gen) * 0.1 + 0.01).to(DTYPE)
    # codes * scale rounded to bf16 is off by < 8 * 2^-9 of a step, so the packer's round() recovers the code
    weight = (codes.float() * scales.float().repeat_interleave(64, dim=1)).to(DTYPE)
    bias, smooth, down, up = known_layer(n, k, r, gen)
    qweight, wscales, pbias, psmooth, lora, sub = pack_w4a4(
        weight, scales.view(n, 1, k // 64, 1), bias=bias, smooth=smooth, lora=(down, up), float_point=False)
    assert sub is None and qweight.dtype == torch.int8 and wscales.dtype == DTYPE

    prefix = "transformer_blocks.0.img_mlp.net.2"
    out = qdit.convert_nunchaku_tensors(v1_dict(prefix, qweight, "wscales", wscales, pbias, psmooth, lora),
                                        precision="int4", group_size=64)
    np_ = -(-n // 128) * 128
    assert same_bits(out[f"{prefix}.qweight"], row_major_bytes(pad_to(codes, (np_, k), 0)))
    assert same_bits(out[f"{prefix}.wscales"], pad_to(scales, (np_, k // 64), 1.0))
    check_vectors_and_lowrank(out, prefix, n, k, r, bias, smooth, down, up)
    suffixes = ("qweight", "wscales", "bias", "smooth_factor", "proj_down", "proj_up")
    assert set(out) == {f"{prefix}.{s}" for s in suffixes}


def nvfp4_layer(n, k, gen, row_scale):
    codes = torch.randint(0, 16, (n, k), generator=gen)
    codes[codes == 8] = 0  # the producer never emits -0 (it picks code 0 for a zero)
    # block scales that are exact e4m3 values, so the packer's bf16 -> e4m3 cast is lossless
    sub = (torch.rand(n, k // 16, generator=gen) * 60 + 0.02).to(torch.float8_e4m3fn).to(DTYPE)
    weight = E2M1[codes] * sub.float().repeat_interleave(16, dim=1) * row_scale.float().view(-1, 1)
    return codes, sub, weight.to(DTYPE)


def test_nvfp4_round_trip_single_layer():
    n, k, r = 256, 512, 32
    gen = torch.Generator().manual_seed(2)
    wtscale = torch.tensor(0.0123, dtype=DTYPE)
    codes, sub, weight = nvfp4_layer(n, k, gen, wtscale.expand(n))
    bias, smooth, down, up = known_layer(n, k, r, gen)
    qweight, scale, pbias, psmooth, lora, psub = pack_w4a4(
        weight, wtscale.view(1), bias=bias, smooth=smooth, lora=(down, up), float_point=True,
        subscale=sub.view(n, 1, k // 16, 1))
    assert psub.dtype == torch.float8_e4m3fn and scale.shape == (1,)

    prefix = "transformer_blocks.3.attn.to_out.0"
    state = v1_dict(prefix, qweight, "wscales", psub, pbias, psmooth, lora, {f"{prefix}.wtscale": scale})
    out = qdit.convert_nunchaku_tensors(state, precision="nvfp4", group_size=16)
    assert same_bits(out[f"{prefix}.qweight"], row_major_bytes(codes))
    assert same_bits(out[f"{prefix}.wscales"], sub.to(torch.float8_e4m3fn))
    assert out[f"{prefix}.wtscale"].shape == () and out[f"{prefix}.wtscale"].dtype == torch.float32
    assert out[f"{prefix}.wtscale"].item() == wtscale.item()
    check_vectors_and_lowrank(out, prefix, n, k, r, bias, smooth, down, up)


def test_nvfp4_round_trip_fused_layer_wcscales():
    # A fused layer (qkv) carries its parts' per-tensor scales per row, as wcscales.
    n, k, r = 384, 256, 16
    gen = torch.Generator().manual_seed(3)
    wcscales = torch.cat([torch.full((128,), v) for v in (0.5, 0.03125, 0.0078125)]).to(DTYPE)
    codes, sub, weight = nvfp4_layer(n, k, gen, wcscales)
    bias, smooth, down, up = known_layer(n, k, r, gen)
    qweight, scale, pbias, psmooth, lora, psub = pack_w4a4(
        weight, wcscales.view(n, 1, 1, 1), bias=bias, smooth=smooth, lora=(down, up), float_point=True,
        subscale=sub.view(n, 1, k // 16, 1))
    prefix = "transformer_blocks.0.attn.to_qkv"
    state = v1_dict(prefix, qweight, "wscales", psub, pbias, psmooth, lora, {f"{prefix}.wcscales": scale})
    out = qdit.convert_nunchaku_tensors(state, precision="nvfp4", group_size=16)
    assert same_bits(out[f"{prefix}.qweight"], row_major_bytes(codes))
    assert same_bits(out[f"{prefix}.wscales"], sub.to(torch.float8_e4m3fn))
    assert same_bits(out[f"{prefix}.wcscales"], wcscales)
    check_vectors_and_lowrank(out, prefix, n, k, r, bias, smooth, down, up)


def test_v0_flux_names_from_deepcompressor_state_dict():
    """DeepCompressor's state-dict exporter writes v0 names (smooth, lora_down, ...); FLUX modules get
    diffusers names, and a single block's two proj_out halves get proj_out.linears.{0,1}."""
    n, k, r = 128, 256, 16
    gen = torch.Generator().manual_seed(4)
    codes = torch.randint(-8, 8, (n, k), generator=gen)
    scales = (torch.rand(n, k // 64, generator=gen) * 0.1 + 0.01).to(DTYPE)
    weight = (codes.float() * scales.float().repeat_interleave(64, dim=1)).to(DTYPE)
    bias, smooth, down, up = known_layer(n, k, r, gen)
    layer = nunchaku_convert.convert_to_nunchaku_w4x4y16_linear_state_dict(
        weight, scales.view(n, 1, k // 64, 1), bias=bias, smooth=smooth, lora=(down, up))
    assert {"smooth", "smooth_orig", "lora_down", "lora_up"} <= set(layer)
    # the exporter divides the down projection by the smoothing factor (in float64) before packing
    unsmoothed = (down.double() / smooth.double().unsqueeze(0)).to(DTYPE)
    renames = {"transformer_blocks.2.qkv_proj_context": "transformer_blocks.2.attn.add_qkv_proj",
               "transformer_blocks.2.mlp_context_fc2": "transformer_blocks.2.ff_context.net.2",
               "single_transformer_blocks.5.out_proj": "single_transformer_blocks.5.proj_out.linears.0",
               "single_transformer_blocks.5.mlp_fc1": "single_transformer_blocks.5.proj_mlp",
               "single_transformer_blocks.5.mlp_fc2": "single_transformer_blocks.5.proj_out.linears.1"}
    state = {f"{old}.{s}": t for old in renames for s, t in layer.items()}
    state["single_transformer_blocks.5.norm_q.weight"] = torch.ones(8, dtype=DTYPE)
    state["x_embedder.weight"] = torch.ones(4, 4, dtype=DTYPE)
    out = qdit.convert_nunchaku_tensors(state, precision="int4", group_size=64)
    for new in renames.values():
        assert same_bits(out[f"{new}.qweight"], row_major_bytes(codes))
        assert same_bits(out[f"{new}.wscales"], scales)
        check_vectors_and_lowrank(out, new, n, k, r, bias, smooth, unsmoothed, up)
    assert same_bits(out["single_transformer_blocks.5.attn.norm_q.weight"], torch.ones(8, dtype=DTYPE))
    assert "x_embedder.weight" in out
    assert len(out) == 6 * len(renames) + 2


def test_v2_flux_single_block_names():
    from qdit.formats.nunchaku import diffusers_module_name

    single = "single_transformer_blocks.1."
    assert diffusers_module_name(single + "attn.to_out") == single + "proj_out.linears.0"
    assert diffusers_module_name("single_transformer_blocks.1.attn.to_qkv") == "single_transformer_blocks.1.attn.to_qkv"
    assert diffusers_module_name("transformer_blocks.1.attn.to_out.0") == "transformer_blocks.1.attn.to_out.0"
    assert diffusers_module_name("transformer_blocks.1.norm1.linear") == "transformer_blocks.1.norm1.linear"
    assert diffusers_module_name("layers.0.feed_forward.net.0.proj") == "layers.0.feed_forward.w3_w1"
    assert diffusers_module_name("noise_refiner.1.feed_forward.net.2") == "noise_refiner.1.feed_forward.w2"
    assert diffusers_module_name("layers.3.attention.to_qkv") == "layers.3.attention.to_qkv"
    assert diffusers_module_name("transformer_blocks.0.img_mlp.net.0.proj") == "transformer_blocks.0.img_mlp.net.0.proj"


def test_z_image_bf16_refiner_ffn_is_split_into_w3_and_w1():
    up, gate = torch.randn(256, 96).to(DTYPE), torch.randn(256, 96).to(DTYPE)
    state = {"context_refiner.0.feed_forward.net.0.proj.weight": torch.cat([up, gate]),
             "context_refiner.0.feed_forward.net.2.weight": torch.ones(96, 256, dtype=DTYPE)}
    out = qdit.convert_nunchaku_tensors(state, precision="nvfp4", group_size=16)
    assert set(out) == {f"context_refiner.0.feed_forward.{w}.weight" for w in ("w1", "w2", "w3")}
    assert same_bits(out["context_refiner.0.feed_forward.w3.weight"], up)
    assert same_bits(out["context_refiner.0.feed_forward.w1.weight"], gate)


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------

def _int4_state(n=128, k=256, r=16):
    gen = torch.Generator().manual_seed(5)
    codes = torch.randint(-8, 8, (n, k), generator=gen)
    scales = (torch.rand(n, k // 64, generator=gen) * 0.1 + 0.01).to(DTYPE)
    weight = (codes.float() * scales.float().repeat_interleave(64, dim=1)).to(DTYPE)
    bias, smooth, down, up = known_layer(n, k, r, gen)
    qweight, wscales, pbias, psmooth, lora, _ = pack_w4a4(
        weight, scales.view(n, 1, k // 64, 1), bias=bias, smooth=smooth, lora=(down, up))
    return v1_dict("blk.lin", qweight, "wscales", wscales, pbias, psmooth, lora)


@pytest.mark.parametrize("precision,group", [("int8", 64), ("fp4", 16), ("nvfp4", 64), ("int4", 16)])
def test_bad_precision_or_group(precision, group):
    with pytest.raises(CheckpointError, match="precision|group size"):
        qdit.convert_nunchaku_tensors(_int4_state(), precision=precision, group_size=group)


def test_rank_not_multiple_of_16():
    state = _int4_state()
    state["blk.lin.proj_down"] = state["blk.lin.proj_down"][:, :12].contiguous()
    with pytest.raises(CheckpointError, match="rank is not a multiple of 16") as e:
        qdit.convert_nunchaku_tensors(state, precision="int4", group_size=64)
    assert "blk.lin.proj_down" in str(e.value)


@pytest.mark.parametrize("key,shape", [("qweight", (200, 128)), ("qweight", (128, 96)), ("bias", (100,)),
                                       ("smooth_factor", (192,)), ("proj_up", (144, 16))])
def test_dims_not_multiple_of_128(key, shape):
    state = _int4_state()
    state[f"blk.lin.{key}"] = torch.zeros(shape, dtype=state[f"blk.lin.{key}"].dtype)
    with pytest.raises(CheckpointError, match="not a multiple of 128|disagree"):
        qdit.convert_nunchaku_tensors(state, precision="int4", group_size=64)


def test_precision_contradicts_wscales_dtype():
    with pytest.raises(CheckpointError, match="wscales dtype does not match the precision"):
        qdit.convert_nunchaku_tensors(_int4_state(), precision="nvfp4", group_size=16)


@pytest.mark.parametrize("module,chunks", [("transformer_blocks.0.img_mod.1", 6),
                                           ("transformer_blocks.1.norm1_context.linear", 6),
                                           ("single_transformer_blocks.2.norm.linear", 3)])
def test_awq_modulation_round_trip(module, chunks):
    n, k = 96 * chunks, 192  # 3 groups of 64: the packer pads the group rows to 16
    gen = torch.Generator().manual_seed(6)
    codes = torch.randint(0, 16, (n, k), generator=gen)
    scales = (torch.rand(n, k // 64, generator=gen) * 0.1 + 0.01).to(DTYPE)
    weight = ((codes.float() - 7) * scales.float().repeat_interleave(64, dim=1)).to(DTYPE)
    bias = (torch.randn(n, generator=gen) * 0.1).to(DTYPE)
    qweight, wscales, wzeros, pbias = nunchaku_utils.convert_to_nunchaku_w4x16_linear_weight(
        weight, scales.view(n, 1, k // 64, 1), bias=bias.clone(), adanorm_splits=chunks)
    assert qweight.dtype == torch.int32 and wscales.shape == (16, n)
    state = {f"{module}.qweight": qweight, f"{module}.wscales": wscales, f"{module}.wzeros": wzeros,
             f"{module}.bias": pbias}
    out = qdit.convert_nunchaku_tensors(state, precision="int4", group_size=64)
    name = qdit.formats.nunchaku.diffusers_module_name(module)
    assert same_bits(out[f"{name}.qweight"], row_major_bytes(codes))
    assert same_bits(out[f"{name}.wscales"], scales)
    # the producer's zero point is -7 * scale, rounded to the model dtype
    assert same_bits(out[f"{name}.wzeros"], (-7 * scales.float()).to(DTYPE))
    # +1 on the scale chunks was added in the model dtype, and is taken off exactly in float32
    plus_one = torch.zeros(chunks, 1)
    plus_one[1] = plus_one[chunks - 2] = 1
    stored = (bias.float().view(chunks, -1) + plus_one).to(DTYPE).float()
    expected = (stored - plus_one).view(n)
    assert torch.equal(out[f"{name}.bias"], expected), (out[f"{name}.bias"] - expected).abs().max()
    # and dequantizing gives the weight back
    deq = (out[f"{name}.qweight"].unsqueeze(-1) >> torch.tensor([0, 4], dtype=torch.uint8)) & 0xF
    deq = deq.flatten(1).float() * out[f"{name}.wscales"].float().repeat_interleave(64, 1)
    deq = deq + out[f"{name}.wzeros"].float().repeat_interleave(64, 1)
    # (within the bf16 rounding of the weight and of the zero point)
    bound = (weight.float().abs() + 7 * scales.float().repeat_interleave(64, 1)) * 2.0**-8
    assert ((deq - weight.float()).abs() <= bound).all()


def test_unknown_awq_layer_is_refused_clearly():
    state = {"blocks.0.mystery.qweight": torch.zeros(96, 96, dtype=torch.int32),
             "blocks.0.mystery.wscales": torch.zeros(16, 384, dtype=DTYPE),
             "blocks.0.mystery.wzeros": torch.zeros(16, 384, dtype=DTYPE)}
    with pytest.raises(CheckpointError, match="AWQ W4A16 layer qdit does not know"):
        qdit.convert_nunchaku_tensors(state, precision="int4", group_size=64)
