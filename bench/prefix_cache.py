"""Time to first token per round of an 8-round chat, one new image per round: the session's KV prefix
cache vs recomputing the whole conversation every round (what the reference implementation does).

CPU, the embedded default (SmolLM2-135M-Instruct + EfficientNet-Lite0, fp32, shipped checkpoint)::

    python bench/prefix_cache.py --model default --repeats 3 --json bench/results/prefix-cache-cpu.json

GPU (one H100), a LLaMA-2-7B-shaped random LM (hidden 4096, 32 layers, 32 heads, MLP 11008, vocab
32000; bf16) with a random CLIP ViT-L/14-shaped encoder at 224 px (K = 256 image tokens per image)::

    python bench/prefix_cache.py --model llama7b-random --repeats 3 --json bench/results/prefix-cache-h100.json

Quick CPU smoke run (tiny random LLaMA + tiny random CLIP, K = 16)::

    python bench/prefix_cache.py --model tiny --repeats 1 --new_tokens 4

One process, one model; for each of ``--repeats`` conversations (after a discarded warm-up conversation)
and each round k = 1..8 (question k with image k, greedy, ``--new_tokens`` answer tokens):

- **cached**: one ``Session`` for the whole chat (``vc.new_session()``, ``stream``); it keeps its KV
  cache, so round k feeds only its own image tokens and question (the previous answer is already in
  the cache, except its last token).
- **full recompute** (the reference implementation's way): a fresh session rebuilds the same history
  (``add_round`` with rounds 1..k-1 and exactly the cached run's answer token ids, which runs every
  earlier image through the encoder again) and then streams round k: the encoder runs on k images and
  the LM prefills the whole conversation. Timed from the first ``add_round`` call.
- **drop_cache recompute**: the same fresh session timed from its ``stream`` call only, i.e. the LM
  prefills the whole conversation but earlier images' features are already stored; this equals
  calling ``session.drop_cache()`` before each round.

TTFT = wall time from the call until the first answer token is produced (the first token is sampled
from the prefill's logits; we take the earliest of: the session asking for the next token's logits,
the stream's first yield, the end of the stream). Every mode includes encoding the round's new image.
The recompute runs generate just that one token; the cached run generates the full answer, which is
the history of the next round. Reported: median per round over the repeats, the ratio full / cached,
and the token counts fed to the LM (the context length for a full recompute). ``same history``
checks that the recompute session's rendered tokens equal the cached session's.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import write_json  # noqa: E402
from visualchat_train.tiny import TINY_CLIP, TINY_LM, random_clip, random_lm  # noqa: E402 - the one random-model factory
from visualchat.config import ATTENTION_MODES  # noqa: E402

#: LLaMA-2-7B shapes (Touvron et al. 2023 / meta-llama/Llama-2-7b-hf config.json)
LLAMA7B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
               intermediate_size=11008, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
               tie_word_embeddings=False)
#: a tiny LLaMA for CPU smoke runs: ``--lm tiny``'s shapes (vocab: the tiny tokenizer's)
TINY = dict(TINY_LM, vocab_size=None)
#: CLIP ViT-L/14 vision tower shapes (K = (image_size / 14)^2 = 256 at 224 px)
CLIP_L = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=14)
CLIP_TINY = {k: TINY_CLIP[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                      "patch_size")}

QUESTIONS = [
    "What is in Image 1?",
    "Describe Image 2.",
    "How many shapes are in Image 3?",
    "What color is the star in Image 4?",
    "Which image has more circles, Image 4 or Image 5?",
    "What is different between Image 5 and Image 6?",
    "Where is the red circle in Image 7?",
    "What word is written in Image 8?",
]


# -- models (shared with bench/train_throughput.py) ---------------------------------------------
def random_llama(shape: dict, tokenizer=None, device="cpu", dtype=torch.float32, seed: int = 0):
    """A randomly initialised ``LlamaForCausalLM`` with the given shapes, built directly on ``device``
    in ``dtype`` (no checkpoint on disk). ``vocab_size=None`` takes the tokenizer's."""
    return random_lm(tokenizer, "llama", seed, device=device, dtype=dtype, keep_rng=False, **shape)


def random_clip_encoder(shape: dict, image_tokens: int, device="cpu", dtype=torch.float32, seed: int = 0):
    """visualchat's CLIP encoder around a random ``CLIPVisionModel`` giving ``image_tokens`` patch tokens
    (a square number: image_size = patch_size * sqrt(K))."""
    from visualchat.encoders.clip import CLIPEncoder

    side = int(round(image_tokens ** 0.5))
    if side * side != image_tokens:
        raise ValueError(f"--image_tokens must be a square number (patches of a square image), got {image_tokens}")
    kw = dict(shape)
    patch = kw.pop("patch_size")
    # initialised on the device (a ViT-L is slow to initialise on a CPU)
    tower = random_clip(seed, device=device, keep_rng=False, image_size=side * patch, patch_size=patch,
                        projection_dim=kw["hidden_size"], **kw)
    enc = CLIPEncoder(tower)
    enc.path = f"random-clip-{side * patch}px-p{patch}"  # only names it in the (unsaved) config
    return enc.to(device=device, dtype=dtype)


