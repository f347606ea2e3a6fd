"""Tiny random base models for smoke runs and tests: ``--lm tiny`` and ``--vision tiny``.

Both are built deterministically from a seed, without any network, and saved once to
``<cache>/tiny/`` (``visualchat.assets.cache_dir()``), so a checkpoint trained on them names a real
path that ``VisualChat.from_pretrained`` and the app can load:

- ``tiny`` / ``tiny:<seed>`` for ``--lm``: a 2-layer LLaMA (hidden 64, so that 4-bit blocks of 64 fit for QLoRA) with a small byte-level BPE
  tokenizer trained in memory on the template's markers and the shapes vocabulary;
- ``tiny`` / ``tiny:<seed>`` for ``--vision``: a 2-layer CLIP vision tower (32 px, patch 8, K = 16).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

import torch

from visualchat.assets import cache_dir

TINY_VERSION = 2


def _parse(spec: str) -> int | None:
    """``tiny`` -> 0, ``tiny:7`` -> 7, anything else -> None."""
    if spec == "tiny":
        return 0
    if spec.startswith("tiny:"):
        try:
            return int(spec[5:])
        except ValueError:
            raise ValueError(f"tiny model spec must be 'tiny' or 'tiny:<seed>', got {spec!r}") from None
    return None


def is_tiny(spec: str | None) -> bool:
    return spec is not None and _parse(spec) is not None


def _corpus() -> list[str]:
    from visualchat.template import DEFAULT_SYSTEM

    from visualchat_train.data import shapes

    words = list(shapes.SHAPES) + [s + "s" for s in shapes.SHAPES] + list(shapes.COLORS) + list(shapes.BACKGROUNDS)
    words += list(shapes.SIZES) + list(shapes.POSITIONS) + list(shapes.WORDS) + ["none", "shape", "shapes"]
    lines = [DEFAULT_SYSTEM + "\n\n", "### Image 1:\n", "### Image 2:\n", "### Image 3:\n", "### Image 4:\n",
             "### Question:\nWhat is in the image?\n\n### Answer:\nA red circle.\n\n",
             "Describe Image 1. How many shapes are in Image 2? What color is the star in Image 1?",
             "Where is the red circle in Image 1? What word is written in Image 1?",
             "Which image has more circles, Image 1 or Image 2? What is different between Image 1 and Image 3?",
             "How many circles are there in all the images? the circle is red in Image 1 and blue in Image 3",
             "the shape at top left is a square in Image 1 and a star in Image 2; it is at center in Image 1",
             "a an and the is at of in 0 1 2 3 4 5 6 7 8 9 10 11 12 " + " ".join(words),
             "the quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX? yes no, maybe!"]
    return lines * 8


def build_tokenizer(vocab_size: int = 512):
    """A byte-level BPE trained in memory (deterministic), with <pad>, <s>, </s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(_corpus(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


#: the tiny LLaMA of ``--lm tiny`` (hidden 64, so that 4-bit blocks of 64 fit for QLoRA); also the
#: shapes of bench/prefix_cache.py's tiny model. Tests pass smaller ones to :func:`random_lm`.
TINY_LM = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True)
#: the tiny CLIP vision tower of ``--vision tiny`` and the tests (32 px, patch 8: K = 16)
TINY_CLIP = dict(image_size=32, patch_size=8, hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                 num_attention_heads=2, projection_dim=24)
#: model families :func:`random_lm` builds: (config class, model class) in transformers
LM_FAMILIES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
               "mistral": ("MistralConfig", "MistralForCausalLM")}


@contextlib.contextmanager
def _seeded(seed: int, keep_rng: bool):
    """torch's RNG seeded with ``seed`` inside; restored afterwards when ``keep_rng``, else left seeded."""
    if keep_rng:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            yield
    else:
        torch.manual_seed(seed)
        yield


def random_lm(tokenizer, family: str = "llama", seed: int = 0, *, device=None, dtype=None, keep_rng: bool = True,
              **shape):
    """The one factory of random causal LMs (tests, ``--lm tiny``, benchmarks): a ``family`` model
    (see :data:`LM_FAMILIES`) with :data:`TINY_LM`'s shapes overridden by ``shape``, ``tokenizer``'s
    vocabulary (``vocab_size=None`` or absent) and special tokens (``shape`` may override them), initialised from ``seed``, in eval mode.
    ``device`` / ``dtype``: built there directly (a 7B-shaped model is slow to initialise on a CPU in
    fp32). ``keep_rng``: leave torch's global RNG as it was (else it stays seeded with ``seed``)."""
    import transformers

    if family not in LM_FAMILIES:
        raise ValueError(f"unknown model family {family!r}; known: {', '.join(LM_FAMILIES)}")
    config_cls, model_cls = (getattr(transformers, n) for n in LM_FAMILIES[family])
    special = {} if tokenizer is None else dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                                  pad_token_id=tokenizer.pad_token_id)
    kw = {**TINY_LM, **special, **shape}
    if kw.get("vocab_size") is None:
        kw["vocab_size"] = len(tokenizer)
    cfg = config_cls(**kw)
    with _seeded(seed, keep_rng):
        if device is None and dtype is None:
            lm = model_cls(cfg)
        else:
            with torch.device(device or "cpu"):
                lm = model_cls._from_config(cfg, dtype=dtype or torch.float32)
    return lm.eval()


def random_clip(seed: int = 0, *, device=None, keep_rng: bool = True, **shape):
    """The one factory of random CLIP vision towers: :data:`TINY_CLIP`'s shapes overridden by ``shape``,
    initialised from ``seed`` (on ``device`` when given), in eval mode."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(**{**TINY_CLIP, **shape})
    with _seeded(seed, keep_rng), (torch.device(device) if device is not None else contextlib.nullcontext()):
        return CLIPVisionModel(cfg).eval()


def build_lm(seed: int = 0, tokenizer=None):
    """(tiny random LlamaForCausalLM of ``--lm tiny``, its tokenizer)."""
    tok = tokenizer or build_tokenizer()
    return random_lm(tok, "llama", seed), tok


def build_clip(seed: int = 0):
    return random_clip(seed)


def _materialize(name: str, build_and_save) -> str:
    """Build into a temp dir and rename into ``<cache>/tiny/<name>`` once (safe for parallel ranks)."""
    root = os.path.join(cache_dir(), "tiny")
    target = os.path.join(root, name)
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=name + ".tmp", dir=root)
    try:
        build_and_save(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not os.path.isfile(os.path.join(target, "config.json")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def tiny_lm_dir(seed: int = 0) -> str:
    def save(d):
        lm, tok = build_lm(seed)
        lm.save_pretrained(d)
        tok.save_pretrained(d)
    return _materialize(f"llama-v{TINY_VERSION}-s{seed}", save)


def tiny_clip_dir(seed: int = 0) -> str:
    return _materialize(f"clip-v{TINY_VERSION}-s{seed}", lambda d: build_clip(seed).save_pretrained(d))


def resolve_lm_spec(spec: str) -> str:
    """``tiny[:seed]`` -> the saved tiny LLaMA's path; anything else unchanged."""
    seed = _parse(spec)
    return spec if seed is None else tiny_lm_dir(seed)


def resolve_vision_spec(spec: str) -> str:
    """``tiny[:seed]`` -> ``clip:<saved tiny CLIP path>``; ``default`` -> ``efficientnet-lite0``; else unchanged."""
    if spec == "default":
        return "efficientnet-lite0"
    seed = _parse(spec)
    return spec if seed is None else "clip:" + tiny_clip_dir(seed)
