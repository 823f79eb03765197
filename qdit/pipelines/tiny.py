"""Tiny but complete diffusers pipeline folders for the DiTs qdit serves, built from configs only.

Each folder is what `DiffusionPipeline.from_pretrained` expects (model_index.json + one folder per
component) and loads offline. The transformer is qdit's tiny config with seeded random weights
(`qdit.tools.embedded.random_model`), saved as a plain BF16 diffusers folder that qdit's loader reads;
every other component (text encoders, VAE) is a small config of the published architecture with
seeded random weights, saved in float32 (so a load without `dtype=` is float32 throughout; with
`dtype=torch.bfloat16` everything runs in BF16); the scheduler config is the published one. Tokenizers are
byte-level BPE (Qwen, CLIP) or Unigram (T5) vocabularies built in code over a fixed word list and the
prompt templates, wrapped in the transformers class the pipeline expects.

Images are noise-like (nothing is trained); the folders exist so tests and qdit's embedded default
run diffusers' own pipeline classes and schedulers end to end on CPU in seconds. Building is
deterministic: the same model and seed give byte-identical folders in any process.

Swapping in a qdit transformer (BF16): `DiffusionPipeline.from_pretrained(folder, transformer=model,
dtype=torch.bfloat16)`; without `dtype=` the text encoders run in float32 and QwenImage/FLUX feed
float32 activations to the BF16 transformer, which fails.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from qdit.errors import UnsupportedFormatError

MODELS = ("qwen-image", "z-image", "flux")

# Words that become whole tokens (anything else is spelled with smaller pieces; nothing is unknown
# for the byte-level BPEs). The prompt templates' own words are added per tokenizer.
WORDS = """
a an the of and or with on in at to by from for is are this that it its as over under behind near
next top bottom left right front back center middle small large big tiny huge tall short long wide
round square circle triangle rectangle star heart line lines dot dots grid stripe stripes pattern
shape shapes color colors red green blue yellow orange purple pink brown black white gray grey gold
silver dark light bright pale cat dog bird fish horse tree trees flower flowers house car boat sky
sea ocean river mountain mountains forest field road city street sun moon cloud clouds rain snow
water fire stone wood glass metal paper person man woman child face portrait photo photograph
painting drawing sketch illustration render image picture scene landscape view close up background
foreground texture text sign letter letters word words number numbers logo poster style art
realistic detailed simple abstract minimal high quality sharp soft blurry night day morning evening
one two three four five six seven eight nine ten
""".split()
CHARS = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;!?'\"()-_/")

QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN_IMAGE_TEMPLATE = (  # QwenImagePipeline.prompt_template_encode; it drops the first 34 tokens
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n")
QWEN_IMAGE_DROP = 34
# A Qwen3-style chat template (ZImagePipeline calls apply_chat_template with enable_thinking=True).
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}")

# Published scheduler configs (FlowMatchEulerDiscreteScheduler) of each model.
SCHEDULERS: dict[str, dict[str, Any]] = {
    "qwen-image": {"base_image_seq_len": 256, "base_shift": 0.5, "invert_sigmas": False,
                   "max_image_seq_len": 8192, "max_shift": 0.9, "num_train_timesteps": 1000, "shift": 1.0,
                   "shift_terminal": 0.02, "stochastic_sampling": False, "time_shift_type": "exponential",
                   "use_beta_sigmas": False, "use_dynamic_shifting": True, "use_exponential_sigmas": False,
                   "use_karras_sigmas": False},
    "flux": {"base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
             "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True},
    "z-image": {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False},
}


# ---------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------

def _corpus(*texts: str) -> list[str]:
    return [" ".join(WORDS), " ".join(w.capitalize() for w in WORDS), " ".join(CHARS), *texts]


def _learn_bpe(template, special: list[str], corpus: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE vocab + merges learned over `corpus` with `template`'s normalizer and pre-tokenizer.

    Plain BPE learning (most frequent pair first, ties broken by the pair's text, so the result is
    the same in every process) run until every pre-token of the corpus is one token. The vocabulary
    holds the special tokens, the 256 byte-level symbols (also with the model's end-of-word suffix,
    if any), then the merges' results in order.
    """
    import re
    from collections import Counter

    from tokenizers import pre_tokenizers

    suffix = template.model.end_of_word_suffix or ""
    words: Counter[tuple[str, ...]] = Counter()
    for text in corpus:
        for segment in re.split("|".join(map(re.escape, special)), text):
            if template.normalizer is not None:
                segment = template.normalizer.normalize_str(segment)
            for piece, _ in template.pre_tokenizer.pre_tokenize_str(segment):
                words[(*piece[:-1], piece[-1] + suffix)] += 1
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(dict.fromkeys(
        [*special, *alphabet, *((a + suffix for a in alphabet) if suffix else ())]))}
    merges: list[tuple[str, str]] = []
    while True:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, n in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        vocab.setdefault(best[0] + best[1], len(vocab))
        merged: Counter[tuple[str, ...]] = Counter()
        for word, n in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += n
        words = merged
    return vocab, merges


