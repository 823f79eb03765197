"""Nunchaku SVDQuant W4A4 checkpoints -> qdit's canonical SVDQuant layout.

Nunchaku stores each SVDQuant linear in the register order its own MMA kernels load (128-row tiles,
lane-interleaved scales, 16x16 low-rank tiles). Every index map undone here is a pure permutation of
elements, so the conversion is exact: no value is recomputed or rounded. The layouts are described in
../shared/specs/nunchaku-svdquant.md (section 3) and the canonical result in docs/nunchaku.md.

Canonical tensors of one SVDQuant linear `<prefix>` (N outputs, K inputs, group G, rank r):

    qweight        uint8 [N, K/2]  row-major codes, low nibble = even k (int4 two's complement / E2M1)
    wscales        [N, K/G]        group scales, float8_e4m3fn (nvfp4) or the model dtype (int4)
    wtscale        float32 []      nvfp4 per-tensor scale (single layers)
    wcscales       [N]             nvfp4 per-row scale (fused layers)
    bias           [N]             as stored (an int4 GELU-shift layer's bias keeps its compensation)
    smooth_factor  [K]             the divisor applied to the input
    proj_down      [K, r]          low-rank down projection (applied to the unsmoothed input)
    proj_up        [N, r]          low-rank up projection

All 1-D vectors are in logical channel order. `smooth_factor_orig` (never read at run time) is dropped.
AWQ W4A16 modulation linears become: qweight uint8 [N, K/2] (unsigned codes), wscales and wzeros
[N, K/64] (w = code * wscales + wzeros), bias float32 [N]; rows in diffusers order, without the +1
Nunchaku adds to the AdaLN scale chunks.
Dimensions stay padded as stored (N, K multiples of 128, r of 16); cropping to a model's logical
sizes needs the base config and is left to the caller.
"""

from __future__ import annotations

import torch

from qdit.errors import CheckpointError

PRECISIONS = {"int4": 64, "nvfp4": 16}  # precision -> the only group size Nunchaku uses with it

# Nunchaku v0 (FLUX) tensor names -> v1 names, which the canonical layout keeps.
_TENSOR_RENAMES = {"smooth": "smooth_factor", "smooth_orig": "smooth_factor_orig",
                   "lora_down": "proj_down", "lora_up": "proj_up"}
_DROPPED = {"smooth_factor_orig"}
# Suffixes only an SVDQuant W4A4 linear has (an AWQ W4A16 linear has qweight/wscales too, plus wzeros).
_SVDQ_ONLY = {"smooth_factor", "smooth_factor_orig", "proj_down", "proj_up", "wtscale", "wcscales"}
_LINEAR_SUFFIXES = {"qweight", "wscales", "wzeros", "bias", *_SVDQ_ONLY}

# FLUX module names, Nunchaku v0 and v2 -> diffusers (fused qkv keeps Nunchaku v2's fused name).
_FLUX_DOUBLE = {
    "qkv_proj": "attn.to_qkv", "qkv_proj_context": "attn.add_qkv_proj",
    "out_proj": "attn.to_out.0", "out_proj_context": "attn.to_add_out",
    "mlp_fc1": "ff.net.0.proj", "mlp_fc2": "ff.net.2",
    "mlp_context_fc1": "ff_context.net.0.proj", "mlp_context_fc2": "ff_context.net.2",
    "norm_q": "attn.norm_q", "norm_k": "attn.norm_k",
    "norm_added_q": "attn.norm_added_q", "norm_added_k": "attn.norm_added_k",
}
# A FLUX single block's diffusers `proj_out` (K = attention dim + MLP dim) is two SVDQuant linears
# whose outputs are summed; they get DeepCompressor's names for the two halves of proj_out along K.
_FLUX_SINGLE = {
    "qkv_proj": "attn.to_qkv", "out_proj": "proj_out.linears.0", "attn.to_out": "proj_out.linears.0",
    "mlp_fc1": "proj_mlp", "mlp_fc2": "proj_out.linears.1",
    "norm_q": "attn.norm_q", "norm_k": "attn.norm_k",
}


# ---------------------------------------------------------------------------------------------
# Inverse index maps (spec section 3). Each views the stored elements with the tile structure as
# axes and permutes them into row-major logical order.
# ---------------------------------------------------------------------------------------------

