"""qdit's attention processors compute what diffusers' do, with no complex-number op left for compile."""

import pytest
import torch
from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

from qdit.api import random_transformer
from qdit.errors import QditError
from qdit.models import adapter_by_name
from qdit.models.rotary import FluxAttention, QwenImageJointAttention, ZImageAttention, rotate_by_cos_sin


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_real_rotation_is_diffusers_complex_rotation_bit_for_bit(dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 40, 3, 32, generator=gen).to(dtype)
    freqs = torch.polar(torch.ones(40, 16), torch.randn(40, 16, generator=gen) * 3)
    expected = apply_rotary_emb_qwen(x, freqs, use_real=False)  # [S, D/2] freqs, broadcast over heads
    assert torch.equal(rotate_by_cos_sin(x, torch.view_as_real(freqs).unsqueeze(1)), expected)
    per_batch = torch.polar(torch.ones(2, 40, 16), torch.randn(2, 40, 16, generator=gen))  # Z-Image: [B, S, D/2]
    expected = torch.view_as_real(torch.view_as_complex(x.float().unflatten(-1, (-1, 2))) * per_batch.unsqueeze(2))
    assert torch.equal(rotate_by_cos_sin(x, torch.view_as_real(per_batch).unsqueeze(2)), expected.flatten(3).to(dtype))


def _outputs(model: str, diffusers_modules: bool, text_mask: bool = False):
    adapter = adapter_by_name(model)
    transformer = random_transformer(model, dtype=torch.float32, seed=3, diffusers_modules=diffusers_modules)
    inputs = adapter.example_inputs(dict(transformer.config), batch=2, height=64, width=48, text_tokens=8,
                                    dtype=torch.float32)
    if text_mask:
        mask = torch.ones(2, 8, dtype=torch.bool)
        mask[1, 5:] = False
        inputs["encoder_hidden_states_mask"] = mask
    with torch.no_grad():
        return transformer, adapter.output_tensor(transformer(**inputs))


def _processor_types(transformer) -> set[type]:
    return {type(m.processor) for m in transformer.modules() if hasattr(m, "set_processor")}


@pytest.mark.parametrize("model,processor,text_mask", [
    ("qwen-image", QwenImageJointAttention, False),
    ("qwen-image", QwenImageJointAttention, True),
    ("z-image", ZImageAttention, False),
    ("flux", FluxAttention, False),  # double- and single-stream blocks
])
def test_model_output_is_the_same_as_with_diffusers_processors(model, processor, text_mask):
    ours, out = _outputs(model, diffusers_modules=False, text_mask=text_mask)
    theirs, expected = _outputs(model, diffusers_modules=True, text_mask=text_mask)
    assert _processor_types(ours) == {processor}
    assert processor not in _processor_types(theirs)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def _complex_ops_in_compiled_block(model: str, diffusers_modules: bool) -> list[str]:
    """Call nodes of the graph dynamo hands to the compiler whose result is complex (inductor would
    leave each one to an ATen kernel)."""
    adapter = adapter_by_name(model)
    transformer = random_transformer(model, dtype=torch.float32, diffusers_modules=diffusers_modules)
    found: list[str] = []

    def capture(gm, example_inputs):
        for node in gm.graph.nodes:
            val = node.meta.get("example_value")
            if node.op.startswith("call") and isinstance(val, torch.Tensor) and val.is_complex():
                found.append(str(node.target))
        return gm.forward

    block = getattr(transformer, adapter.block_lists[0])[0]
    block.compile(backend=capture, fullgraph=True)
    inputs = adapter.example_inputs(dict(transformer.config), height=64, width=64, text_tokens=8, dtype=torch.float32)
    torch._dynamo.reset()
    with torch.no_grad():
        transformer(**inputs)
    torch._dynamo.reset()
    return found


@pytest.mark.parametrize("model", ["qwen-image", "z-image"])
def test_compiled_block_has_no_complex_ops(model):
    assert _complex_ops_in_compiled_block(model, diffusers_modules=True), "the check sees diffusers' complex multiply"
    assert _complex_ops_in_compiled_block(model, diffusers_modules=False) == []