def build_vc(args):
    """(VisualChat, description) for ``args.model``."""
    from visualchat.model import VisualChat

    dev = torch.device(args.device)
    if args.model == "default":
        vc = VisualChat.from_pretrained(None, device=dev)
        return vc, (f"embedded default (SmolLM2-135M-Instruct + EfficientNet-Lite0, shipped checkpoint), {vc.model.lm.dtype}, "
                    f"LM weights {vc.lm_weights}")
    from visualchat_train.tiny import build_tokenizer

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
        args.dtype or ("bf16" if dev.type == "cuda" else "fp32")]
    tok = build_tokenizer()
    if args.model == "llama7b-random":
        lm = random_llama(LLAMA7B, tok, dev, dtype)
        enc = random_clip_encoder(dict(CLIP_L, num_hidden_layers=args.vision_layers or CLIP_L["num_hidden_layers"]),
                                  args.image_tokens or 256, dev, dtype)
    else:
        lm = random_llama(TINY, tok, dev, dtype)
        enc = random_clip_encoder(dict(CLIP_TINY, num_hidden_layers=args.vision_layers or 2),
                                  args.image_tokens or 16, dev, dtype)
    vc = VisualChat.from_components(lm, tok, enc, attention=args.attention, lm_spec=args.model)
    n = sum(p.numel() for p in lm.parameters())
    size = f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"
    desc = (f"{args.model}: random LLaMA ({lm.config.num_hidden_layers} layers, hidden {lm.config.hidden_size}, "
            f"{size} parameters) + random CLIP ({enc.model.config.num_hidden_layers} layers, "
            f"{enc.image_size} px, K = {enc.num_tokens}), {dtype}")
    return vc, desc


def images(n: int) -> list:
    """The shipped example images, then PIL-drawn ones."""
    from PIL import Image, ImageDraw

    from visualchat.assets import ASSETS_DIR

    out = []
    for i in range(n):
        path = os.path.join(ASSETS_DIR, "examples", f"shapes_{i + 1}.png")
        if os.path.isfile(path):
            out.append(Image.open(path).convert("RGB"))
            continue
        im = Image.new("RGB", (224, 224), (240, 240 - 20 * i, 200))
        d = ImageDraw.Draw(im)
        d.ellipse((20 + 10 * i, 30, 110 + 10 * i, 120), fill=(200, 30, 30))
        d.rectangle((120, 110 - 5 * i, 200, 190), fill=(30, 60, 200))
        out.append(im)
    return out


# -- timing ------------------------------------------------------------------------------------
def sync(vc):
    if vc.device.type == "cuda":
        torch.cuda.synchronize()


def stream_ttft(session, question, ims, new_tokens: int, t0: float) -> float:
    """Stream one round (greedy) to its end; seconds from ``t0`` until the first token was produced."""
    first: list[float] = []
    step = session._step  # the bound method; shadowed on the instance for this round only

    def wrapped(tok):
        if not first:
            first.append(time.perf_counter())
        return step(tok)

    session._step = wrapped
    try:
        for _ in session.stream(question, ims, max_new_tokens=new_tokens, temperature=0.0):
            if not first:
                first.append(time.perf_counter())
    finally:
        del session._step
    end = time.perf_counter()
    return (first[0] if first else end) - t0