def unpack_qweight(packed: torch.Tensor) -> torch.Tensor:
    """Stored int8 [N, K/2] (MMA tiles) -> uint8 [N, K/2], byte (n, j) = codes k=2j (low), 2j+1 (high).

    A stored uint32 word holds 8 consecutive k of one row, nibble e at bits 4e; little-endian, its
    byte b holds k-offsets 2b (low nibble) and 2b+1 (high). Canonical bytes pair the same two codes
    the same way, so only whole bytes move.
    """
    n, half_k = packed.shape
    b = packed.contiguous().view(torch.uint8)
    # axes: n-tile, k-tile(64), n16-pack, n-lane(8), k-lane(4), n-half(2), k-half(2), byte-in-word(4)
    b = b.reshape(n // 128, half_k // 32, 8, 8, 4, 2, 2, 4)
    return b.permute(0, 2, 5, 3, 1, 6, 4, 7).reshape(n, half_k)


def unpack_wscales(packed: torch.Tensor, n: int, precision: str) -> torch.Tensor:
    """Stored group scales (nominal shape [K/G, N]) -> [N, K/G]."""
    groups = packed.numel() // n
    if precision == "int4":
        # [n-tile][group][a(8) c(4) b(2) d(2)] with row i = 16a + 8b + 2c + d inside the tile
        s = packed.reshape(n // 128, groups, 8, 4, 2, 2)
        return s.permute(0, 2, 4, 3, 5, 1).reshape(n, groups)
    # nvfp4: bytes [n-tile][k64-block][e(8) c(4) sp(4)][q(4)], row i = 32sp + 8c + e, group = 4*block + q
    s = packed.view(torch.uint8).reshape(n // 128, groups // 4, 8, 4, 4, 4)
    return s.permute(0, 4, 3, 2, 1, 5).reshape(n, groups).view(torch.float8_e4m3fn)


def unpack_vector(packed: torch.Tensor) -> torch.Tensor:
    """Stored 1-D vector (bias, smooth, wcscales) -> logical order; permuted inside each 128 block."""
    (length,) = packed.shape
    return packed.reshape(length // 128, 8, 4, 2, 2).permute(0, 1, 3, 2, 4).reshape(length)


def unpack_proj_up(packed: torch.Tensor) -> torch.Tensor:
    """Stored [N, r] in 16x16 MMA tiles -> row-major [N, r]."""
    n, r = packed.shape
    # axes: n16-tile, r16-tile, n-lane(8), r-lane(4), n-half(2), r-half(2), r-pair(2)
    t = packed.reshape(n // 16, r // 16, 8, 4, 2, 2, 2)
    return t.permute(0, 4, 2, 1, 5, 3, 6).reshape(n, r)


def unpack_proj_down(packed: torch.Tensor) -> torch.Tensor:
    """Stored [K, r] in 16x16 MMA tiles (rank in the MMA's n role) -> row-major [K, r]."""
    k, r = packed.shape
    # axes: k16-tile, r16-tile, r-lane(8), k-lane(4), r-half(2), k-half(2), k-pair(2)
    t = packed.reshape(k // 16, r // 16, 8, 4, 2, 2, 2)
    return t.permute(0, 5, 3, 6, 1, 4, 2).reshape(k, r)


def unpack_awq_qweight(packed: torch.Tensor) -> torch.Tensor:
    """AWQ W4A16 int32 [N/4, K/2] (TinyChat order) -> uint8 [N, K/2] unsigned codes, low nibble = even k.

    Each little-endian int16 word holds k = 64c + 32h + 8m + t (m = 0..3 at bits 4m) for one row
    n = 4R + ri, words ordered [R][c][ri][h t]; so byte b of a word holds m = 2b (low), 2b + 1 (high).
    """
    rows4, half_k = packed.shape
    n, k = rows4 * 4, half_k * 2
    b = packed.contiguous().view(torch.uint8).reshape(rows4, k // 64, 4, 2, 8, 2)  # R, c, ri, h, t, byte
    codes = torch.stack([b & 0xF, b >> 4], dim=-1)  # ..., byte, nibble: m = 2*byte + nibble
    codes = codes.permute(0, 2, 1, 3, 5, 6, 4).reshape(n, k)  # R, ri, c, h, m, t
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def _deinterleave_rows(t: torch.Tensor, chunks: int) -> torch.Tensor:
    """AdaLN rows stored as row d*S + s = original row s*(N/S) + d (dim 0) -> original order."""
    n = t.shape[0]
    return t.reshape(n // chunks, chunks, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def _awq_chunks(module: str) -> int:
    """How many AdaLN chunks (shift/scale/gate pairs) an AWQ modulation linear's output holds."""
    if module.startswith("single_transformer_blocks.") and module.endswith(".norm.linear"):
        return 3  # FLUX single block: shift, scale, gate
    if module.endswith((".norm1.linear", ".norm1_context.linear", ".img_mod.1", ".txt_mod.1")):
        return 6  # FLUX double block / Qwen-Image: two shift/scale/gate triples
    raise CheckpointError("an AWQ W4A16 layer qdit does not know", layer=module,
                          expected="FLUX norm1.linear / norm1_context.linear / single norm.linear, "
                                   "Qwen-Image img_mod.1 / txt_mod.1", hint="this layer's AdaLN chunking is unknown")


def _convert_awq(prefix: str, tensors: dict[str, tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One AWQ W4A16 modulation linear -> canonical: rows in diffusers order, codes uint8 [N, K/2],
    wscales / wzeros [N, K/64] (w = code * wscales + wzeros), bias without Nunchaku's +1 on the
    scale chunks (float32, so that subtracting the 1 is exact)."""
    missing = sorted({"qweight", "wscales", "wzeros"} - tensors.keys())
    if missing:
        _fail("an AWQ W4A16 layer is missing tensors", layer=prefix, expected="qweight, wscales, wzeros",
              found=", ".join(sorted(tensors)))
    unknown = sorted(set(tensors) - {"qweight", "wscales", "wzeros", "bias"})
    if unknown:
        _fail("an AWQ W4A16 layer has tensors qdit does not know", layer=prefix, tensor=tensors[unknown[0]][0],
              expected="qweight, wscales, wzeros, bias", found=", ".join(unknown))
    key, q = tensors["qweight"]
    if q.dtype != torch.int32 or q.ndim != 2:
        _fail("an AWQ qweight is not a 2-D int32 tensor", tensor=key, layer=prefix, expected="int32 [N/4, K/2]",
              found=f"{q.dtype} {list(q.shape)}")
    n, k = q.shape[0] * 4, q.shape[1] * 2
    chunks = _awq_chunks(prefix)
    _check_multiple(key, prefix, "K", k, 64, "AWQ packs K in blocks of 64")
    _check_multiple(key, prefix, "N", n, chunks * 4,
                    f"the AdaLN output splits into {chunks} chunks of whole 4-row packs")
    out = {"qweight": _deinterleave_rows(unpack_awq_qweight(q), chunks)}
    for name in ("wscales", "wzeros"):
        key, t = tensors[name]
        if t.ndim != 2 or t.shape[1] != n or t.shape[0] < k // 64:
            _fail(f"AWQ {name} has the wrong shape", tensor=key, layer=prefix,
                  expected=f"[>= {k // 64}, {n}]", found=str(list(t.shape)))
        # stored [groups padded to 16, N] plain row-major; the padding rows are dropped
        out[name] = _deinterleave_rows(t[: k // 64].t().contiguous(), chunks)
    if "bias" in tensors:
        key, t = tensors["bias"]
        if t.shape != (n,):
            _fail("AWQ bias has the wrong shape", tensor=key, layer=prefix, expected=f"[{n}]", found=str(list(t.shape)))
        bias = _deinterleave_rows(t.float(), chunks).reshape(chunks, n // chunks)
        # Nunchaku folds the 1 of diffusers' x * (1 + scale) into the bias of the scale chunks: 1 and
        # S-2 (one chunk, 1, when S = 3)
        for chunk in {1, chunks - 2}:
            bias[chunk] -= 1
        out["bias"] = bias.reshape(n)
    return out


# ---------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------

# Z-Image: Nunchaku stores diffusers' FeedForward (w1 gate, w2 down, w3 up) as net.0.proj = rows
# [w3; w1] and net.2 = w2. The fused linear is named after its row order, like to_qkv.
_Z_IMAGE_BLOCKS = ("layers.", "noise_refiner.", "context_refiner.")
_Z_IMAGE_FF = {"feed_forward.net.0.proj": "feed_forward.w3_w1", "feed_forward.net.2": "feed_forward.w2"}


def diffusers_module_name(module: str) -> str:
    """A Nunchaku module path (v0 or v1/v2) -> its diffusers name (fused linears keep a fused name)."""
    if module.startswith(_Z_IMAGE_BLOCKS):
        head, _, local = module.partition(".")
        index, _, local = local.partition(".")
        return f"{head}.{index}.{_Z_IMAGE_FF.get(local, local)}"
    for blocks, table in (("single_transformer_blocks.", _FLUX_SINGLE), ("transformer_blocks.", _FLUX_DOUBLE)):
        if module.startswith(blocks):
            parts = module.split(".")
            if len(parts) > 2:
                head, local = ".".join(parts[:2]), ".".join(parts[2:])
                for old, new in table.items():
                    if local == old or local.startswith(old + "."):
                        return f"{head}.{new}{local[len(old):]}"
            return module
    return module


def _split(key: str) -> tuple[str, str]:
    module, _, suffix = key.rpartition(".")
    return module, _TENSOR_RENAMES.get(suffix, suffix)


# ---------------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------------

def _fail(problem: str, *, tensor: str | None = None, layer: str | None = None, expected: str | None = None,
          found: str | None = None, hint: str | None = None):
    raise CheckpointError(problem, tensor=tensor, layer=layer, expected=expected, found=found, hint=hint)


def _check_multiple(name: str, layer: str, what: str, value: int, divisor: int, hint: str) -> None:
    if value % divisor:
        _fail(f"{what} is not a multiple of {divisor}", tensor=name, layer=layer,
              expected=f"a multiple of {divisor}", found=str(value), hint=hint)


_PAD_HINT = "Nunchaku pads N and K to multiples of 128; this is not an unmodified Nunchaku tensor"


def _convert_linear(prefix: str, tensors: dict[str, tuple[str, torch.Tensor]], precision: str,
                    group_size: int) -> dict[str, torch.Tensor]:
    """One SVDQuant linear: {canonical suffix: (original key, stored tensor)} -> {suffix: canonical tensor}."""
    out: dict[str, torch.Tensor] = {}
    n = k = None  # learnt from whichever tensors are present, then checked across them

    def agree(dim: str, value: int, key: str):
        nonlocal n, k
        known = n if dim == "N" else k
        if known is not None and known != value:
            _fail(f"the layer's tensors disagree on {dim}", tensor=key, layer=prefix,
                  expected=f"{dim} = {known}", found=f"{dim} = {value}")
        if dim == "N":
            n = value
        else:
            k = value
        _check_multiple(key, prefix, dim, value, 128, _PAD_HINT)

    if "qweight" in tensors:
        key, t = tensors["qweight"]
        if t.dtype not in (torch.int8, torch.uint8) or t.ndim != 2:
            _fail("an SVDQuant qweight is not a 2-D int8 tensor", tensor=key, layer=prefix,
                  expected="int8 [N, K/2]", found=f"{t.dtype} {list(t.shape)}")
        agree("N", t.shape[0], key)
        agree("K", t.shape[1] * 2, key)
        out["qweight"] = unpack_qweight(t)
    if "wscales" in tensors:
        key, t = tensors["wscales"]
        is_fp8 = t.dtype == torch.float8_e4m3fn
        if is_fp8 != (precision == "nvfp4"):
            _fail("wscales dtype does not match the precision", tensor=key, layer=prefix,
                  expected="float8_e4m3fn (nvfp4)" if precision == "nvfp4" else "a 16-bit float (int4)",
                  found=str(t.dtype), hint="the checkpoint's quantization_config and its tensors disagree")
        if t.ndim != 2:
            _fail("wscales is not 2-D", tensor=key, layer=prefix, expected=f"[K/{group_size}, N]",
                  found=str(list(t.shape)))
        agree("N", t.shape[1], key)
        agree("K", t.shape[0] * group_size, key)
        out["wscales"] = unpack_wscales(t, t.shape[1], precision)
    for name in ("bias", "smooth_factor", "wcscales"):
        if name in tensors:
            key, t = tensors[name]
            if t.ndim != 1:
                _fail(f"{name} is not a 1-D vector", tensor=key, layer=prefix, found=str(list(t.shape)))
            agree("K" if name == "smooth_factor" else "N", t.shape[0], key)
            out[name] = unpack_vector(t)
    for name, dim, unpack in (("proj_down", "K", unpack_proj_down), ("proj_up", "N", unpack_proj_up)):
        if name in tensors:
            key, t = tensors[name]
            if t.ndim != 2:
                _fail(f"{name} is not 2-D", tensor=key, layer=prefix, expected=f"[{dim}, r]",
                      found=str(list(t.shape)))
            _check_multiple(key, prefix, "the low-rank rank", t.shape[1], 16,
                            "Nunchaku pads the rank to a multiple of 16; this is not an unmodified Nunchaku tensor")
            agree(dim, t.shape[0], key)
            out[name] = unpack(t)
    if "proj_down" in out and "proj_up" in out and out["proj_down"].shape[1] != out["proj_up"].shape[1]:
        _fail("proj_down and proj_up have different ranks", layer=prefix,
              expected="the same r", found=f"{out['proj_down'].shape[1]} and {out['proj_up'].shape[1]}")
    if "wtscale" in tensors:
        key, t = tensors["wtscale"]
        if t.numel() != 1:
            _fail("wtscale is not a scalar", tensor=key, layer=prefix, found=str(list(t.shape)))
        out["wtscale"] = t.reshape(()).float()  # widening a half/bf16 value to float32 is exact
    return out


def convert_nunchaku_tensors(state_dict: dict[str, torch.Tensor], *, precision: str,
                             group_size: int) -> dict[str, torch.Tensor]:
    """Convert (any subset of) a Nunchaku SVDQuant W4A4 state dict to qdit's canonical layout.

    Keys may use Nunchaku's v0 names (FLUX: `qkv_proj`, `smooth`, `lora_down`, ...) or v1/v2 names;
    the result uses diffusers module names and v1 tensor names. A module is an SVDQuant linear when it
    has any SVDQuant-only tensor (smooth, low-rank, wtscale, wcscales) or a qweight/wscales without
    wzeros; its tensors are un-permuted. Other tensors (BF16 modules) are copied under their new name.
    AWQ W4A16 modulation linears (those with `wzeros`) are converted too: see `_convert_awq`.
    """
    if precision not in PRECISIONS:
        raise CheckpointError("unknown Nunchaku precision", expected=" or ".join(PRECISIONS), found=repr(precision),
                              hint="Nunchaku SVDQuant checkpoints are int4 (group 64) or nvfp4 (group 16)")
    if group_size != PRECISIONS[precision]:
        raise CheckpointError(f"group size {group_size} is not the one Nunchaku uses with {precision}",
                              expected=str(PRECISIONS[precision]), found=str(group_size))
    # Group the tensors by module; keep the original key for error messages.
    modules: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, tensor in state_dict.items():
        module, suffix = _split(key)
        modules.setdefault(module, {})[suffix] = (key, tensor)
    out: dict[str, torch.Tensor] = {}
    for module, tensors in modules.items():
        new = diffusers_module_name(module)
        if "wzeros" in tensors:  # AWQ W4A16 modulation linear
            for suffix, tensor in _convert_awq(module, tensors).items():
                out[f"{new}.{suffix}"] = tensor
            continue
        svdq = bool(_SVDQ_ONLY & tensors.keys()) or "qweight" in tensors or "wscales" in tensors
        if svdq:
            unknown = sorted(set(tensors) - _LINEAR_SUFFIXES)
            if unknown:
                _fail("an SVDQuant linear has tensors qdit does not know", layer=module,
                      tensor=tensors[unknown[0]][0], expected=", ".join(sorted(_LINEAR_SUFFIXES)),
                      found=", ".join(unknown))
            for suffix, tensor in _convert_linear(module, tensors, precision, group_size).items():
                out[f"{new}.{suffix}"] = tensor
            continue
        for suffix, (_, tensor) in tensors.items():
            if suffix in _DROPPED:
                continue
            if new.endswith(".feed_forward.w3_w1"):  # a BF16 Z-Image refiner: split into diffusers' w3 and w1
                base = new[: -len("w3_w1")]
                up, gate = tensor.chunk(2, dim=0)
                out[f"{base}w3.{suffix}"], out[f"{base}w1.{suffix}"] = up.contiguous(), gate.contiguous()
            else:
                out[f"{new}.{suffix}" if new else suffix] = tensor
    return out


__all__ = ["PRECISIONS", "convert_nunchaku_tensors", "diffusers_module_name", "unpack_awq_qweight",
           "unpack_proj_down", "unpack_proj_up", "unpack_qweight", "unpack_vector", "unpack_wscales"]
