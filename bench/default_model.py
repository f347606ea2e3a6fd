"""Load time, time to first token and decode tokens/s of the embedded default on this machine: the
plain path (fp32 weights, transformers' decode step) and the fast path (the LM's linear weights in
the format ``--dtype auto`` picks here, the lean decode step) side by side in one run, against the
memory-bandwidth limit measured in the same run.

    python bench/default_model.py [--cold] [--new_tokens 32] [--rounds 8] [--profile]

A decode step reads every weight of the LM once, so tokens/s <= copy bandwidth / bytes read per
token (the LM's linear weights in their format, plus the KV cache). The bandwidth is the machine's
measured copy rate (bytes read + bytes written per second, ``torch`` copies of 256 MiB buffers,
same thread count as the model). ``--profile`` adds where one decode step's time goes: the fast
path's step by section (wall time, ``LeanDecoder.tick``), and today's path by function (cProfile over
streamed tokens, grouped; shares, since cProfile inflates the Python-heavy parts).
--cold converts the GGUF into a fresh temporary cache first (the first start after install).
--llama_cpp adds the peer anchor: llama.cpp's own greedy decode of the same GGUF (the one
visualchat converts its default from) with the same thread count, after a text prompt as long as
round 1's, in the same table (its bytes per token: the GGUF's weights as stored, plus its f16 KV
cache). It needs ``llama-cpp-python``, installed for the benchmark only (not a dependency of the
app); built from source with the CPU's own instruction set:

    CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF" \
        CMAKE_BUILD_PARALLEL_LEVEL=2 nice -n 5 pip install --no-cache-dir llama-cpp-python

(about 12 minutes on a quiet 2-core machine). Without it, --llama_cpp says so and the rest runs as usual.
Prints Markdown tables for bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

QUESTIONS = ["What color is the star in Image 1?", "How many shapes are in Image 2?", "Which image has a circle?",
             "What is in Image 3?", "How many triangles are in Image 1?", "Is there a square in Image 2?",
             "What color is the circle in Image 2?"]


def copy_bandwidth(mib: int = 256, repeats: int = 8) -> float:
    """Bytes moved (read + written) per second by a large torch copy: the best of ``repeats``."""
    import torch

    n = mib * 2 ** 20 // 4
    a, b = torch.ones(n), torch.empty(n)
    b.copy_(a)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - t)
    return 2 * n * 4 / best


def weight_bytes(lm) -> int:
    """Bytes of the LM's linear weights as stored (what a decode step reads), whatever their format."""
    from torch import nn

    from visualchat.kernels import lowp

    total = 0
    for m in lm.modules():
        if type(m) is nn.Linear:
            total += m.weight.numel() * m.weight.element_size()
        elif isinstance(m, lowp.LowpLinear):
            size = {"fp16": 2, "bf16": 2}.get(m.fmt, 4)
            total += m.in_features * m.out_features * size
    return total


def kv_bytes(session) -> int:
    c = session._cache
    return sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in c.layers) if c is not None else 0


def matmul_calls(vc) -> list:
    """``(f, in_features)`` for each matrix product of one decode step, in the step's order: the lean
    step's own callables (fused q/k/v and gate/up, fbgemm's op) where it runs, else every linear layer
    of the LM (today's path: q, k, v, o, gate, up, down per layer, then the head)."""
    from torch import nn

    from visualchat.kernels import lean_decoder, lowp

    lean = lean_decoder(vc)
    if lean is not None:
        calls = []
        for _, qkv, o, _, _, gate_up, down in lean.layers:
            calls += [(qkv, lean.hidden), (o, lean.n_heads * lean.head_dim), (gate_up, lean.hidden),
                      (down, vc.model.lm.config.intermediate_size)]
        return calls + [(lean.head_fn, lean.hidden)]
    return [(m, m.in_features) for m in vc.model.lm.modules() if type(m) is nn.Linear or isinstance(m, lowp.LowpLinear)]


def matmuls_alone_s(vc, repeats: int = 15) -> float:
    """Seconds for one decode step's matrix products alone, back to back (no other work between them):
    the median of ``repeats``. What these kernels allow a step at best."""
    import torch

    calls = matmul_calls(vc)
    xs = {n: torch.randn(1, n) for n in {n for _, n in calls}}
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):
            t = time.perf_counter()
            for f, n in calls:
                f(xs[n])
            times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


