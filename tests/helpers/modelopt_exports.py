"""Tiny quantized diffusers DiT checkpoints made on CPU by the real producer, NVIDIA ModelOpt.

``make_modelopt_export(adapter_name, algo, out_dir)`` builds the adapter's tiny model (seeded,
BF16), calibrates it with ``mtq.quantize(model, <stock config>, forward_loop)`` on the adapter's
``example_inputs`` and writes it with ``modelopt.torch.export.export_hf_checkpoint``. It returns
the folder plus two reference outputs on those same inputs: the unquantized BF16 model's and
ModelOpt's fake-quantized model's. ``cached_modelopt_export`` does it once per process.

Choices worth knowing:

* ``fakequant_output`` is taken from the fake-quant model *as it is exported*. The export first
  unifies the q/k/v amaxes of each Qwen-Image / FLUX attention block (for NVFP4_SVD it also redoes
  the q/k/v SVD jointly) and only then packs the weights; that changes the output by up to 5 %.
  We run the forward at that point by wrapping the packing step,
  ``modelopt.torch.export.unified_export_hf._process_quantized_modules``, so the reference matches
  the scales in the checkpoint: dequantized W4A16_NVFP4 weights reproduce it bit for bit.
* All Linear weights are re-drawn from N(0, (0.5 / sqrt(in_features))^2). PyTorch's default init
  is uniform(+-1/sqrt(K)), so every layer of one K gets the same amax (the bound) and per-tensor
  scales could not tell layers apart (q/k/v amax unification would be a no-op, for instance).
  Outputs stay O(1) (RMS about 0.5) with a visible quantization error (relative L2 about 0.04-0.07
  for FP8, 0.1-0.25 for the NVFP4 family).

CPU stand-in: ModelOpt's NVFP4 fake quantization (of weights and activations, also inside the
SVDQuant / AWQ-lite search and the export's QKV-fusion forward) goes through
``modelopt.torch.quantization.tensor_quant.dynamic_block_quantize_op`` (the torch op
``tensorrt::dynamic_block_quantize_op``). With CUDA tensors that op calls the Triton kernel
``fp4_fake_quant_block``; with CPU tensors it fails ("amax must be a CUDA tensor"). Inside
``cpu_fake_quant()`` only, that module attribute is patched with a function that sends NVFP4 to
``fp4_fake_quant_block_cpu`` (the kernel's arithmetic in torch) and everything else to the
original op. FP8 needs no stand-in: ModelOpt has an eager CPU path for it.

The stand-in uses IEEE float32 division, as the kernel's formula reads, and as ModelOpt's own torch
code does on CPU (so the exported ``weight_scale_2`` / ``input_scale`` equal the ``g`` it used).
Checked on an H200 against the Triton kernel on 63 M elements: identical when ``g`` and the two
divisions are computed the GPU way (PyTorch CUDA divides by a Python scalar as a multiply by its
reciprocal, and Triton's float32 division is approximate); as written here, 0.06 % of elements,
all at e4m3 / e2m1 rounding ties, land one step apart.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import functools
import io
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import torch

ADAPTER_NAMES = ("qwen-image", "flux", "z-image")
ALGOS = ("FP8", "FP8_PER_CHANNEL_PER_TOKEN", "NVFP4", "W4A16_NVFP4", "NVFP4_SVD", "MIXED_PRECISION")

_STOCK_CONFIGS = {
    "FP8": "FP8_DEFAULT_CFG",
    "FP8_PER_CHANNEL_PER_TOKEN": "FP8_PER_CHANNEL_PER_TOKEN_CFG",
    "NVFP4": "NVFP4_DEFAULT_CFG",
    "W4A16_NVFP4": "W4A16_NVFP4_CFG",
    "NVFP4_SVD": "NVFP4_SVDQUANT_DEFAULT_CFG",
}

_INIT_GAIN = 0.5  # Linear weights ~ N(0, (gain / sqrt(in_features))^2), see the module docstring

# MIXED_PRECISION: attention Linears get FP8, everything else the stock NVFP4 config.
_ATTENTION_PATTERNS = ("*.attn.*", "*.attention.*")


@dataclass
class ModelOptExport:
    path: Path  # config.json (with quantization_config) + diffusion_pytorch_model.safetensors
    adapter_name: str  # "qwen-image" | "flux" | "z-image"
    algo: str  # one of ALGOS, also the exported quant_algo
    inputs: dict  # forward kwargs (adapter.example_inputs) used for calibration and both outputs
    bf16_output: torch.Tensor  # float32 copy of the unquantized BF16 model's output
    fakequant_output: torch.Tensor  # float32 copy of ModelOpt's fake-quant output, as exported


def fp4_fake_quant_block_cpu(x: torch.Tensor, global_amax: torch.Tensor, block_size: int = 16) -> torch.Tensor:
    """Torch equivalent of ModelOpt's Triton ``fp4_fake_quant_block`` (NVFP4, 16-element blocks on the
    last dim, a partial last block padded with zeros), returning ``x``'s shape and dtype."""
    shape, dtype = x.shape, x.dtype
    x = x.reshape(-1, shape[-1]).float()
    k = x.shape[-1]
    x = torch.nn.functional.pad(x, (0, -k % block_size)).view(x.shape[0], -1, block_size)

    g = global_amax.float() / (6.0 * 448.0)
    g = torch.where(g > 0, g, torch.full_like(g, 1e-12))
    block_amax = x.abs().amax(dim=-1, keepdim=True)
    step = (block_amax / (6.0 * g)).clamp(max=448.0).to(torch.float8_e4m3fn).float() * g
    step = torch.where(step >= 1e-5, step, torch.ones_like(step))

    # e2m1 rounding, ties to even: the thresholds alternate between <= and <.
    a = x.abs() / step
    q = torch.full_like(a, 6.0)
    for bound, value, inclusive in ((5.0, 4.0, True), (3.5, 3.0, False), (2.5, 2.0, True), (1.75, 1.5, False),
                                    (1.25, 1.0, True), (0.75, 0.5, False), (0.25, 0.0, True)):
        q = torch.where(a <= bound if inclusive else a < bound, value, q)
    y = torch.where(x >= 0, q * step, -q * step)
    return y.flatten(1)[:, :k].reshape(shape).to(dtype)