@pytest.mark.parametrize("eps,scale", [(1e-6, 1.0), (None, 1e-3)])
def test_flux_processor_takes_the_fused_op_and_is_diffusers_bit_for_bit_in_bf16(monkeypatch, eps, scale):
    """FLUX's QK norms are torch.nn.RMSNorm, which rounds once (qdit.kernels.qk_norm_rope): with random
    norm weights, a double-stream and a single-stream block's attention equal diffusers'
    FluxAttnProcessor exactly, and q and k went through qdit::qk_norm_rope_cat. eps=None (torch's
    default) with small inputs, where the epsilon matters."""
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    import qdit.models.rotary as rotary

    calls = []
    fused = rotary.qk_norm_rope_cat
    monkeypatch.setattr(rotary, "qk_norm_rope_cat", lambda *a, **k: calls.append(k) or fused(*a, **k))
    transformer = random_transformer("flux", seed=3)
    attn, single = transformer.transformer_blocks[0].attn, transformer.single_transformer_blocks[0].attn
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for norm in (attn.norm_q, attn.norm_k, attn.norm_added_q, attn.norm_added_k, single.norm_q, single.norm_k):
            norm.weight.copy_(torch.rand(norm.weight.shape, generator=gen) * 2 + 0.25)
            norm.eps = eps
        dim = attn.query_dim
        img = (torch.randn(2, 24, dim, generator=gen) * scale).bfloat16()
        txt = (torch.randn(2, 8, dim, generator=gen) * scale).bfloat16()
        ids = torch.cat([torch.zeros(8, 3), torch.randint(0, 16, (24, 3)).float()])
        rotary_emb = transformer.pos_embed(ids)
        ours = FluxAttention()(attn, img, txt, image_rotary_emb=rotary_emb)
        theirs = FluxAttnProcessor()(attn, img, txt, image_rotary_emb=rotary_emb)
        joint = torch.cat([txt, img], dim=1)
        ours_single = FluxAttention()(single, joint, image_rotary_emb=rotary_emb)
        theirs_single = FluxAttnProcessor()(single, joint, image_rotary_emb=rotary_emb)
    assert [k["round_before_weight"] for k in calls] == [False] * 4
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])
    assert torch.equal(ours_single, theirs_single)


def test_flux_processor_runs_diffusers_fused_qkv_projections():
    """After diffusers' fuse_qkv_projections the processor takes q, k, v from the fused Linears."""
    adapter = adapter_by_name("flux")
    transformer = random_transformer("flux", dtype=torch.float32, seed=3)
    inputs = adapter.example_inputs(dict(transformer.config), batch=2, height=64, width=48, text_tokens=8,
                                    dtype=torch.float32)
    with torch.no_grad():
        separate = adapter.output_tensor(transformer(**inputs))
        transformer.fuse_qkv_projections()
        calls = []
        for block in transformer.transformer_blocks:
            for fused in (block.attn.to_qkv, block.attn.to_added_qkv):
                fused.register_forward_hook(lambda *_: calls.append(1))
        fused_out = adapter.output_tensor(transformer(**inputs))
    assert len(calls) == 2 * len(transformer.transformer_blocks)
    torch.testing.assert_close(fused_out, separate, rtol=1e-5, atol=1e-5)


def test_flux_processor_refuses_a_model_without_diffusers_flux_pos_embed():
    """The processor reads cos/sin as FluxPosEmbed lays them out; another position embedding is refused
    when the processor is installed, naming the module found."""
    adapter = adapter_by_name("flux")
    transformer = random_transformer("flux", dtype=torch.float32, diffusers_modules=True)

    class OtherPosEmbed(torch.nn.Module):
        pass

    transformer.pos_embed = OtherPosEmbed()
    with pytest.raises(QditError, match="FluxPosEmbed.*OtherPosEmbed"):
        adapter.install_compile_friendly_modules(transformer)


def test_flux_processor_refuses_rotary_embeddings_of_another_width():
    attn = random_transformer("flux", dtype=torch.float32).transformer_blocks[0].attn
    x = torch.randn(1, 4, attn.query_dim)
    half_width = torch.ones(4, attn.head_dim // 2)
    with pytest.raises(ValueError, match="cos/sin have 16 columns per position, the attention heads 32"):
        FluxAttention()(attn, x, image_rotary_emb=(half_width, half_width))