def run_path(name: str, lm_weights: str | None, decode: str, new_tokens: int, rounds: int, ims) -> dict:
    """Load, then round 1 (3 images) and rounds 2..``rounds`` (no new image) of one conversation."""
    from visualchat.model import VisualChat

    os.environ["VISUALCHAT_DECODE"] = decode
    t = time.perf_counter()
    vc = VisualChat.from_pretrained(None, device="cpu", lm_weights=lm_weights)
    r = {"name": name, "load_s": time.perf_counter() - t, "weights": vc.lm_weights,
         "weight_bytes": weight_bytes(vc.model.lm)}
    s = vc.new_session()
    r["answer1"] = s.ask("Describe Image 1, Image 2 and Image 3.", images=ims, max_new_tokens=new_tokens)
    st = s.last_stats
    r.update(prompt_tokens=st["prefill_tokens"], ttft1_s=st["ttft_s"], new_tokens1=st["new_tokens"],
             session_tok_s=st["tokens_per_s"])
    for i in range(2, rounds + 1):
        s.ask(QUESTIONS[(i - 2) % len(QUESTIONS)], max_new_tokens=8)
        r["ttft_last_s"], r["fed_last"] = s.last_stats["ttft_s"], s.last_stats["prefill_tokens"]
    r["rounds"] = rounds
    # decode steps alone, after the whole conversation (the KV cache as long as round `rounds` left it)
    steps = []
    for tok in range(32):
        t = time.perf_counter()
        s._step(100 + tok)
        steps.append(time.perf_counter() - t)
    r["step_s"] = statistics.median(steps)
    r["matmuls_s"] = matmuls_alone_s(vc)
    r["kv_bytes"] = kv_bytes(s)
    r["ctx"] = len(s._cache_keys)
    r["vc"] = vc
    return r


# -- the peer anchor: llama.cpp on the same GGUF (--llama_cpp) ---------------------------------------
def gguf_bytes_per_token(tensor_bytes: dict[str, int]) -> int:
    """Bytes of GGUF weights a decode step reads, as stored (quantized blocks and their scales):
    every tensor once, except the token embedding when the file has its own output matrix (then a
    step reads one row of it; where the head is tied to the embedding, all of it is the head)."""
    total = sum(tensor_bytes.values())
    if "output.weight" in tensor_bytes and "token_embd.weight" in tensor_bytes:
        total -= tensor_bytes["token_embd.weight"]
    return total


def gguf_tensor_bytes(path: str) -> dict[str, int]:
    """``{tensor name: bytes as stored}`` of a GGUF file (the ``gguf`` package transformers uses)."""
    from gguf import GGUFReader

    return {t.name: int(t.n_bytes) for t in GGUFReader(path).tensors}