@contextlib.contextmanager
def cpu_fake_quant():
    """Route ModelOpt's NVFP4 fake quantization to ``fp4_fake_quant_block_cpu`` inside the block."""
    from modelopt.torch.quantization import tensor_quant

    original = tensor_quant.dynamic_block_quantize_op

    def dynamic_block_quantize_op(inputs, block_size, amax, num_bits, exponent_bits,
                                  scale_num_bits, scale_exponent_bits):
        # (num_bits, exponent_bits) = (4, 2) is E2M1; (8, 4) scales are E4M3: NVFP4.
        if (num_bits, exponent_bits, scale_num_bits, scale_exponent_bits) == (4, 2, 8, 4) and amax is not None:
            if block_size != 16:
                raise NotImplementedError(f"NVFP4 CPU stand-in: block size {block_size}")
            return fp4_fake_quant_block_cpu(inputs, amax.amax(), block_size)
        return original(inputs, block_size, amax, num_bits, exponent_bits, scale_num_bits, scale_exponent_bits)

    with mock.patch.object(tensor_quant, "dynamic_block_quantize_op", dynamic_block_quantize_op):
        yield


def quant_config(algo: str) -> dict[str, Any]:
    """The ModelOpt quantize config for ``algo``: a stock config, or for MIXED_PRECISION the stock NVFP4
    config with the stock FP8 quantizer settings re-targeted at the attention Linears."""
    import modelopt.torch.quantization as mtq

    if algo in _STOCK_CONFIGS:
        return copy.deepcopy(getattr(mtq, _STOCK_CONFIGS[algo]))
    if algo != "MIXED_PRECISION":
        raise ValueError(f"unknown algo {algo!r}; expected one of {ALGOS}")
    cfg = copy.deepcopy(mtq.NVFP4_DEFAULT_CFG)
    fp8 = {e["quantizer_name"]: e for e in mtq.FP8_DEFAULT_CFG["quant_cfg"]}
    overrides = [{**fp8[q], "quantizer_name": pattern + q}
                 for pattern in _ATTENTION_PATTERNS for q in ("*weight_quantizer", "*input_quantizer")]
    # Right after the stock enable entries, so the stock disable entries ("*proj_out.*", ...) still win.
    entries = cfg["quant_cfg"]
    last_enable = max(i for i, e in enumerate(entries) if e["quantizer_name"] in ("*weight_quantizer", "*input_quantizer"))
    cfg["quant_cfg"] = entries[:last_enable + 1] + overrides + entries[last_enable + 1:]
    return cfg


