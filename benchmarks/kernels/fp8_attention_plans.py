"""Every execution plan cuDNN offers for qdit's FP8 attention graph (qdit.kernels.attention_fp8) at
Qwen-Image's joint shape (1 x 4352 tokens x 24 heads x 128) and FLUX's (1 x 4608 x 24 x 128): its
name and time per call (median of 20 replays of a CUDA graph of 20 calls), against the plan qdit runs
(the first of heuristics mode A). Decides whether picking a plan by measurement pays.
Run: python benchmarks/kernels/fp8_attention_plans.py [OUT_FILE]
"""
import math
import sys

import cudnn
import torch

from qdit.bench import replay_ms
from qdit.kernels.attention_fp8 import quantize_per_tensor

dev = torch.device("cuda")
lines = [f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, cudnn backend {cudnn.backend_version()}, "
         f"cudnn-frontend {cudnn.__version__}"]


def plans_for(seq: int, heads: int = 24, dim: int = 128) -> None:
    e4m3, f32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
    handle = cudnn.create_handle()
    g = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=f32, compute_data_type=f32, handle=handle)
    layout = dict(dim=(1, heads, seq, dim), stride=(seq * heads * dim, dim, heads * dim, 1))
    tq, tk, tv = (g.tensor(name=n, data_type=e4m3, **layout) for n in "qkv")
    scalar = dict(dim=(1, 1, 1, 1), stride=(1, 1, 1, 1), data_type=f32)
    ts = [g.tensor(name=n, **scalar) for n in ("dq", "dk", "dv", "ds", "ss", "so")]
    o, _, amax_s, amax_o = g.sdpa_fp8(q=tq, k=tk, v=tv, descale_q=ts[0], descale_k=ts[1], descale_v=ts[2],
                                      descale_s=ts[3], scale_s=ts[4], scale_o=ts[5], is_inference=True,
                                      attn_scale=1.0 / math.sqrt(dim), use_causal_mask=False, name="sdpa")
    o.set_output(True).set_data_type(e4m3).set_dim(layout["dim"]).set_stride(layout["stride"])
    for a in (amax_s, amax_o):
        a.set_output(True).set_data_type(f32).set_dim((1, 1, 1, 1)).set_stride((1, 1, 1, 1))
    g.validate()
    g.build_operation_graph()
    g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.B, cudnn.heur_mode.FALLBACK])
    g.check_support()
    g.build_plans(cudnn.build_plan_policy.ALL)
    count = g.get_execution_plan_count()
    gen = torch.Generator(device=dev).manual_seed(0)
    (q8, sq), (k8, sk), (v8, sv) = (quantize_per_tensor(torch.randn(1, seq, heads, dim, device=dev, generator=gen)
                                                        .bfloat16()) for _ in range(3))
    out = torch.empty(1, seq, heads, dim, device=dev, dtype=torch.float8_e4m3fn)
    amax = torch.empty(2, 1, 1, 1, device=dev)
    p_scale = torch.full((1, 1, 1, 1), 448.0, device=dev)
    pack = {tq: q8, tk: k8, tv: v8, ts[0]: sq, ts[1]: sk, ts[2]: sv, ts[3]: 1 / p_scale, ts[4]: p_scale,
            ts[5]: 1 / sv, o: out, amax_s: amax[0:1], amax_o: amax[1:2]}
    flops = 4 * seq * seq * dim * heads
    lines.append(f"seq {seq}: {count} plans")
    first = None
    for i in range(count):
        name = g.get_plan_name_at_index(i)
        try:
            ws = torch.empty(max(g.get_workspace_size_plan_at_index(i), 1), device=dev, dtype=torch.uint8)

            def run():
                cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
                g.execute_plan_at_index(pack, ws, i, handle=handle)
            run()
            torch.cuda.synchronize()
            result = out.float().clone()
            us = replay_ms(lambda: [run() for _ in range(20)], iters=20) / 20 * 1e3
        except Exception as e:  # a plan that cannot run here is listed with its error
            lines.append(f"  plan {i} {name}: failed: {type(e).__name__}: {str(e)[:200]}")
            continue
        first = result if first is None else first
        same = torch.equal(result, first)
        lines.append(f"  plan {i} {name}: {us:.1f} us, {flops / us / 1e6:.0f} TFLOP/s, output equal to plan 0's: {same}")
        print(lines[-1], flush=True)


for seq in (4352, 4608):
    plans_for(seq)
print("\n".join(lines))
if len(sys.argv) > 1:
    with open(sys.argv[1], "w") as f:
        f.write("\n".join(lines) + "\n")
