"""Images for many prompts from one pipeline, each from its own seed (so batching changes nothing)."""

from __future__ import annotations

import torch

from qdit.eval.scenes import IMAGE_SIZE


@torch.no_grad()
def sample_images(pipe, prompts: list[str], seeds: list[int], *, steps: int = 20, guidance: float = 4.0,
                  negative_prompt: str = "", size: int = IMAGE_SIZE, batch_size: int = 50) -> torch.Tensor:
    """Images [N, 3, size, size] in [0, 1] (float32, CPU) of a QwenImagePipeline.

    Prompt i starts from the noise of torch.Generator().manual_seed(seeds[i]); guidance > 1 runs
    true classifier-free guidance against `negative_prompt`.
    """
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        kwargs = {}
        if guidance > 1:
            kwargs = {"negative_prompt": [negative_prompt] * len(chunk), "true_cfg_scale": guidance}
        images = pipe(prompt=chunk, height=size, width=size, num_inference_steps=steps,
                      generator=[torch.Generator().manual_seed(s) for s in seeds[start:start + batch_size]],
                      output_type="pt", **kwargs).images
        out.append(images.float().cpu())
    return torch.cat(out)
