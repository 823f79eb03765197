"""FP8 attention: cuDNN's FP8 flash-attention forward, through cudnn-frontend's Python graph API.

Numerics (the reference below computes exactly these steps in PyTorch):
  q, k, v: E4M3 codes with one float32 scale per tensor (v: s = amax(|x|) / 448; q and k from qdit's
      processors: the bound of qdit.kernels.qk_norm_rope, written with the codes);
  scores = (q k^T) / sqrt(D), softmax in float32;
  probabilities P (each <= 1 after the running-max subtraction) multiplied by 448, rounded to E4M3;
  O = (P v) / rowsum, rounded to E4M3 with the scale of v (O is a convex combination of v's rows, so
      |O| <= amax(|v|) and that scale cannot overflow); qdit hands back O in the model's dtype.
On Hopper, cuDNN writes O only in FP8 (BF16 output needs Blackwell), hence the last rounding.

Measured on an H200 (Qwen-Image's joint attention: 24 heads, 4352 tokens, D=128): 270 us against 377 us
for cuDNN's BF16 kernel; relative error of O against float32 attention 0.06 on random N(0,1) inputs,
of which 0.047 comes from rounding q, k and v alone (benchmarks/results/h200-2026-12-03e).
"""

from __future__ import annotations

import logging
import math

import torch

from qdit.errors import QditError
from qdit.kernels.registry import YES, Verdict
from qdit.quant.numerics import E4M3_MAX, fp8_quantize_static, to_e4m3

try:  # optional: pip install "qdit[cudnn]"
    import cudnn
except ImportError:
    cudnn = None

log = logging.getLogger("qdit")


def fp8_attention_verdict(device: torch.device) -> Verdict:
    """Whether cuDNN's FP8 attention can run on `device` (reasons name what is missing)."""
    if device.type != "cuda":
        return Verdict(False, f"needs a CUDA device, the model is on {device.type}")
    cap = torch.cuda.get_device_capability(device)
    if cap < (9, 0):
        return Verdict(False, f"cuDNN's FP8 attention needs compute capability >= 9.0 (Hopper), this GPU has "
                              f"{cap[0]}.{cap[1]}")
    if cudnn is None:
        return Verdict(False, "cudnn-frontend is not installed (pip install 'qdit[cudnn]', package "
                              "nvidia-cudnn-frontend)")
    return YES


def quantize_per_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """E4M3 codes of x and its float32 scale [1, 1, 1, 1] (amax / 448). Plain tensor ops: under
    torch.compile inductor fuses them with the kernels around them."""
    amax = x.abs().amax().float()
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax)).reshape(1, 1, 1, 1)
    return fp8_quantize_static(x, scale), scale


def fp8_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale_q: torch.Tensor,
                            scale_k: torch.Tensor, scale_v: torch.Tensor,
                            scale_o: torch.Tensor | None = None) -> torch.Tensor:
    """The kernel's math in PyTorch: E4M3 codes [B, S, H, D] and their scales -> O's E4M3 codes
    [B, S_q, H, D] (scaled by scale_v): O times scale_o (1 / scale_v unless given), rounded."""
    qf, kf, vf = (c.float() * s for c, s in ((q, scale_q), (k, scale_k), (v, scale_v)))
    scores = torch.einsum("bqhd,bkhd->bhqk", qf, kf) / math.sqrt(q.shape[-1])
    p = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
    row_sum = p.sum(dim=-1, keepdim=True)
    p = to_e4m3(p * E4M3_MAX).float() / E4M3_MAX
    out = torch.einsum("bhqk,bkhd->bqhd", p / row_sum, vf)
    scale_o = 1.0 / scale_v if scale_o is None else scale_o
    # contiguous, as the op's fake implementation (and cuDNN's output) is
    return to_e4m3(out * scale_o).contiguous()


