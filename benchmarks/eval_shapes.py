"""Every format on the shipped shapes model: `qdit eval` plus converted Nunchaku INT4 and NVFP4.

No Nunchaku checkpoint of this model exists, so one is made: the BF16 transformer is quantized by the
test helpers (SVDQuant W4A4 with rank-16 SVD branch and smoothing factors of 1; AWQ W4A16 for the
modulation linears, as Nunchaku's Qwen-Image checkpoints do, over all blocks), packed by
DeepCompressor's Nunchaku exporter, converted by `qdit convert nunchaku`, then evaluated like any
other format.

    python benchmarks/eval_shapes.py --out benchmarks/results/eval-shapes-cpu [--device cpu] [--prompts 200]

Needs the test extras and deepcompressor-toolkit (see .ci/run).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from qdit.eval.evaluate import (EvalSettings, SHIPPED_MODEL, default_formats, evaluate,  # noqa: E402
                                parse_formats, run_header, write_report)
from qdit.eval.scenes import held_out_prompts  # noqa: E402
from tests.helpers.nunchaku_models import nunchaku_transformers  # noqa: E402

NUNCHAKU_RANK = 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--formats", default=",".join(default_formats()))
    args = parser.parse_args()
    settings = EvalSettings()
    prompts = held_out_prompts(args.prompts)
    with tempfile.TemporaryDirectory(prefix="qdit-nunchaku-") as tmp:
        extra = ",".join(f"{name}={folder}" for name, folder in nunchaku_transformers(SHIPPED_MODEL, Path(tmp), NUNCHAKU_RANK).items())
        formats = parse_formats(f"{args.formats},{extra}")
        results, grid = evaluate(SHIPPED_MODEL, formats=formats, prompts=prompts, settings=settings,
                                 device=args.device)
    command = "python benchmarks/eval_shapes.py " + " ".join(sys.argv[1:])
    print(write_report(results, grid, args.out, header=run_header(SHIPPED_MODEL, prompts, settings, args.device,
                                                                  command)))


if __name__ == "__main__":
    main()