def qwen_tokenizer(*, chat_template: str | None = None):
    """A Qwen2Tokenizer (byte-level BPE with Qwen's pre-tokenizer) whose QwenImage template prefix is 34 tokens."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    vocab, merges = _learn_bpe(Qwen2Tokenizer()._tokenizer, QWEN_SPECIAL,
                               _corpus(QWEN_IMAGE_TEMPLATE.format("a red circle"), "<think>\n\n</think>\n\n"))
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=32768)
    tok.add_tokens([AddedToken(s, special=True, normalized=False) for s in QWEN_SPECIAL[1:]])
    if chat_template is not None:
        tok.chat_template = chat_template
    prefix = tok(QWEN_IMAGE_TEMPLATE.split("{}")[0]).input_ids
    if len(prefix) != QWEN_IMAGE_DROP:  # QwenImagePipeline would cut into the prompt (or keep template tokens)
        raise RuntimeError(f"QwenImage template prefix is {len(prefix)} tokens, not {QWEN_IMAGE_DROP}")
    return tok


def clip_tokenizer():
    """A CLIPTokenizer (lower-cased byte-level BPE with '</w>' word ends), 77 tokens max."""
    from transformers import CLIPTokenizer

    special = ["<|startoftext|>", "<|endoftext|>"]
    vocab, merges = _learn_bpe(CLIPTokenizer()._tokenizer, special, _corpus())
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def t5_tokenizer():
    """A T5Tokenizer (Unigram, SentencePiece-style '▁' word starts): whole words from WORDS, else characters."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -8.0)]
    seen = {p for p, _ in pieces}
    for w in dict.fromkeys([*WORDS, *(w.capitalize() for w in WORDS)]):
        if "▁" + w not in seen:
            pieces.append(("▁" + w, -4.0 - 0.01 * len(pieces)))
            seen.add("▁" + w)
    for c in CHARS:
        for p in (c, "▁" + c):
            if p not in seen:
                pieces.append((p, -12.0))
                seen.add(p)
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


# ---------------------------------------------------------------------------------------------
# Components
# ---------------------------------------------------------------------------------------------

def _seeded(seed: int, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """build() under a fixed torch seed, in float32."""
    torch.manual_seed(seed)
    return build().float().eval()


def _flux_vae(seed: int):
    """AutoencoderKL of the FLUX.1 / Z-Image architecture (16 latent channels, 8x down), tiny widths."""
    from diffusers import AutoencoderKL

    return _seeded(seed, lambda: AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8, sample_size=64,
        scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
        force_upcast=False, mid_block_add_attention=True))


def _qwen_image(seed: int, transformer) -> dict[str, Any]:
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = qwen_tokenizer()
    hidden = transformer.config.joint_attention_dim
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer), "hidden_size": hidden, "intermediate_size": 2 * hidden,
            "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
            "max_position_embeddings": 2048,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                                "mrope_section": [hidden // 16, 3 * hidden // 32, 3 * hidden // 32]},
            "bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
            "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
            "pad_token_id": tokenizer.pad_token_id},
        vision_config={"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                       "out_hidden_size": hidden, "patch_size": 14, "spatial_merge_size": 2,
                       "temporal_patch_size": 2, "window_size": 112, "fullatt_block_indexes": [0]},
        # No image/video tokens in this vocabulary: point them past it.
        image_token_id=len(tokenizer) + 1, video_token_id=len(tokenizer) + 2,
        vision_start_token_id=len(tokenizer) + 3, vision_end_token_id=len(tokenizer) + 4)
    text_encoder = _seeded(seed + 1, lambda: Qwen2_5_VLForConditionalGeneration(config))
    z_dim = transformer.config.out_channels
    vae = _seeded(seed + 2, lambda: AutoencoderKLQwenImage(
        base_dim=8, z_dim=z_dim, dim_mult=[1, 2, 4, 4], num_res_blocks=1, attn_scales=[],
        temperal_downsample=[False, True, True], latents_mean=[0.0] * z_dim, latents_std=[1.0] * z_dim))
    return {"transformer": transformer, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
            "scheduler": FlowMatchEulerDiscreteScheduler(**SCHEDULERS["qwen-image"])}


