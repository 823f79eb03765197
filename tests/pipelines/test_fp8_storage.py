"""FP8 weight storage for text encoders and VAEs, on tiny real diffusers / transformers models.

Everything computes in bfloat16 (the production compute dtype): the reference is the BF16 model, the
candidate the same model with FP8 weight storage. PSNR uses the reference's dynamic range as peak
(random-weight VAEs decode to small amplitudes, a fixed peak of 2 would flatter them). Each quality
test also runs a deliberately broken copy (every channel's scale off by a random ~25%) and checks that
it fails the same threshold, so the thresholds can fail.

Measured at the time of writing (torch 2.13 CPU, seeds below): memory ratio 0.515 / 0.505 / 0.534
(AutoencoderKL / AutoencoderKLQwenImage / Qwen2Model); PSNR decode 40.6 / 39.3 dB, encode->decode
34.9 / 32.5 dB; cosine min 0.9977; broken scales: PSNR 12.5-24.1 dB, cosine min 0.868. Random-weight
models spread with the seed (Qwen-Image VAE encode->decode 28-46 dB over seeds 0-9 in float32), so
these thresholds say "no bug", not "indistinguishable on trained weights".
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

from qdit.pipelines.fp8_storage import (
    FP8StorageConv2d,
    FP8StorageLayer,
    FP8StorageLinear,
    apply_fp8_weight_storage,
    quantize_per_channel,
)
from qdit.quant.storage import weight_bytes

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

DT = torch.bfloat16
PSNR_MIN_DB = 30.0
COSINE_MIN = 0.99
TARGETS = (nn.Linear, nn.Conv2d, nn.Conv3d)


@pytest.fixture(autouse=True, scope="module")
def _quiet_diffusers():
    level = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()  # "modules that should be kept in float32: []" on .to()
    yield
    diffusers.utils.logging.set_verbosity(level)


def _kl_vae():
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(
        block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, sample_size=64, norm_num_groups=32,
        layers_per_block=1).to(DT).eval()


def _qwen_vae():
    torch.manual_seed(0)
    return diffusers.AutoencoderKLQwenImage(
        base_dim=32, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, attn_scales=[], temperal_downsample=[False],
        latents_mean=[0.0] * 4, latents_std=[1.0] * 4).to(DT).eval()


def _text_encoder():
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    return transformers.Qwen2Model(cfg).to(DT).eval()


def _image(video: bool) -> torch.Tensor:
    """A fixed smooth 64x64 RGB image in [-1, 1] ([1, 3, 64, 64], or [1, 3, 1, 64, 64] for a video VAE)."""
    r = torch.linspace(-1, 1, 64)
    base = torch.sin(9.0 * r[None, :] * r[:, None])
    img = (base[None] * torch.tensor([1.0, 0.5, -0.7])[:, None, None])[None].to(DT)
    return img[:, :, None] if video else img


def _latent(video: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    shape = (1, 4, 1, 16, 16) if video else (1, 4, 16, 16)
    return torch.randn(shape, generator=g).to(DT)


MODELS = {"AutoencoderKL": (_kl_vae, False), "AutoencoderKLQwenImage": (_qwen_vae, True)}


@pytest.fixture(scope="module")
def pairs():
    """name -> (BF16 reference, FP8-storage copy, layers converted); built once."""
    out = {}
    for name, build in [("AutoencoderKL", _kl_vae), ("AutoencoderKLQwenImage", _qwen_vae),
                        ("Qwen2Model", _text_encoder)]:
        ref = build()
        fp8 = copy.deepcopy(ref)
        out[name] = (ref, fp8, apply_fp8_weight_storage(fp8))
    return out


def _psnr(ref: torch.Tensor, x: torch.Tensor) -> float:
    ref, x = ref.float(), x.float()
    mse = ((ref - x) ** 2).mean()
    return float(20 * torch.log10(ref.max() - ref.min()) - 10 * torch.log10(mse))


def _break_scales(model: nn.Module) -> nn.Module:
    broken = copy.deepcopy(model)
    g = torch.Generator().manual_seed(7)
    for m in broken.modules():
        if isinstance(m, FP8StorageLayer):
            m.weight_scale.mul_(1 + 0.25 * torch.randn(m.weight_scale.shape, generator=g))
    return broken


def _convertible(model: nn.Module, min_numel: int = 4096) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, TARGETS) and m.weight.numel() >= min_numel]


# --- numerics -----------------------------------------------------------------------------------


def test_quantize_per_channel_scale_zero_channel_and_saturation():
    w = torch.randn(4, 3, 3, 3) * torch.tensor([1.0, 1e-3, 0.0, 50.0])[:, None, None, None]
    fp8, scale = quantize_per_channel(w)
    assert fp8.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32 and scale.shape == (4,)
    amax = w.abs().amax(dim=(1, 2, 3))
    assert torch.equal(scale[[0, 1, 3]], amax[[0, 1, 3]] / 448.0)
    assert scale[2] == 1.0 and torch.all(fp8[2].float() == 0)  # all-zero channel
    assert fp8.float().abs().amax(dim=(1, 2, 3))[[0, 1, 3]].eq(448.0).all()  # the channel max maps to 448
    deq = fp8.float() * scale[:, None, None, None]
    # E4M3 keeps 3 mantissa bits: relative error <= 2^-4 away from the subnormal range.
    normal = w.abs() >= amax[:, None, None, None] * 2.0**-6
    assert ((deq - w).abs() <= w.abs() * 2.0**-4 + 1e-12)[normal].all()
    assert not torch.isnan(deq).any()
    # Saturating: a value the scale rounds slightly above 448 must not become NaN.
    fp8, _ = quantize_per_channel(torch.tensor([[448.0 * 1.0000001, 1.0]]))
    assert not torch.isnan(fp8.float()).any()


# --- memory -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["AutoencoderKL", "AutoencoderKLQwenImage", "Qwen2Model"])
def test_weight_bytes_halve(pairs, name):
    ref, fp8, n = pairs[name]
    before, after = weight_bytes(ref), weight_bytes(fp8)
    print(f"\n{name}: {n} layers converted, weight bytes {before} -> {after} (ratio {after / before:.3f})")
    assert n == len(_convertible(ref)) and n > 10
    assert after / before < 0.6


def test_weight_bytes_counts_params_and_buffers_once():
    emb = nn.Embedding(10, 8)
    m = nn.ModuleDict({"a": emb, "b": nn.Linear(8, 10, bias=False)})
    m["b"].weight = emb.weight  # tied
    m.register_buffer("buf", torch.zeros(3, dtype=torch.float8_e4m3fn))
    assert weight_bytes(m) == 10 * 8 * 4 + 3


# --- quality ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MODELS))
def test_vae_quality(pairs, name):
    ref, fp8, _ = pairs[name]
    video = MODELS[name][1]
    z, x = _latent(video), _image(video)
    broken = _break_scales(fp8)
    with torch.no_grad():
        dec_ref, dec = ref.decode(z).sample, fp8.decode(z).sample
        ed_ref, ed = ref(x).sample, fp8(x).sample
        dec_broken, ed_broken = broken.decode(z).sample, broken(x).sample
    assert dec.dtype == DT and dec.shape == dec_ref.shape
    p_dec, p_ed = _psnr(dec_ref, dec), _psnr(ed_ref, ed)
    p_dec_b, p_ed_b = _psnr(dec_ref, dec_broken), _psnr(ed_ref, ed_broken)
    print(f"\n{name}: PSNR FP8 vs BF16: decode {p_dec:.1f} dB, encode->decode {p_ed:.1f} dB; "
          f"broken scales: {p_dec_b:.1f} / {p_ed_b:.1f} dB")
    assert p_dec > PSNR_MIN_DB and p_ed > PSNR_MIN_DB
    assert p_dec_b < PSNR_MIN_DB and p_ed_b < PSNR_MIN_DB


def test_text_encoder_quality(pairs):
    ref, fp8, _ = pairs["Qwen2Model"]
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(2))
    broken = _break_scales(fp8)
    with torch.no_grad():
        h_ref = ref(ids).last_hidden_state.float()
        h, h_broken = fp8(ids).last_hidden_state, broken(ids).last_hidden_state.float()
    assert h.dtype == DT
    cos = torch.nn.functional.cosine_similarity(h_ref, h.float(), dim=-1)
    cos_b = torch.nn.functional.cosine_similarity(h_ref, h_broken, dim=-1)
    print(f"\nQwen2Model last hidden state cosine FP8 vs BF16: mean {cos.mean():.5f} min {cos.min():.5f}; "
          f"broken scales: min {cos_b.min():.5f}")
    assert cos.min() > COSINE_MIN
    assert cos_b.min() < COSINE_MIN


# --- dtype, idempotence, untouched modules, no resident copy --------------------------------------


def test_reported_dtype_stays_compute_dtype(pairs):
    from diffusers.models.modeling_utils import get_parameter_dtype

    for name in ("AutoencoderKL", "AutoencoderKLQwenImage"):
        vae = pairs[name][1]
        assert vae.dtype == DT and get_parameter_dtype(vae) == DT
        assert _latent(MODELS[name][1]).to(vae.dtype).dtype == DT  # what diffusers pipelines do before decode
    te = pairs["Qwen2Model"][1]
    assert te.dtype == DT and next(te.parameters()).dtype == DT
    # Also when the model's first layer is converted (its bias becomes the first floating parameter).
    vae = copy.deepcopy(pairs["AutoencoderKL"][0])
    apply_fp8_weight_storage(vae, min_numel=0)
    assert next(n for n, _ in vae.named_parameters()) == "encoder.conv_in.bias"
    assert vae.dtype == DT
    for model in (p[1] for p in pairs.values()):
        assert all(p.dtype != torch.float8_e4m3fn for p in model.parameters())
        for m in model.modules():
            if isinstance(m, FP8StorageLayer):
                assert m.weight.dtype == DT  # code reads `layer.weight.dtype` to cast inputs (T5, attention)


def test_warns_when_no_floating_parameter_is_left(caplog):
    m = nn.Sequential(nn.Linear(64, 128, bias=False))
    with caplog.at_level(logging.WARNING, logger="qdit.pipelines"):
        assert apply_fp8_weight_storage(m) == 1
    assert "no floating parameter left" in caplog.text


def test_idempotent(pairs):
    for ref, fp8, n in pairs.values():
        state = {k: v.clone() for k, v in fp8.state_dict().items()}
        assert apply_fp8_weight_storage(fp8) == 0
        assert state.keys() == fp8.state_dict().keys()
        assert all(torch.equal(v.view(torch.uint8) if v.dtype == torch.float8_e4m3fn else v,
                               fp8.state_dict()[k].view(torch.uint8) if v.dtype == torch.float8_e4m3fn
                               else fp8.state_dict()[k]) for k, v in state.items())
        assert sum(isinstance(m, FP8StorageLayer) for m in fp8.modules()) == n


def test_norms_embeddings_and_small_layers_untouched(pairs):
    for ref, fp8, _ in pairs.values():
        ref_modules = dict(ref.named_modules())
        for name, m in fp8.named_modules():
            r = ref_modules[name]
            if isinstance(r, TARGETS) and r.weight.numel() >= 4096:
                assert isinstance(m, FP8StorageLayer) and isinstance(m, type(r))  # same class in the MRO
                continue
            assert type(m) is type(r), name
            own = dict(m.named_parameters(recurse=False))
            assert own.keys() == dict(r.named_parameters(recurse=False)).keys(), name
            assert all(p.dtype == DT and isinstance(p, nn.Parameter) for p in own.values()), name
    te = pairs["Qwen2Model"][1]
    assert type(te.embed_tokens) is nn.Embedding and te.embed_tokens.weight.dtype == DT
    assert type(te.norm).__name__ == "Qwen2RMSNorm" and te.norm.weight.dtype == DT
    vae = pairs["AutoencoderKL"][1]
    assert type(vae.encoder.conv_norm_out) is nn.GroupNorm and vae.encoder.conv_norm_out.weight.dtype == DT
    assert type(vae.encoder.conv_in) is nn.Conv2d  # 3 -> 32 channels, 864 weights < min_numel


def test_no_resident_compute_dtype_weight(pairs):
    for ref, fp8, _ in pairs.values():
        state = fp8.state_dict()
        ref_state = ref.state_dict()
        converted = [n for n, m in fp8.named_modules() if isinstance(m, FP8StorageLayer)]
        for name in converted:
            m = fp8.get_submodule(name)
            assert f"{name}.weight" not in state
            assert state[f"{name}.weight_fp8"].dtype == torch.float8_e4m3fn
            assert state[f"{name}.weight_fp8"].shape == ref_state[f"{name}.weight"].shape
            assert state[f"{name}.weight_scale"].dtype == torch.float32
            assert "weight" not in m._parameters and "weight" not in m._buffers
            held = {**m._parameters, **m._buffers}
            assert set(held) <= {"weight_fp8", "weight_scale", "bias"}
            assert all(t is None or t.dtype != DT or k == "bias" for k, t in held.items())
        # Only biases, norms, embeddings and small layers are left in the compute dtype.
        left = sum(t.numel() for t in state.values() if t.dtype == DT)
        assert left == sum(t.numel() for k, t in ref_state.items()
                           if k.rsplit(".", 1)[0] not in converted or k.endswith(".bias"))


def test_no_weight_kept_after_forward(pairs):
    te = pairs["Qwen2Model"][1]
    with torch.no_grad():
        te(torch.zeros(1, 4, dtype=torch.long))
    for m in te.modules():
        if isinstance(m, FP8StorageLayer):
            assert not [k for k, v in vars(m).items() if isinstance(v, torch.Tensor)]
            assert set(m._buffers) == {"weight_fp8", "weight_scale"}


# --- .to(), copies, state dicts -----------------------------------------------------------------


def _storage_dtypes(model):
    return {(m.weight_fp8.dtype, m.weight_scale.dtype) for m in model.modules() if isinstance(m, FP8StorageLayer)}


def test_to_dtype_keeps_fp8_storage_and_moves_compute_dtype(pairs):
    vae = copy.deepcopy(pairs["AutoencoderKL"][1])
    fp8_bytes = weight_bytes(vae)
    vae.to(torch.float32)
    assert _storage_dtypes(vae) == {(torch.float8_e4m3fn, torch.float32)}
    assert vae.dtype == torch.float32 and vae.decoder.conv_out.weight.dtype == torch.float32
    with torch.no_grad():
        out32 = vae.decode(_latent(False).float()).sample
        out16 = pairs["AutoencoderKL"][1].decode(_latent(False)).sample
    assert out32.dtype == torch.float32 and _psnr(out32, out16) > 35  # same weights, bf16 vs fp32 compute
    vae.half()
    assert vae.dtype == torch.float16 and _storage_dtypes(vae) == {(torch.float8_e4m3fn, torch.float32)}
    vae.to(DT)
    assert vae.dtype == DT and weight_bytes(vae) == fp8_bytes
    # Storage survives exactly: the bytes are the ones written at conversion.
    for (k, a), b in zip(vae.state_dict().items(), pairs["AutoencoderKL"][1].state_dict().values()):
        if a.dtype == torch.float8_e4m3fn:
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), k


def test_to_device_moves_fp8_buffers():
    lin = nn.Linear(128, 64).to(DT)
    apply_fp8_weight_storage(lin)
    lin.to("meta")
    assert lin.weight_fp8.device.type == "meta" and lin.weight_fp8.dtype == torch.float8_e4m3fn
    assert lin.weight_scale.device.type == "meta" and lin.weight_scale.dtype == torch.float32
    assert lin.bias.device.type == "meta" and lin.fp8_compute_dtype == DT


def test_module_type_keeps_storage():
    lin = nn.Linear(128, 64).to(DT)
    apply_fp8_weight_storage(lin)
    before = lin.weight_fp8.view(torch.uint8).clone(), lin.weight_scale.clone()
    lin.type(torch.float32)  # converts every tensor, integer views included: storage is restored
    assert torch.equal(lin.weight_fp8.view(torch.uint8), before[0]) and torch.equal(lin.weight_scale, before[1])
    assert lin.fp8_compute_dtype == torch.float32 and lin.bias.dtype == torch.float32
    no_bias = nn.Linear(128, 64, bias=False).to(DT)
    apply_fp8_weight_storage(no_bias)
    no_bias.to(torch.float16)  # no bias to follow: the compute dtype comes from what .to() does to a float tensor
    assert no_bias.fp8_compute_dtype == torch.float16 and no_bias.weight_fp8.dtype == torch.float8_e4m3fn


def test_deepcopy_and_state_dict_round_trip(pairs):
    te = pairs["Qwen2Model"][1]
    clone = copy.deepcopy(te)
    other = copy.deepcopy(pairs["Qwen2Model"][0])
    apply_fp8_weight_storage(other)
    with torch.no_grad():
        for m in other.modules():
            if isinstance(m, FP8StorageLayer):
                m.weight_scale.mul_(2)
        other.load_state_dict(te.state_dict())
        ids = torch.arange(8)[None]
        h = te(ids).last_hidden_state
        assert torch.equal(h, clone(ids).last_hidden_state) and torch.equal(h, other(ids).last_hidden_state)


# --- layer semantics ----------------------------------------------------------------------------


@pytest.mark.parametrize("layer", [
    nn.Linear(64, 96),
    nn.Conv2d(16, 32, 3, stride=2, padding=1),
    nn.Conv2d(16, 32, 3, padding=2, dilation=2, groups=4, padding_mode="reflect"),
    nn.Conv2d(16, 32, 3, padding=1, padding_mode="circular", bias=False),
    nn.Conv2d(16, 32, (3, 5), padding="same", padding_mode="replicate"),
    nn.Conv3d(8, 16, 3, stride=(1, 2, 2), padding=1),
], ids=["linear", "conv2d-stride", "conv2d-reflect-groups-dilation", "conv2d-circular", "conv2d-same-replicate",
        "conv3d"])
def test_layer_computes_like_the_layer_with_the_dequantized_weight(layer):
    torch.manual_seed(0)
    ref = copy.deepcopy(layer)
    assert apply_fp8_weight_storage(layer, min_numel=0) == 1
    assert isinstance(layer, type(ref)) and layer.extra_repr().startswith(ref.extra_repr())
    with torch.no_grad():
        ref.weight.copy_(layer.weight)
        x = torch.randn((2, 64) if isinstance(ref, nn.Linear) else
                        (1, 16, 12, 12) if isinstance(ref, nn.Conv2d) else (1, 8, 4, 8, 8))
        assert torch.equal(layer(x), ref(x))


def test_third_party_subclass_keeps_its_forward_and_isinstance(pairs):
    from diffusers.models.autoencoders.autoencoder_kl_qwenimage import QwenImageCausalConv3d

    ref, vae, _ = pairs["AutoencoderKLQwenImage"]
    # The Qwen-Image VAE sizes its feature cache by counting QwenImageCausalConv3d instances.
    count = sum(isinstance(m, QwenImageCausalConv3d) for m in vae.modules())
    assert count == sum(isinstance(m, QwenImageCausalConv3d) for m in ref.modules())
    conv = vae.decoder.mid_block.resnets[0].conv1
    assert isinstance(conv, QwenImageCausalConv3d) and isinstance(conv, FP8StorageLayer)
    assert type(conv).__name__ == "FP8StorageQwenImageCausalConv3d"
    r = copy.deepcopy(ref.decoder.mid_block.resnets[0].conv1)
    g = torch.Generator().manual_seed(3)
    x, cache = (torch.randn(1, 64, 2, 6, 6, generator=g).to(DT) for _ in range(2))
    with torch.no_grad():
        r.weight.copy_(conv.weight)
        assert torch.equal(conv(x, cache[:, :, -2:]), r(x, cache[:, :, -2:]))  # causal padding + cache path


def test_plain_classes_are_named_qdit_classes():
    lin, conv = nn.Linear(64, 64), nn.Conv2d(16, 16, 3)
    apply_fp8_weight_storage(lin, min_numel=0)
    apply_fp8_weight_storage(conv, min_numel=0)
    assert type(lin) is FP8StorageLinear and type(conv) is FP8StorageConv2d


def test_tied_weight_is_left_alone(caplog):
    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(256, 64)
            self.lm_head = nn.Linear(64, 256, bias=False)
            self.lm_head.weight = self.embed.weight

    lm = LM()
    with caplog.at_level(logging.WARNING, logger="qdit.pipelines"):
        assert apply_fp8_weight_storage(lm) == 0
    assert "tied" in caplog.text and lm.lm_head.weight is lm.embed.weight


def test_compute_dtype(pairs):
    lin = nn.Linear(64, 64)  # float32
    apply_fp8_weight_storage(lin, compute_dtype=DT, min_numel=0)
    assert lin.bias.dtype == DT and lin.weight.dtype == DT and lin(torch.randn(2, 64, dtype=DT)).dtype == DT
    with pytest.raises(ValueError):
        apply_fp8_weight_storage(nn.Linear(64, 64), compute_dtype=torch.float8_e4m3fn)


def test_none_compute_dtype_keeps_per_layer_dtypes():
    """T5 keeps `wo` in float32 (`_keep_in_fp32_modules`) and casts its input to `wo.weight.dtype`."""
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=64, d_model=64, d_kv=16, d_ff=128, num_layers=1, num_heads=4)
    t5 = transformers.T5EncoderModel(cfg).to(DT).eval()
    for m in t5.modules():
        if hasattr(m, "wo"):
            m.wo.float()
    ref = copy.deepcopy(t5)
    assert apply_fp8_weight_storage(t5) > 0
    wo = t5.encoder.block[0].layer[1].DenseReluDense.wo
    assert isinstance(wo, FP8StorageLayer) and wo.weight.dtype == torch.float32
    assert t5.dtype == DT
    ids = torch.arange(10)[None]
    with torch.no_grad():
        h, h_ref = t5(ids).last_hidden_state, ref(ids).last_hidden_state
    assert torch.nn.functional.cosine_similarity(h.float(), h_ref.float(), dim=-1).min() > COSINE_MIN