def fit_prompt(tokenize, head: str, filler: str, tail: str, n: int) -> list[int]:
    """Token ids of ``head`` + as much of ``filler`` (repeated) as fits + ``tail``: exactly ``n``
    tokens, so that the anchor decodes after a prompt as long as the benchmark's round 1.
    ``tokenize(text) -> list[int]`` (llama.cpp's tokenizer; the test passes a fake one)."""
    a, c = tokenize(head), tokenize(tail)
    room = n - len(a) - len(c)
    if room < 0:
        raise ValueError(f"the prompt's fixed parts are {len(a) + len(c)} tokens, longer than n={n}")
    fill = tokenize(filler)
    if not fill and room:
        raise ValueError("filler text gives no tokens")
    body = (fill * (room // max(len(fill), 1) + 1))[:room]
    return a + body + c


def kv_f16_bytes(n_layers: int, n_kv_heads: int, head_dim: int, context: int) -> int:
    """Bytes of a float16 K and V cache over ``context`` tokens (llama.cpp's default cache type)."""
    return 2 * n_layers * n_kv_heads * head_dim * context * 2


def anchor_figures(step_s: list[float], stream_s: float, n_new: int, weight_bytes: int,
                   kv_bytes: int, bandwidth: float) -> dict:
    """The anchor's row values: decode tokens/s (median step; and over the whole answer), bytes per
    token, the bandwidth limit and the step's share of it. Same formulas as the two torch paths."""
    if not step_s or n_new < 1 or stream_s <= 0:
        raise ValueError("anchor_figures needs at least one timed step and a positive answer time")
    step = statistics.median(step_s)
    limit = bandwidth / (weight_bytes + kv_bytes)
    return {"step_s": step, "step_tok_s": 1 / step, "session_tok_s": n_new / stream_s,
            "weight_bytes": weight_bytes, "kv_bytes": kv_bytes, "limit_tok_s": limit,
            "share": (1 / step) / limit}


LLAMA_PROMPT = ("<|im_start|>user\n", "There are three pictures with shapes of several colours: circles, "
                "squares, stars and triangles on a white background. ",
                "Describe Image 1, Image 2 and Image 3.<|im_end|>\n<|im_start|>assistant\n")


def run_llama_cpp(n_prompt: int, new_tokens: int, threads: int) -> dict | str:
    """llama.cpp's greedy decode of the embedded default's GGUF: load, a text prompt of ``n_prompt``
    tokens, then ``new_tokens`` tokens (greedy, not stopped at EOS), each step timed. Returns the
    raw figures (:func:`anchor_figures` turns them into the table's), or a sentence saying why it
    did not run."""
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        return ("llama_cpp is not importable: install llama-cpp-python for the benchmark (see this "
                "script's docstring); the anchor was skipped")
    import numpy as np
    from llama_cpp import Llama

    from visualchat.assets import smollm2_gguf_path

    gguf = smollm2_gguf_path()
    t = time.perf_counter()
    llm = Llama(model_path=gguf, n_ctx=n_prompt + new_tokens + 16, n_threads=threads,
                n_threads_batch=threads, n_batch=512, verbose=False)
    load_s = time.perf_counter() - t
    prompt = fit_prompt(lambda s: llm.tokenize(s.encode(), add_bos=False, special=True), *LLAMA_PROMPT, n_prompt)
    n_vocab = llm.n_vocab()

    def greedy() -> int:  # the last position's logits (Llama.scores is only filled with logits_all)
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))))

    t = time.perf_counter()
    llm.eval(prompt)
    tok = greedy()
    ttft = time.perf_counter() - t
    out, steps = [tok], []
    t0 = time.perf_counter()
    for _ in range(new_tokens - 1):
        t = time.perf_counter()
        llm.eval([tok])
        tok = greedy()
        steps.append(time.perf_counter() - t)
        out.append(tok)
    stream_s = time.perf_counter() - t0
    meta = llm.metadata
    arch = meta.get("general.architecture", "llama")
    n_layers = int(meta[f"{arch}.block_count"])
    n_heads = int(meta[f"{arch}.attention.head_count"])
    n_kv = int(meta.get(f"{arch}.attention.head_count_kv", n_heads))
    head_dim = int(meta[f"{arch}.embedding_length"]) // n_heads
    ctx = llm.n_tokens
    import llama_cpp

    r = dict(steps=steps, stream_s=stream_s, n_new=len(steps), weight_bytes=gguf_bytes_per_token(gguf_tensor_bytes(gguf)),
             kv_bytes=kv_f16_bytes(n_layers, n_kv, head_dim, ctx), threads=threads)
    r.update(name=f"llama.cpp {llama_cpp.__version__} on the GGUF ({os.path.basename(gguf)})", load_s=load_s,
             ttft1_s=ttft, prompt_tokens=len(prompt), ctx=ctx,
             answer=llm.detokenize(out).decode("utf-8", "replace"))
    return r


def profile_decode(vc, ims, decode: str, new_tokens: int) -> list[tuple[str, float]]:
    """Shares of one streamed answer's decode time, grouped, from cProfile's cumulative times."""
    import cProfile
    import pstats

    os.environ["VISUALCHAT_DECODE"] = decode
    s = vc.new_session()
    s.ask("Describe Image 1, Image 2 and Image 3.", images=ims, max_new_tokens=2)
    gen = s.stream("What is in Image 1?", max_new_tokens=new_tokens)
    next(gen)  # the prefill and the first token: not part of the decode profile
    pr = cProfile.Profile()
    pr.enable()
    for _ in gen:
        pass
    pr.disable()
    st = pstats.Stats(pr).stats  # {(file, line, func): (cc, nc, tt, ct, callers)}

    def cum(pred) -> float:
        return sum(v[3] for k, v in st.items() if pred(k))

    def self_(pred) -> float:
        return sum(v[2] for k, v in st.items() if pred(k))

    total = sum(v[2] for v in st.values())
    from transformers.models.llama import modeling_llama as ml

    from visualchat.kernels import lowp

    def at(fn):  # (file, first line) of a function, as cProfile keys it
        code = fn.__code__
        return lambda k: k[0] == code.co_filename and k[1] == code.co_firstlineno

    updates = [v[3] for k, v in st.items() if "cache_utils" in k[0] and k[2] == "update"]
    groups = {
        # the innermost GEMM calls only (a fused group's parts call these too)
        "linear layers (the matmuls)": cum(lambda k: k[2] == "forward" and k[0].endswith(os.path.join("modules", "linear.py")))
        + sum(cum(at(cls.forward)) for cls in lowp.CLASSES.values()),
        "attention (MMCA)": cum(lambda k: k[2] == "mmca_attention"),
        # Cache.update (which holds the layer's update)
        "KV cache update": max(updates, default=0.0),
        "RMSNorm": cum(at(ml.LlamaRMSNorm.forward)) + cum(lambda k: k[2] == "rms_norm"),
        "rotary embedding (transformers' functions)": cum(at(ml.apply_rotary_pos_emb)) + cum(
            at(ml.LlamaRotaryEmbedding.forward.__wrapped__ if hasattr(ml.LlamaRotaryEmbedding.forward, "__wrapped__")
               else ml.LlamaRotaryEmbedding.forward)),
        "sampling": cum(lambda k: k[2] == "next_token"),
        "streaming (detokenize, stop marker)": cum(lambda k: k[2] == "push" and k[0].endswith("generation.py")),
    }
    rest = total - sum(groups.values())
    out = [(k, v / total) for k, v in groups.items()]
    out.append(("everything else (Python and small ops around the layers)", rest / total))
    return out