def _z_image(seed: int, transformer) -> dict[str, Any]:
    from diffusers import FlowMatchEulerDiscreteScheduler
    from transformers import Qwen3Config, Qwen3Model

    tokenizer = qwen_tokenizer(chat_template=QWEN3_CHAT_TEMPLATE)
    hidden = transformer.config.cap_feat_dim
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=hidden // 2, max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6}, tie_word_embeddings=True,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tokenizer.pad_token_id)
    # ZImagePipeline takes hidden_states[-2]: with 2 layers that is the first layer's output.
    text_encoder = _seeded(seed + 1, lambda: Qwen3Model(config))
    return {"transformer": transformer, "vae": _flux_vae(seed + 2), "text_encoder": text_encoder,
            "tokenizer": tokenizer, "scheduler": FlowMatchEulerDiscreteScheduler(**SCHEDULERS["z-image"])}


def _flux(seed: int, transformer) -> dict[str, Any]:
    from diffusers import FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    tokenizer = clip_tokenizer()
    pooled = transformer.config.pooled_projection_dim
    clip_config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=pooled, intermediate_size=2 * pooled, projection_dim=pooled,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length,
        hidden_act="quick_gelu", bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    text_encoder = _seeded(seed + 1, lambda: CLIPTextModel(clip_config))
    tokenizer_2 = t5_tokenizer()
    d_model = transformer.config.joint_attention_dim
    t5_config = T5Config(
        vocab_size=len(tokenizer_2), d_model=d_model, d_kv=d_model // 2, d_ff=2 * d_model, num_layers=2,
        num_heads=2, relative_attention_num_buckets=8, relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False, tie_word_embeddings=False,
        pad_token_id=tokenizer_2.pad_token_id, eos_token_id=tokenizer_2.eos_token_id, decoder_start_token_id=0)
    text_encoder_2 = _seeded(seed + 3, lambda: T5EncoderModel(t5_config))
    return {"transformer": transformer, "vae": _flux_vae(seed + 2), "text_encoder": text_encoder,
            "tokenizer": tokenizer, "text_encoder_2": text_encoder_2, "tokenizer_2": tokenizer_2,
            "scheduler": FlowMatchEulerDiscreteScheduler(**SCHEDULERS["flux"])}


_BUILDERS: dict[str, tuple[str, Callable[[int, Any], dict[str, Any]]]] = {
    "qwen-image": ("QwenImagePipeline", _qwen_image),
    "z-image": ("ZImagePipeline", _z_image),
    "flux": ("FluxPipeline", _flux),
}


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------

def tiny_components(model: str, *, seed: int = 0) -> dict[str, Any]:
    """The pipeline's components in memory: the transformer in BF16, the other modules in float32."""
    from qdit.tools.embedded import random_model

    if model not in _BUILDERS:
        raise UnsupportedFormatError(f"no tiny pipeline for model {model!r}", expected=", ".join(MODELS),
                                     found=model)
    return _BUILDERS[model][1](seed, random_model(model, seed=seed))


def components_around(model: str, transformer, *, seed: int = 0) -> dict[str, Any]:
    """Tiny text encoder, tokenizer, VAE and scheduler sized to fit a given transformer (e.g. a full-size
    random-weight one: the text encoder's width follows the transformer's text dimension)."""
    if model not in _BUILDERS:
        raise UnsupportedFormatError(f"unknown model {model!r}", expected=", ".join(_BUILDERS), found=model)
    return _BUILDERS[model][1](seed, transformer)


def pipeline_class(model: str):
    """The diffusers pipeline class of `model`."""
    import diffusers

    if model not in _BUILDERS:
        raise UnsupportedFormatError(f"no tiny pipeline for model {model!r}", expected=", ".join(MODELS),
                                     found=model)
    return getattr(diffusers, _BUILDERS[model][0])


def build_tiny_pipeline(model: str, dst: str | os.PathLike, *, seed: int = 0) -> Path:
    """Write a complete diffusers pipeline folder (model_index.json + components) for `model` into dst.

    The transformer folder is a plain BF16 diffusers transformer (config.json +
    diffusion_pytorch_model.safetensors) that qdit's loader reads; text encoders and VAE are saved in
    float32 safetensors. The folder is at most a few MB and loads offline.
    """
    dst = Path(dst)
    pipe = pipeline_class(model)(**tiny_components(model, seed=seed))
    pipe.save_pretrained(dst, safe_serialization=True)
    return dst


def tiny_pipeline(model: str = "qwen-image", *, seed: int = 0) -> Path:
    """The tiny pipeline folder of a model, created once (atomically) into qdit's cache directory."""
    from qdit.tools.embedded import cache_dir

    dst = cache_dir() / "embedded" / f"{model}-pipeline-seed{seed}"
    if (dst / "model_index.json").is_file():
        return dst
    pipeline_class(model)  # fail on an unknown name before any work
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f"{dst.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        build_tiny_pipeline(model, tmp, seed=seed)
        try:
            tmp.rename(dst)
        except OSError:  # another process finished first
            if not (dst / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst
