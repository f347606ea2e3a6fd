"""Training throughput of the frozen-LM recipe: tokens/s and MFU of one DeepSpeed training step, with
gradient checkpointing off and on (both measured in one process).

GPU (one H100), a LLaMA-2-7B-shaped random LM, 4096-token samples, bf16, ZeRO-2::

    python bench/train_throughput.py --model llama7b-random --seq_len 4096 --precision bf16 --zero_stage 2 \
        --steps 5 --warmup 2 --json bench/results/train-throughput-h100.json

CPU smoke run (tiny random LLaMA, ZeRO-2 on the gloo backend in this one process)::

    python bench/train_throughput.py --model tiny --seq_len 256 --steps 2 --warmup 1 --precision fp32

What runs is the trainer's own step (``visualchat_train/trainer.py``): its flags are parsed by ``visualchat_train.cli.parse_args``
(``--engine deepspeed --zero_stage Z --precision P [--gradient_checkpointing]``), checked by
``visualchat_train.trainer.preflight``, the DeepSpeed config comes from ``visualchat_train.trainer.deepspeed_config``, the
process group from ``visualchat_train.dist.init`` (nccl on CUDA, gloo on CPU), the model is
``visualchat.model.VisualChatModel`` wrapped in ``visualchat_train.trainer.TrainModule``, checkpointing is
``visualchat_train.trainer.enable_gradient_checkpointing``, and a step is ``loss, n = engine(**batch);
engine.backward(loss); engine.step()`` with the trainer's AdamW + LambdaLR handed to
``deepspeed.initialize``. Only the LM is not loaded from disk: a random ``LlamaForCausalLM`` with
LLaMA-2-7B shapes is built directly on the GPU (a 7B checkpoint would cost 13-27 GB of disk and
minutes). The batch is what the trainer's collate gives with cached encoder features (the default for
image data sets): per sample ``--images`` images of K tokens (random fp16 features) interleaved with
text, labels only on the answer tokens (``--answer_frac`` of each text chunk). The frozen encoder sits
on the device as in the trainer but does not run (features are cached).

Recipe: LM and encoder frozen; trainable = projection (d_vis x h) + the input-embedding copy (V x h);
gradients flow through the frozen LM to its inputs; the LM head runs only at answer positions.

FLOPs per step (B samples of N tokens; L layers, hidden h, h_q = heads x head_dim, V vocab, d_vis;
P_mm = weights of the decoder layers' matmuls, e.g. L (4 h^2 + 3 h i) for LLaMA-2-7B = 6.48e9;
n_ans answer tokens and n_img image tokens per sample)::

    model FLOPs = B * [ 2 P_mm N          forward matmuls
                      + 2 P_mm N          backward matmuls: input gradients only (weights frozen, no dW)
                      + 2 L N^2 h_q       forward causal attention: QK^T and PV, 2 * 2 N^2 h_q * 1/2
                      + 4 L N^2 h_q       backward attention: dQ, dK, dV, dP = 2 x forward
                      + 4 V h n_ans       LM head at answer positions: forward + input gradient
                      + 4 d_vis h n_img ] projection: forward + weight gradient (its input is frozen)
    hardware FLOPs = model FLOPs + B * [2 P_mm N + 2 L N^2 h_q]   with gradient checkpointing
                                                                  (every decoder layer's forward again)

(A trainable LM would cost 6 P N + attention; the frozen LM saves the 2 P N of weight gradients.)
Attention is counted as causal attention over all N tokens, the usual convention; MMCA's image
queries attend only to themselves, so the kernels do somewhat less than counted. MFU = model FLOPs /
step time / peak; HFU uses hardware FLOPs. Peak: ``--peak_tflops``, else by device name (H100 SXM /
H200: 989 bf16 dense TFLOP/s, H100 PCIe: 756, A100: 312); on CPU give the flag or MFU is "n/a".
tokens/s = B x N / median step time (all tokens, image slots included, as the trainer counts them);
steps are timed after ``--warmup`` steps (``torch.cuda.synchronize`` around each). Peak GPU memory =
``torch.cuda.max_memory_allocated`` over each configuration's steps (model, optimizer state and
activations included).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import write_json  # noqa: E402
from visualchat.config import ATTENTION_MODES  # noqa: E402

PEAKS = [("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0), ("A100", 312.0)]


def default_peak(dev: torch.device) -> float | None:
    if dev.type != "cuda":
        return None
    name = torch.cuda.get_device_name(dev)
    for key, tflops in PEAKS:
        if key in name:
            return tflops
    return None


def sample_layout(n: int, images: int, k: int, answer_frac: float):
    """(is_image [N], is_answer [N]): ``images`` chunks of [K image tokens][question][answer]."""
    is_img = torch.zeros(n, dtype=torch.bool)
    is_ans = torch.zeros(n, dtype=torch.bool)
    chunk = n // images
    if chunk <= k:
        raise SystemExit(f"--seq_len {n} is too short for {images} images of {k} tokens")
    for i in range(images):
        s = i * chunk
        e = n if i == images - 1 else s + chunk
        is_img[s:s + k] = True
        n_ans = max(1, int(round(answer_frac * (e - s - k))))
        is_ans[e - n_ans:e] = True
    return is_img, is_ans


def make_batch(b, n, images, k, d_vis, vocab, answer_frac, dev, seed=0):
    """What ``Batcher.collate`` returns for B samples with cached features (n_tokens popped)."""
    from visualchat.template import IGNORE_INDEX

    g = torch.Generator().manual_seed(seed)
    is_img, is_ans = sample_layout(n, images, k, answer_frac)
    ids = torch.randint(3, vocab, (b, n), generator=g)
    labels = torch.where(is_ans[None], ids, torch.full_like(ids, IGNORE_INDEX))
    feats = torch.randn(b * images, k, d_vis, generator=g).to(torch.float16)
    batch = {"input_ids": ids, "is_image": is_img[None].expand(b, n).clone(), "padding_mask": None,
             "labels": labels, "image_feats": feats}
    return {key: (v.to(dev) if isinstance(v, torch.Tensor) else v) for key, v in batch.items()}, \
        int(is_ans.sum()), int(is_img.sum())


def flops(lm, b, n, n_ans, n_img, d_vis) -> dict:
    """Model and hardware FLOPs per step (formula in the module docstring)."""
    cfg = lm.config
    layers = lm.get_decoder().layers
    p_mm = sum(m.weight.numel() for layer in layers for m in layer.modules() if isinstance(m, torch.nn.Linear))
    nl = len(layers)
    h = cfg.hidden_size
    hq = cfg.num_attention_heads * (getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads)
    v = lm.get_output_embeddings().weight.shape[0]
    terms = {"fwd_matmul": 2 * p_mm * n, "bwd_matmul_input_grad": 2 * p_mm * n,
             "fwd_attention_causal": 2 * nl * n * n * hq, "bwd_attention": 4 * nl * n * n * hq,
             "head_at_answers": 4 * v * h * n_ans, "projection": 4 * d_vis * h * n_img}
    model = b * sum(terms.values())
    recompute = b * (2 * p_mm * n + 2 * nl * n * n * hq)
    return {"p_mm": p_mm, "terms_per_sample": terms, "model_flops": model, "recompute_flops": recompute}


def build_frozen_parts(args, dev, dtype):
    """(LM, encoder): random, built directly on ``dev`` in ``dtype``."""
    from bench.prefix_cache import CLIP_L, CLIP_TINY, LLAMA7B, TINY, random_clip_encoder, random_llama

    if args.model == "llama7b-random":
        lm = random_llama(LLAMA7B, None, dev, dtype)
        enc = random_clip_encoder(dict(CLIP_L, num_hidden_layers=args.vision_layers or 24), args.image_tokens or 256,
                                  dev, dtype)
    else:
        lm = random_llama(dict(TINY, vocab_size=512), None, dev, dtype)
        enc = random_clip_encoder(dict(CLIP_TINY, num_hidden_layers=args.vision_layers or 2), args.image_tokens or 16,
                                  dev, dtype)
    return lm, enc


def trainer_args(args, gc_on: bool, out_dir: str):
    from visualchat_train.cli import parse_args

    flags = ["--engine", "deepspeed", "--zero_stage", str(args.zero_stage), "--precision", args.precision,
             "--per_device_batch_size", str(args.batch), "--grad_accum_steps", "1", "--max_seq_len", str(args.seq_len),
             "--attention", args.attention, "--resume", "none", "--output_dir", out_dir, "--no_progress",
             "--max_steps", str(args.warmup + args.steps)]
    return parse_args(flags + (["--gradient_checkpointing"] if gc_on else []))


def measure(args, lm, enc, gc_on: bool, dev, out_dir: str) -> dict:
    """One configuration: the trainer's module, optimiser and DeepSpeed engine; timed steps."""
    import deepspeed

    from visualchat_train import dist as D
    from visualchat_train.trainer import TrainModule, deepspeed_config, enable_gradient_checkpointing, lr_lambda, preflight
    from visualchat.model import VisualChatModel

    targs = trainer_args(args, gc_on, out_dir)
    plan = preflight(targs)
    D.init("gloo" if dev.type == "cpu" else None)  # the trainer's one-process group (nccl on CUDA)
    torch.manual_seed(targs.seed)  # the projection's initialisation, as in build_model
    vcm = VisualChatModel(lm, enc, targs.attention)  # fresh trainable projection + embedding copy
    wrapped = enable_gradient_checkpointing(vcm.lm) if targs.gradient_checkpointing else 0
    module = TrainModule(vcm)
    params = [p for p in module.parameters() if p.requires_grad]
    total = targs.max_steps
    opt = torch.optim.AdamW(params, lr=targs.lr, betas=plan.betas, weight_decay=targs.weight_decay, eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total, int(round(targs.warmup_ratio * total)),
                                                             targs.scheduler))
    cfg = deepspeed_config(targs, plan)
    engine, opt, _, sched = deepspeed.initialize(model=module, optimizer=opt, model_parameters=params,
                                                 lr_scheduler=sched, config=cfg)
    module.train()
    batch, n_ans, n_img = make_batch(args.batch, args.seq_len, args.images, enc.num_tokens, enc.hidden_size,
                                     vcm.embed_tokens.num_embeddings, args.answer_frac, dev)
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        loss, n = engine(**batch)
        engine.backward(loss)
        engine.step()
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t
        losses.append(float(loss.detach()))
        if i >= args.warmup:
            times.append(dt)
    peak = torch.cuda.max_memory_allocated(dev) / 2 ** 30 if cuda else None
    trainable = sum(p.numel() for p in params)
    step = statistics.median(times)
    f = flops(lm, args.batch, args.seq_len, n_ans, n_img, enc.hidden_size)
    peak_tflops = args.peak_tflops or default_peak(dev)
    tokens = args.batch * args.seq_len
    row = {"gradient_checkpointing": gc_on, "checkpointed_layers": wrapped, "step_s": step, "step_s_all": times, "tokens_per_step": tokens,
           "tokens_per_s": tokens / step, "answer_tokens_per_sample": n_ans, "image_tokens_per_sample": n_img,
           "model_tflops_per_step": f["model_flops"] / 1e12,
           "hardware_tflops_per_step": (f["model_flops"] + (f["recompute_flops"] if gc_on else 0)) / 1e12,
           "achieved_model_tflops_per_s": f["model_flops"] / step / 1e12,
           "mfu": f["model_flops"] / step / 1e12 / peak_tflops if peak_tflops else None,
           "hfu": (f["model_flops"] + (f["recompute_flops"] if gc_on else 0)) / step / 1e12 / peak_tflops
           if peak_tflops else None,
           "peak_gpu_gb": peak, "trainable_params": trainable, "p_mm": f["p_mm"],
           "flop_terms_per_sample": f["terms_per_sample"], "losses": losses,
           "deepspeed_config": {k: cfg[k] for k in ("zero_optimization", "bf16", "fp16", "train_micro_batch_size_per_gpu")}}
    # free this configuration before the next (the frozen LM and encoder are shared)
    destroy = getattr(engine, "destroy", None)
    if destroy is not None:
        with contextlib.suppress(Exception):
            destroy()
    del engine, opt, sched, module, vcm, params, batch, loss
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