def section_profile(vc, ims, new_tokens: int) -> list[tuple[str, float]]:
    """Wall time per token of each section of the lean decode step (``LeanDecoder.tick``), over one
    streamed answer after the 3-image round, and what runs between steps (sampling, streaming, the
    session's bookkeeping). Milliseconds per token, in the order of the step."""
    from collections import Counter

    from visualchat.kernels import lean_decoder

    os.environ["VISUALCHAT_DECODE"] = "lean"
    s = vc.new_session()
    s.ask("Describe Image 1, Image 2 and Image 3.", images=ims, max_new_tokens=2)
    lean = lean_decoder(vc)
    acc, last, steps = Counter(), [0], [0]
    outside = "between steps: sampling, streaming, session bookkeeping"

    def tick(name):
        now = time.perf_counter_ns()
        acc[name] += now - last[0]
        last[0] = now

    def timed_step(*a, **k):
        tick(outside)
        steps[0] += 1
        return step(*a, **k)

    step = lean.step
    gen = s.stream("What is in Image 1? Describe it in detail.", max_new_tokens=new_tokens)
    next(gen)  # the prefill and the first token
    lean.tick, lean.step = tick, timed_step
    try:
        last[0] = time.perf_counter_ns()
        for _ in gen:
            pass
        tick(outside)
    finally:
        lean.tick = None
        del lean.step  # the class's method again
    n = max(steps[0], 1)
    return [(k, v / n / 1e6) for k, v in acc.items()]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cold", action="store_true", help="also time the first start (GGUF conversion)")
    ap.add_argument("--new_tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=8, help="the conversation's length; its last round's TTFT is reported")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--profile", action="store_true", help="also profile the decode step: the fast path by section, today's by function")
    ap.add_argument("--fast", default="auto", help="the fast path's LM weight format (default: what auto picks)")
    ap.add_argument("--llama_cpp", action="store_true",
                    help="add the peer anchor: llama.cpp's decode of the same GGUF (needs llama-cpp-python)")
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from PIL import Image

    cold = None
    if args.cold:
        with tempfile.TemporaryDirectory() as tmp:
            os.environ["VISUALCHAT_CACHE"] = tmp
            from visualchat.assets import default_lm_dir

            t = time.perf_counter()
            default_lm_dir()
            cold = time.perf_counter() - t
            del os.environ["VISUALCHAT_CACHE"]
    from visualchat.assets import ASSETS_DIR

    ims = [Image.open(os.path.join(ASSETS_DIR, "examples", f"shapes_{i}.png")) for i in (1, 2, 3)]
    bw = copy_bandwidth()
    paths = [run_path("today: fp32 weights, transformers decode step", None, "hf", args.new_tokens, args.rounds, ims),
             run_path("fast", args.fast, "lean", args.new_tokens, args.rounds, ims)]
    a, b = paths
    anchor = None
    if args.llama_cpp:  # the same prompt length, thread count and number of new tokens
        anchor = run_llama_cpp(a["prompt_tokens"], args.new_tokens, torch.get_num_threads())
        if isinstance(anchor, str):
            print(f"--llama_cpp: {anchor}")
            anchor = None
    bw = max(bw, copy_bandwidth())  # measured before and after; the better one is the machine's
    if anchor is not None:
        anchor.update(anchor_figures(anchor["steps"], anchor["stream_s"], anchor["n_new"], anchor["weight_bytes"],
                                     anchor["kv_bytes"], bw))
    b["name"] = f"fast: {b['weights']} weights, lean decode step"
    for p in paths:
        p["limit_tok_s"] = bw / (p["weight_bytes"] + p["kv_bytes"])
        p["step_tok_s"] = 1 / p["step_s"]
        p["matmuls_tok_s"] = 1 / p["matmuls_s"]

    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; device: "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}; copy bandwidth {bw / 1e9:.1f} GB/s (read + write)")
    if cold is not None:
        print(f"first start: GGUF -> HF conversion {cold:.1f} s")
    rows = [
        ("load (cached LM + encoder + checkpoint)", "load_s", "{:.2f} s"),
        (f"round 1, 3 images: time to first token ({a['prompt_tokens']} prompt tokens)", "ttft1_s", "{:.2f} s"),
        (f"round {a['rounds']}, no new image: time to first token (cached prefix; "
         f"{a['fed_last']} tokens fed)", "ttft_last_s", "{:.3f} s"),
        ("round 1 decode as the session streams it (tokens/s)", "session_tok_s", "{:.1f}"),
        (f"decode step alone at {a['ctx']} tokens of context (tokens/s, median of 32)", "step_tok_s", "{:.1f}"),
        ("the step's matrix products alone, back to back (tokens/s, median of 15)", "matmuls_tok_s", "{:.1f}"),
        ("bytes read per token (linear weights + KV cache)", None, None),
        ("bandwidth limit (tokens/s)", "limit_tok_s", "{:.1f}"),
        ("decode step / bandwidth limit", None, None),
        ("matrix products alone / bandwidth limit", None, "matmuls"),
    ]
    head = f"\n| measure | {a['name']} | {b['name']} | fast / today |"
    if anchor is not None:
        head += f" {anchor['name']} |"
    print(head + "\n|---|---|---|---|" + ("---|" if anchor is not None else ""))
    for label, key, fmt in rows:
        if key is None and label.startswith("bytes"):
            va, vb = (f"{(p['weight_bytes'] + p['kv_bytes']) / 1e6:.0f} MB" for p in paths)
            ratio = f"{(b['weight_bytes'] + b['kv_bytes']) / (a['weight_bytes'] + a['kv_bytes']):.2f}x"
            vc = f"{(anchor['weight_bytes'] + anchor['kv_bytes']) / 1e6:.0f} MB" if anchor else ""
        elif key is None and fmt == "matmuls":
            va, vb = (f"{100 * p['matmuls_tok_s'] / p['limit_tok_s']:.0f}%" for p in paths)
            ratio, vc = "", "-"
        elif key is None:
            va, vb = (f"{100 * p['step_tok_s'] / p['limit_tok_s']:.0f}%" for p in paths)
            ratio = ""
            vc = f"{100 * anchor['share']:.0f}%" if anchor else ""
        else:
            va, vb = fmt.format(a[key]), fmt.format(b[key])
            ratio = f"{b[key] / a[key]:.2f}x"
            vc = fmt.format(anchor[key]) if anchor and key in anchor else "-"
        print(f"| {label} | {va} | {vb} | {ratio} |" + (f" {vc} |" if anchor is not None else ""))
    if anchor is not None:
        print(f"\nllama.cpp anchor: {anchor['threads']} threads, a text prompt of {anchor['prompt_tokens']} tokens "
              f"(no images; its round-1 cell is that prompt's time to first token), then {anchor['n_new'] + 1} greedy "
              f"tokens; its decode step median at {anchor['ctx']} tokens of context (f16 KV cache); bytes per token: "
              f"the GGUF's weights as stored ({anchor['weight_bytes'] / 1e6:.1f} MB) + KV cache. "
              f"fast / llama.cpp decode step: {b['step_tok_s'] / anchor['step_tok_s']:.2f}x. "
              f"Its answer: {anchor['answer']!r}")
    print(f"\nround 1 answers: today {a['answer1']!r} ({a['new_tokens1']} tokens); fast {b['answer1']!r} "
          f"({b['new_tokens1']} tokens){' (same)' if a['answer1'] == b['answer1'] else ' (DIFFERENT)'}")
    if args.profile:
        rows = section_profile(b["vc"], ims, args.new_tokens)
        total = sum(v for _, v in rows)
        print(f"\nwhere a decode step's time goes, {b['name']} (wall time per token by section, "
              f"{total:.1f} ms per token in all):\n\n| section | ms per token | share |\n|---|---|---|")
        for k, v in rows:
            print(f"| {k} | {v:.2f} | {100 * v / total:.0f}% |")
        for p, decode in ((a, "hf"),):  # (the lean step's attention and KV append are inline: its sections above)
            print(f"\nwhere a decode step's time goes, {p['name']} (cProfile, shares):\n\n| part | share |\n|---|---|")
            for k, v in profile_decode(p["vc"], ims, decode, args.new_tokens):
                print(f"| {k} | {100 * v:.0f}% |")


if __name__ == "__main__":
    main()