def build_tiny_model(adapter_name: str, seed: int = 0):
    """(adapter, BF16 eval-mode tiny model): ``adapter.tiny_config`` under ``torch.manual_seed(seed)``,
    Linear weights re-drawn (see the module docstring)."""
    from qdit.models import adapter_by_name

    adapter = adapter_by_name(adapter_name)
    torch.manual_seed(seed)
    model = adapter.model_class().from_config(adapter.tiny_config).to(torch.bfloat16).eval()
    _reinit_linears(model, seed)
    return adapter, model


@torch.no_grad()
def _reinit_linears(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            n, k = module.weight.shape
            module.weight.copy_(torch.randn(n, k, generator=gen) * (_INIT_GAIN / k ** 0.5))


def make_modelopt_export(adapter_name: str, algo: str, out_dir: Path, seed: int = 0) -> ModelOptExport:
    """Quantize the adapter's tiny model with ModelOpt (``algo``) and export it to ``out_dir``."""
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint, unified_export_hf

    cfg = quant_config(algo)
    adapter, model = build_tiny_model(adapter_name, seed)
    inputs = adapter.example_inputs(dict(model.config), seed=seed)

    def run(m: torch.nn.Module) -> torch.Tensor:
        return adapter.output_tensor(m(**inputs)).float().clone()

    captured: list[torch.Tensor] = []
    pack = unified_export_hf._process_quantized_modules

    def fakequant_then_pack(component, *args, **kwargs):
        captured.append(run(component))
        return pack(component, *args, **kwargs)

    out_dir = Path(out_dir)
    log = io.StringIO()  # ModelOpt prints progress (quantizer counts, QKV fusion, paths) to stdout.
    with torch.no_grad(), cpu_fake_quant(), contextlib.redirect_stdout(log), \
            mock.patch.object(unified_export_hf, "_process_quantized_modules", fakequant_then_pack):
        bf16_output = run(model)
        model = mtq.quantize(model, cfg, forward_loop=run)
        export_hf_checkpoint(model, export_dir=out_dir)
    if len(captured) != 1:
        raise RuntimeError(f"expected one quantized component in the export, saw {len(captured)}:\n{log.getvalue()}")
    return ModelOptExport(path=out_dir, adapter_name=adapter_name, algo=algo, inputs=inputs,
                          bf16_output=bf16_output, fakequant_output=captured[0])


@functools.cache
def _cache_root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="qdit-modelopt-exports-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return root


@functools.cache
def cached_modelopt_export(adapter_name: str, algo: str, seed: int = 0) -> ModelOptExport:
    """``make_modelopt_export`` once per process and arguments, under a temp dir removed at exit.
    The result is shared: tests must not modify its tensors or files."""
    return make_modelopt_export(adapter_name, algo, _cache_root() / f"{adapter_name}-{algo}-{seed}", seed)