def run(args) -> dict:
    dev = torch.device("cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu")
    if dev.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's CPU accelerator (as the trainer's tests do)
        if args.threads:
            torch.set_num_threads(args.threads)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    with contextlib.suppress(Exception):
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    t = time.perf_counter()
    lm, enc = build_frozen_parts(args, dev, dtype)
    build_s = time.perf_counter() - t
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        # checkpointing wraps the layers in place (one way), so "off" is measured first
        for gc_on in sorted({g == "on" for g in args.gc}):
            rows.append(measure(args, lm, enc, gc_on, dev, tmp))
    import deepspeed

    cfg = lm.config
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else \
        f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    n_lm = sum(p.numel() for p in lm.parameters())
    return {"device": name, "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "model": f"{args.model}: random LLaMA ({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
                     f"{cfg.num_attention_heads} heads, MLP {cfg.intermediate_size}, vocab {cfg.vocab_size}; "
                     f"{params_str(n_lm)} parameters), frozen; K = {enc.num_tokens}, d_vis = {enc.hidden_size}",
            "build_s": build_s, "seq_len": args.seq_len, "batch": args.batch, "images": args.images,
            "precision": args.precision, "zero_stage": args.zero_stage, "attention": args.attention,
            "peak_tflops": args.peak_tflops or default_peak(dev), "warmup": args.warmup, "steps": args.steps,
            "rows": rows}


def params_str(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


def fmt(x, spec, none="n/a"):
    return none if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.3g}%"


def table(res) -> str:
    lines = ["| gradient checkpointing | step (s) | tokens/s | model TFLOP/step | achieved TFLOP/s (model) | MFU | "
             "HFU (with recompute) | peak GPU memory (GiB) |", "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {'on' if r['gradient_checkpointing'] else 'off'} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | "
                     f"{r['model_tflops_per_step']:.3g} | {r['achieved_model_tflops_per_s']:.3g} | "
                     f"{pct(r['mfu'])} | {pct(r['hfu'])} | {fmt(r['peak_gpu_gb'], '.1f')} |")
    return "\n".join(lines)


FORMULA = ("model FLOPs/step = B*[4*P_mm*N + 6*L*N^2*h_q + 4*V*h*n_ans + 4*d_vis*h*n_img] "
           "(fwd 2PN + input-grad-only bwd 2PN; causal attention fwd 2LN^2h_q + bwd 4LN^2h_q; head at answers; "
           "projection); gradient checkpointing adds B*[2*P_mm*N + 2*L*N^2*h_q] (HFU only)")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=("llama7b-random", "tiny"), default="llama7b-random")
    ap.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    ap.add_argument("--seq_len", type=int, default=4096, help="tokens per sample N")
    ap.add_argument("--batch", type=int, default=1, help="samples per micro-batch B (one micro-batch per step)")
    ap.add_argument("--images", type=int, default=8, help="images per sample")
    ap.add_argument("--image_tokens", type=int, default=None, help="K (a square; default 256 for llama7b-random, 16 for tiny)")
    ap.add_argument("--vision_layers", type=int, default=None, help="layers of the (idle) random CLIP encoder")
    ap.add_argument("--answer_frac", type=float, default=0.5, help="share of each text chunk that is answer (labels)")
    ap.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default="bf16")
    ap.add_argument("--zero_stage", type=int, choices=(0, 1, 2, 3), default=2)
    ap.add_argument("--attention", choices=ATTENTION_MODES, default="mmca")
    ap.add_argument("--gc", nargs="+", choices=("off", "on"), default=["off", "on"], help="gradient checkpointing settings")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    ap.add_argument("--peak_tflops", type=float, default=None, help="peak dense TFLOP/s of the device for MFU "
                    "(default by device name: H100 SXM/H200 989, H100 PCIe 756, A100 312; none on CPU)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON here")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    res = run(args)
    print(f"device: {res['device']}, torch {res['torch']}, deepspeed {res['deepspeed']}, date {res['date']}")
    print(f"model: {res['model']}; N = {res['seq_len']} tokens x B = {res['batch']}, {res['images']} images per sample, "
          f"{res['precision']}, ZeRO-{res['zero_stage']}, {res['attention']}; median of {res['steps']} steps after "
          f"{res['warmup']} warm-up; peak {fmt(res['peak_tflops'], 'g')} TFLOP/s")
    r0 = res["rows"][0]
    print(f"P_mm = {r0['p_mm']:,}; {r0['answer_tokens_per_sample']} answer tokens and {r0['image_tokens_per_sample']} "
          f"image tokens per sample; trainable parameters {r0['trainable_params']:,}")
    print("FLOPs: " + FORMULA)
    print(table(res))
    write_json(args.json, res)
    return res


if __name__ == "__main__":
    main()