def conversation(vc, args, qs, ims, record: bool) -> list[dict]:
    """One chat of len(qs) rounds in both modes; a row per round."""
    cached = vc.new_session()
    answers: list[tuple[str, list[int]]] = []
    rows = []
    for k, (q, im) in enumerate(zip(qs, ims)):
        sync(vc)
        t = time.perf_counter()
        ttft_cached = stream_ttft(cached, q, [im], args.new_tokens, t)
        fed_cached = cached.last_stats["prefill_tokens"]
        answers.append((cached.conversation.rounds[-1].answer or "", list(cached._answer_ids[-1])))

        full = vc.new_session()
        sync(vc)
        t0 = time.perf_counter()
        for j in range(k):  # the same history: questions, images (encoded again), exact answer ids
            full.add_round(qs[j], [ims[j]], answer=answers[j][0])
            full._answer_ids[j] = list(answers[j][1])
        sync(vc)
        t1 = time.perf_counter()
        ttft_drop = stream_ttft(full, q, [im], 1, t1)
        ttft_full = ttft_drop + (t1 - t0)
        fed_full = full.last_stats["prefill_tokens"]
        same = (cached._render().input_ids[:fed_full] == full._render().input_ids[:fed_full]
                and fed_full <= len(cached._render()))
        if record:
            rows.append({"round": k + 1, "context_tokens": fed_full, "cached_tokens_fed": fed_cached,
                         "full_tokens_fed": fed_full, "ttft_cached_s": ttft_cached, "ttft_full_s": ttft_full,
                         "ttft_drop_cache_s": ttft_drop, "same_history": bool(same)})
    return rows


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    t = time.perf_counter()
    vc, desc = build_vc(args)
    load_s = time.perf_counter() - t
    if args.rounds > vc.config.max_images:
        raise SystemExit(f"--rounds {args.rounds} > the model's max_images {vc.config.max_images} (one image per round)")
    qs = (QUESTIONS + [f"What is in Image {i + 1}?" for i in range(len(QUESTIONS), args.rounds)])[:args.rounds]
    ims = images(args.rounds)
    dev = vc.device
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    w = args.rounds if args.warmup_rounds is None else args.warmup_rounds
    conversation(vc, args, qs[:w], ims[:w], record=False)  # warm-up: kernels, allocator, autotuning per length
    reps = [conversation(vc, args, qs, ims, record=True) for _ in range(args.repeats)]
    med = lambda key, k: statistics.median(r[k][key] for r in reps)  # noqa: E731
    rows = []
    for k in range(args.rounds):
        r = dict(reps[0][k])
        for key in ("ttft_cached_s", "ttft_full_s", "ttft_drop_cache_s"):
            r[key] = med(key, k)
        r["same_history"] = all(rep[k]["same_history"] for rep in reps)
        r["full_over_cached"] = r["ttft_full_s"] / r["ttft_cached_s"]
        r["drop_cache_over_cached"] = r["ttft_drop_cache_s"] / r["ttft_cached_s"]
        rows.append(r)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else \
        f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    now = datetime.datetime.now().isoformat(timespec="seconds")
    return {"device": name, "torch": torch.__version__, "date": now, "model": desc, "load_s": load_s,
            "rounds": args.rounds, "repeats": args.repeats, "new_tokens": args.new_tokens, "attention": args.attention,
            "peak_gpu_gb": torch.cuda.max_memory_allocated(dev) / 2 ** 30 if dev.type == "cuda" else None,
            "rows": rows}


def table(res) -> str:
    lines = ["| round | context tokens | cached: tokens fed | TTFT cached (ms) | TTFT full recompute (ms) | "
             "full / cached | TTFT drop_cache recompute (ms) | drop_cache / cached | same history |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['round']} | {r['context_tokens']} | {r['cached_tokens_fed']} | {1000 * r['ttft_cached_s']:.1f} | "
                     f"{1000 * r['ttft_full_s']:.1f} | {r['full_over_cached']:.2f} | {1000 * r['ttft_drop_cache_s']:.1f} | "
                     f"{r['drop_cache_over_cached']:.2f} | {'yes' if r['same_history'] else 'NO'} |")
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=("default", "llama7b-random", "tiny"), default="default")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                    help="random models only (default bf16 on CUDA, fp32 on CPU); the default model picks its own")
    ap.add_argument("--attention", choices=ATTENTION_MODES, default="mmca", help="random models only")
    ap.add_argument("--image_tokens", type=int, default=None, help="K per image for the random encoder "
                    "(a square; default 256 for llama7b-random, 16 for tiny)")
    ap.add_argument("--vision_layers", type=int, default=None, help="layers of the random CLIP (default 24 / 2)")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3, help="whole conversations measured (after a warm-up one)")
    ap.add_argument("--warmup_rounds", type=int, default=None, help="rounds of the discarded warm-up conversation "
                    "(default: --rounds, so every sequence length has been seen once)")
    ap.add_argument("--new_tokens", type=int, default=32, help="answer tokens generated per round in the cached run")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON here")
    args = ap.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    res = run(args)
    print(f"device: {res['device']}, torch {res['torch']}, date {res['date']}")
    print(f"model: {res['model']} (loaded in {res['load_s']:.1f} s); {res['rounds']} rounds, 1 new image each, "
          f"greedy, {res['new_tokens']} answer tokens per round; median of {res['repeats']} conversations"
          + (f"; peak GPU memory {res['peak_gpu_gb']:.1f} GiB" if res["peak_gpu_gb"] is not None else ""))
    print(table(res))
    last = res["rows"][-1]
    print(f"\nround {last['round']}: cached {1000 * last['ttft_cached_s']:.1f} ms vs full recompute "
          f"{1000 * last['ttft_full_s']:.1f} ms ({last['full_over_cached']:.1f}x)")
    write_json(args.json, res)
    return res


if __name__ == "__main__":
    main()