class _CudnnGraph:
    """One built cuDNN FP8 SDPA graph for one shape on one device."""

    def __init__(self, batch: int, seq_q: int, seq_kv: int, heads: int, dim: int, device: torch.device):
        e4m3, f32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
        self.handle = cudnn.create_handle()
        g = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=f32, compute_data_type=f32, handle=self.handle)

        def bhsd(seq: int):  # [B, S, H, D] memory seen as (b, h, s, d), cuDNN's dimension order
            return dict(dim=(batch, heads, seq, dim), stride=(seq * heads * dim, dim, heads * dim, 1))

        self.q, self.k, self.v = (g.tensor(name=n, data_type=e4m3, **bhsd(s))
                                  for n, s in (("q", seq_q), ("k", seq_kv), ("v", seq_kv)))
        scalar = dict(dim=(1, 1, 1, 1), stride=(1, 1, 1, 1), data_type=f32)
        self.scales = [g.tensor(name=n, **scalar) for n in ("descale_q", "descale_k", "descale_v", "descale_s",
                                                          "scale_s", "scale_o")]
        o, _, self.amax_s, self.amax_o = g.sdpa_fp8(
            q=self.q, k=self.k, v=self.v, descale_q=self.scales[0], descale_k=self.scales[1],
            descale_v=self.scales[2], descale_s=self.scales[3], scale_s=self.scales[4], scale_o=self.scales[5],
            is_inference=True, attn_scale=1.0 / math.sqrt(dim), use_causal_mask=False, name="qdit_fp8_sdpa")
        o.set_output(True).set_data_type(e4m3).set_dim(bhsd(seq_q)["dim"]).set_stride(bhsd(seq_q)["stride"])
        for amax in (self.amax_s, self.amax_o):
            amax.set_output(True).set_data_type(f32).set_dim((1, 1, 1, 1)).set_stride((1, 1, 1, 1))
        self.o = o
        g.validate()
        g.build_operation_graph()
        g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        g.check_support()
        g.build_plans()
        self.graph = g
        self.workspace_bytes = g.get_workspace_size()
        # P's scale: probabilities are <= 1, so 448 uses E4M3's whole range.
        self.p_scale = torch.full((1, 1, 1, 1), E4M3_MAX, dtype=torch.float32, device=device)
        self.p_descale = torch.full((1, 1, 1, 1), 1.0 / E4M3_MAX, dtype=torch.float32, device=device)

    def run(self, q, k, v, scale_q, scale_k, scale_v, scale_o) -> torch.Tensor:
        out = torch.empty(q.shape, dtype=torch.float8_e4m3fn, device=q.device)
        amax = torch.empty(2, 1, 1, 1, dtype=torch.float32, device=q.device)
        workspace = torch.empty(self.workspace_bytes, dtype=torch.uint8, device=q.device)
        pack = {self.q: q, self.k: k, self.v: v, self.scales[0]: scale_q, self.scales[1]: scale_k,
                self.scales[2]: scale_v, self.scales[3]: self.p_descale, self.scales[4]: self.p_scale,
                self.scales[5]: scale_o, self.o: out, self.amax_s: amax[0:1], self.amax_o: amax[1:2]}
        cudnn.set_stream(handle=self.handle, stream=torch.cuda.current_stream(q.device).cuda_stream)
        self.graph.execute(pack, workspace, handle=self.handle)
        return out


_GRAPHS: dict[tuple, _CudnnGraph] = {}


