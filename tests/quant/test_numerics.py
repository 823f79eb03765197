"""Bit-level numerics against NVIDIA ModelOpt's own implementation (the producer)."""

import pytest
import torch

from qdit.quant import numerics
from qdit.quant.methods import low_rank_factors


def test_e2m1_rounding_matches_modelopt():
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

    # every code boundary and tie, both signs, plus random values and saturation
    edges = torch.tensor([0, 0.25, 0.5, 0.75, 1, 1.25, 1.5, 1.75, 2, 2.5, 3, 3.5, 4, 5, 6, 7, 100.0])
    x = torch.cat([edges, -edges, torch.randn(4096) * 3])
    ours = numerics.e2m1_encode(x)
    theirs = NVFP4QTensor._cast_fp4(x.clone())
    assert torch.equal(ours[x != 0], theirs[x != 0])  # ModelOpt gives -0 the sign bit; both decode to 0
    assert torch.equal(numerics.e2m1_decode(ours).abs(), numerics.e2m1_decode(theirs).abs())


def test_nvfp4_weight_quantization_matches_modelopt_bytes():
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

    w = (torch.randn(96, 256) * 0.05).to(torch.bfloat16)
    w[3, :16] = 0  # an all-zero block
    qtensor, block_scale, global_scale = NVFP4QTensor.quantize(w, 16)
    ours_scale2 = numerics.nvfp4_global_scale(w.abs().amax())
    codes, ours_block = numerics.nvfp4_quantize(w, ours_scale2)
    assert torch.equal(ours_scale2, global_scale.float())
    assert torch.equal(ours_block.view(torch.uint8), block_scale.view(torch.uint8))
    assert torch.equal(numerics.pack_nibbles(codes), qtensor._quantized_data)


def test_pack_unpack_round_trip_and_nibble_order():
    codes = torch.randint(0, 16, (7, 64), dtype=torch.uint8)
    packed = numerics.pack_nibbles(codes)
    assert torch.equal(packed[:, 0] & 0xF, codes[:, 0]) and torch.equal(packed[:, 0] >> 4, codes[:, 1])
    assert torch.equal(numerics.unpack_nibbles(packed), codes)


def test_nan_clamp():
    t = torch.tensor([1.0, 2.0, 448.0]).to(torch.float8_e4m3fn)
    raw = t.view(torch.uint8).clone()
    raw[0], raw[1] = 0x7F, 0xFF
    fixed, count = numerics.clamp_e4m3_nan(raw.view(torch.float8_e4m3fn))
    assert count == 2 and fixed.view(torch.uint8).tolist() == [0x7E, 0x7E, raw[2].item()]


@pytest.mark.parametrize("shape", [(384, 256), (64, 512)])
def test_low_rank_factors_near_the_best_rank_r(shape):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(*shape, generator=gen) + torch.randn(shape[0], 8, generator=gen) @ torch.randn(8, shape[1], generator=gen) * 3
    a, b = low_rank_factors(w, 32)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    best = ((w - (u[:, :32] * s[:32]) @ vh[:32]).norm() / w.norm()).item()
    ours = ((w - b @ a).norm() / w.norm()).item()
    assert a.shape == (32, shape[1]) and b.shape == (shape[0], 32)
    assert ours < best * 1.02
