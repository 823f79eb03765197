"""cuDNN's FP8 attention forward (cudnn-frontend graph API) against torch SDPA in BF16 (cuDNN and flash
backends), at Qwen-Image's joint attention shape (1 x 4352 tokens x 24 heads x 128): time per call,
TFLOP/s, relative error against float32 attention, the error of rounding q, k, v alone, and a CUDA-graph
replay. The probe that decided qdit.kernels.attention_fp8 (benchmarks/results/h200-2026-12-03e/run1).
Needs nvidia-cudnn-frontend. Run: python benchmarks/kernels/fp8_attention_cudnn.py
"""
import math, traceback, torch, torch.nn.functional as F
print("torch", torch.__version__, "cudnn", torch.backends.cudnn.version())
import cudnn
print("cudnn-frontend", cudnn.__version__, "backend", cudnn.backend_version())
dev = torch.device("cuda")
B, S, H, D = 1, 4352, 24, 128

def bench(fn, iters=50):
    for _ in range(5): fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(True), torch.cuda.Event(True)
    s.record()
    for _ in range(iters): fn()
    e.record(); torch.cuda.synchronize()
    return s.elapsed_time(e) / iters * 1e3

def q8(x):
    amax = x.abs().amax().float()
    d = amax / 448.0
    return (x.float() / d).to(torch.float8_e4m3fn), d.reshape(1, 1, 1, 1)

handle = cudnn.create_handle()
def build(shape_bhsd, strides):
    e4m3, f32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
    g = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=f32, compute_data_type=f32, handle=handle)
    tq, tk, tv = [g.tensor(name=n, dim=shape_bhsd, stride=strides, data_type=e4m3) for n in "qkv"]
    sc = dict(dim=(1, 1, 1, 1), stride=(1, 1, 1, 1), data_type=f32)
    ts = [g.tensor(name=n, **sc) for n in ("dq", "dk", "dv", "ds", "ss", "so")]
    o, _, amax_s, amax_o = g.sdpa_fp8(q=tq, k=tk, v=tv, descale_q=ts[0], descale_k=ts[1], descale_v=ts[2],
                                      descale_s=ts[3], scale_s=ts[4], scale_o=ts[5], is_inference=True,
                                      attn_scale=1.0 / math.sqrt(D), use_causal_mask=False, name="sdpa")
    o.set_output(True).set_dim(shape_bhsd).set_stride(strides).set_data_type(e4m3)
    for a in (amax_s, amax_o):
        a.set_output(True).set_dim((1, 1, 1, 1)).set_stride((1, 1, 1, 1)).set_data_type(f32)
    g.validate(); g.build_operation_graph(); g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    g.check_support(); g.build_plans()
    return g, tq, tk, tv, ts, o, amax_s, amax_o

for sharp in (1.0, 3.0):
    torch.manual_seed(0)
    q = (torch.randn(B, S, H, D, device=dev) * sharp).bfloat16()
    k = torch.randn(B, S, H, D, device=dev).bfloat16()
    v = torch.randn(B, S, H, D, device=dev).bfloat16()
    ref = F.scaled_dot_product_attention(q.float().transpose(1, 2), k.float().transpose(1, 2), v.float().transpose(1, 2)).transpose(1, 2)
    from torch.nn.attention import sdpa_kernel, SDPBackend
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    res = {}
    for name, be in (("cudnn_bf16", SDPBackend.CUDNN_ATTENTION), ("flash_bf16", SDPBackend.FLASH_ATTENTION)):
        try:
            with sdpa_kernel([be]):
                out = F.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2)
                res[name] = (bench(lambda: F.scaled_dot_product_attention(qt, kt, vt)),
                             ((out.float() - ref).norm() / ref.norm()).item())
        except Exception:
            traceback.print_exc()
    try:
        (q8_, dq), (k8_, dk), (v8_, dv) = q8(q), q8(k), q8(v)
        shape = (B, H, S, D); strides = (S * H * D, D, H * D, 1)
        g, tq, tk, tv, ts, to, tas, tao = build(shape, strides)
        ws = torch.empty(g.get_workspace_size(), device=dev, dtype=torch.uint8)
        o8 = torch.empty(B, S, H, D, device=dev, dtype=torch.float8_e4m3fn)
        scale_s = torch.full((1, 1, 1, 1), 448.0, device=dev); descale_s = 1 / scale_s
        scale_o = (1.0 / dv); descale_o = dv
        amax_s = torch.empty(1, 1, 1, 1, device=dev); amax_o = torch.empty(1, 1, 1, 1, device=dev)
        pack = {tq: q8_, tk: k8_, tv: v8_, ts[0]: dq, ts[1]: dk, ts[2]: dv, ts[3]: descale_s, ts[4]: scale_s,
                ts[5]: scale_o, to: o8, tas: amax_s, tao: amax_o}
        def run():
            cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
            g.execute(pack, ws, handle=handle)
        run(); torch.cuda.synchronize()
        out = o8.float() * descale_o
        res["cudnn_fp8"] = (bench(run), ((out - ref).norm() / ref.norm()).item())
        print("amax_s", amax_s.item(), "amax_o", amax_o.item(), "ws", ws.numel())
        # quantization-only error floor: bf16 sdpa on dequantized fp8 inputs
        deq = [t.float() * d for t, d in ((q8_, dq), (k8_, dk), (v8_, dv))]
        ref8 = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in deq)).transpose(1, 2)
        res["fp32_on_fp8_inputs"] = (0.0, ((ref8 - ref).norm() / ref.norm()).item())
        # CUDA graph capture
        gr = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            run()
        torch.cuda.current_stream().wait_stream(s)
        with torch.cuda.graph(gr):
            run()
        o8.zero_(); gr.replay(); torch.cuda.synchronize()
        print("graph replay err", ((o8.float() * descale_o - ref).norm() / ref.norm()).item())
    except Exception:
        traceback.print_exc()
    flops = 4 * B * H * S * S * D
    for n, (us, err) in res.items():
        print(f"sharp={sharp} {n:<20} {us:8.1f} us  {flops / us / 1e6 if us else 0:7.0f} TFLOP/s  rel err {err:.4f}")