def cudnn_fp8_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale_q: torch.Tensor,
                   scale_k: torch.Tensor, scale_v: torch.Tensor, scale_o: torch.Tensor) -> torch.Tensor:
    """fp8_sdpa on cuDNN; a clear error where cuDNN's FP8 attention cannot run or has no kernel for
    the shape (checked when a shape's graph is built, not on every call)."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()  # the graph's strides are [B, S, H, D]'s
    batch, seq_q, heads, dim = q.shape
    key = (batch, seq_q, k.shape[1], heads, dim, q.device.index)
    graph = _GRAPHS.get(key)
    if graph is None:
        verdict = fp8_attention_verdict(q.device)
        if not verdict.ok:
            raise QditError(f"qdit::fp8_sdpa cannot run on {q.device}: {verdict.reason}")
        try:
            graph = _CudnnGraph(batch, seq_q, k.shape[1], heads, dim, q.device)
        except Exception as e:  # cuDNN's own error types; re-raised with the shape and what to do
            raise QditError(f"cuDNN has no FP8 attention for q {tuple(q.shape)}, k/v {tuple(k.shape)} "
                            f"([B, S, H, D]) on this GPU: {e}. Use attention='bf16'.") from e
        _GRAPHS[key] = graph
    return graph.run(q, k, v, scale_q, scale_k, scale_v, scale_o)


@torch.library.custom_op("qdit::fp8_sdpa", mutates_args=())
def fp8_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale_q: torch.Tensor, scale_k: torch.Tensor,
             scale_v: torch.Tensor, scale_o: torch.Tensor | None = None) -> torch.Tensor:
    """E4M3 q [B, S_q, H, D], k and v [B, S_kv, H, D] with float32 scales [1, 1, 1, 1] -> O's E4M3 codes
    [B, S_q, H, D], scaled by scale_v. scale_o, O's quantization factor, is 1 / scale_v: a caller under
    torch.compile passes it, computed where scale_v is (eager, `1 / scale_v` is two ATen kernels per call).
    cuDNN on CUDA, the PyTorch reference elsewhere."""
    scale_o = 1.0 / scale_v if scale_o is None else scale_o
    if q.device.type != "cuda":
        return fp8_attention_reference(q, k, v, scale_q, scale_k, scale_v, scale_o)
    return cudnn_fp8_sdpa(q, k, v, scale_q, scale_k, scale_v, scale_o)


@fp8_sdpa.register_fake
def _(q, k, v, scale_q, scale_k, scale_v, scale_o=None):
    return torch.empty(q.shape, dtype=torch.float8_e4m3fn, device=q.device)


def fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention of q, k, v [B, S, H, D] (no mask) in FP8, returned as [B, S_q, H, D] in v's dtype."""
    (q8, scale_q), (k8, scale_k) = (quantize_per_tensor(t.contiguous()) for t in (q, k))
    return fp8_attention_of_codes(q8, scale_q, k8, scale_k, v)


def fp8_attention_of_codes(q8: torch.Tensor, scale_q: torch.Tensor, k8: torch.Tensor, scale_k: torch.Tensor,
                           v: torch.Tensor) -> torch.Tensor:
    """fp8_attention with q and k already E4M3 (as qdit::qk_norm_rope_cat_fp8 writes them); v in the
    model's dtype, which the result [B, S_q, H, D] takes."""
    out, scale_v = fp8_attention_codes(q8, scale_q, k8, scale_k, v)
    return (out.float() * scale_v).to(v.dtype)


def fp8_attention_codes(q8: torch.Tensor, scale_q: torch.Tensor, k8: torch.Tensor, scale_k: torch.Tensor,
                        v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8_attention_of_codes before its dequantization: O's E4M3 codes [B, S_q, H, D] and their scale
    (v's, [1, 1, 1, 1]), for a consumer that multiplies FP8 codes (qdit.quant.fp8_input)."""
    v8, scale_v = quantize_per_tensor(v.contiguous())
    return fp8_sdpa(q8, k8, v8, scale_q, scale_k, scale_v, 1.0 / scale_v), scale_v


def check_fp8_attention(device: torch.device, where: str) -> None:
    """Refuse FP8 attention on a GPU that cannot run it; off CUDA the reference runs (said once)."""
    verdict = fp8_attention_verdict(device)
    if verdict.ok:
        return
    if device.type == "cuda":
        raise QditError(f"{where}: attention='fp8' cannot run here: {verdict.reason}. Use attention='bf16', "
                        f"or a Hopper/Blackwell GPU with nvidia-cudnn-frontend installed.")
    log.warning("%s: FP8 attention runs qdit's PyTorch reference of cuDNN's kernel (%s)", where, verdict.reason)
