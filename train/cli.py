"""``python -m train``: flags, presets (``--preset NAME`` from ``train/recipes/NAME.json``) and the
checks that run before any compute."""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

RECIPES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recipes")


def recipe_names() -> list[str]:
    return sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(RECIPES_DIR, "*.json")))


def load_recipe(name: str, _follow_alias: bool = True) -> dict:
    """The flag set of recipe ``name`` (a name in train/recipes/ or a path to a .json). A recipe
    ``{"alias": "other"}`` is another name for recipe ``other`` (which may not be an alias itself)."""
    path = name if name.endswith(".json") and os.path.isfile(name) else os.path.join(RECIPES_DIR, name + ".json")
    if not os.path.isfile(path):
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(recipe_names()) or 'none'}")
    with open(path) as f:
        recipe = json.load(f)
    if "alias" in recipe:
        if not _follow_alias:
            raise ValueError(f"{path}: an alias must name a recipe that is not an alias itself")
        return load_recipe(str(recipe["alias"]), _follow_alias=False)
    args = recipe.get("args", recipe)
    if not isinstance(args, dict):
        raise ValueError(f"{path}: 'args' must be an object of flag -> value")
    return {k.lstrip("-").replace("-", "_"): v for k, v in args.items()}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train",
        description="Train the projection and embedding (and LoRA adapters) of a VisualChat model and export "
                    "checkpoints that VisualChat.from_pretrained and the app load. Runs as is, under torchrun, "
                    "and under the deepspeed launcher.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", help="load a named flag set from train/recipes/ (" + ", ".join(recipe_names())
                   + "); flags given on the command line override it")

    g = p.add_argument_group("model")
    g.add_argument("--lm", default="default", help="HF id or local path of the causal LM, 'default' for the embedded "
                   "SmolLM2-135M-Instruct, or 'tiny[:seed]' for a tiny random LLaMA (tests)")
    g.add_argument("--vision", default="default", help="'default' (EfficientNet-Lite0), 'clip:<path>', "
                   "'qwen-vl:<path>', or 'tiny[:seed]' for a tiny random CLIP (tests)")
    g.add_argument("--attention", choices=("mmca", "causal"), default="mmca", help="multi-modal causal attention or plain causal")
    g.add_argument("--max_seq_len", type=int, default=4096, help="longest training sample in tokens; longer ones lose trailing rounds")
    g.add_argument("--max_images_per_sample", type=int, default=8, help="most images in one training sample")
    g.add_argument("--init_from", default=None, help="start the projection and embedding from this checkpoint directory "
                   "(e.g. a first-stage run's final/) instead of a random projection")
    g.add_argument("--vis_proj", default="linear",
                   help="the trainable projection from vision features to LM rows: linear (default), baseline "
                   "(Linear + LayerNorm, the original's), mlp (Linear, GELU, Linear: LLaVA-1.5's), perceiver[:N] (N "
                   "learned latents, default 16, cross-attend to the image's tokens: N rows per image)")
    g.add_argument("--projection_init_scale", type=float, default=1.0,
                   help="multiply the projection's random initialisation by this (e.g. 0.001: image tokens start "
                   "near zero; see bench/RESULTS.md for what that did to MMCA's start)")
    g.add_argument("--projection_init", choices=("random", "grounded"), default="random",
                   help="'grounded': before training, fit the projection by least squares so each image token of a "
                   "shapes scene lands near the LM's embedding of the words it shows (train/grounding.py; needs shapes "
                   "scenes in the training data)")
    g.add_argument("--trust_remote_code", action="store_true", help="allow the LM's own code from the hub")

    g = p.add_argument_group("data")
    g.add_argument("--data_path", default=None, help="root of the data sets (see train/data/__init__.py); not needed for shapes")
    g.add_argument("--dataset_names", nargs="+", default=["shapes"], help="data sets to blend (space or comma separated)")
    g.add_argument("--dataset_samples", default="all", help="'all', a count for every set, or name:count,... "
                   "(for shapes: how many conversations to generate; 'all' = 2000; another set given a count of its own "
                   "above its size, e.g. jsonl:3000, repeats its training share)")
    g.add_argument("--dataset_concatenate_samples", default="paper", help="conversations packed into one training sample: "
                   "'paper' (llava 3, llava_dial 2, others 1), a number, or name:count,...")
    g.add_argument("--concatenate_draw", choices=("exact", "random"), default="exact",
                   help="'exact': every sample packs the --dataset_concatenate_samples count of conversations; "
                   "'random': a random 1..count per sample, drawn once per run with --seed (the original's "
                   "DST.random_grouping, which gives the paper's Table 1 counts)")
    g.add_argument("--over_max_images", choices=("cut", "drop"), default="cut",
                   help="a conversation with more than --max_images_per_sample images: 'cut' keeps it within the "
                   "limit (trailing rounds go; MIMIC-IT frames are spread evenly), 'drop' leaves it out (the paper)")
    g.add_argument("--missing_image", choices=("skip_sample", "drop_image"), default="skip_sample",
                   help="an image id missing from a MIMIC-IT SD/SN/TVC/VST images file: leave the sample out, or "
                   "leave just that image out (the original; the paper). An image file missing on disk always "
                   "leaves its sample out")
    g.add_argument("--blend_llava_per_image", default="1", help="llava_otter_blend: LLaVA conversations per CGD "
                   "image, a count or 'random' (1..all of them, the original's draw)")
    g.add_argument("--blend_cgd_questions", default="all", help="llava_otter_blend: CGD questions per group, "
                   "'all', a count or 'random' (1..all, the original's draw)")
    g.add_argument("--skip_bad_lines", action="store_true", help="jsonl: a malformed line is logged with its file "
                   "and line number, left out and counted instead of stopping the run")
    g.add_argument("--data_debug_path", default=None, help="write a few training samples per data set as the model "
                   "sees them (rendered prompt with image slots numbered, label mask, image references) to this "
                   "folder, then train as usual")
    g.add_argument("--image_check", choices=("node", "every_rank"), default="node", help="check that every image "
                   "opens before training: 'node' opens each once per node (local rank 0) and keeps the result in "
                   "~/.cache/visualchat/image_checks for later runs; 'every_rank': every process opens every image")
    g.add_argument("--data_workers", type=int, default=0, help="worker processes that open and preprocess the "
                   "next micro-batches while the model trains (a torch DataLoader; 0: in the training process)")
    g.add_argument("--prefetch_factor", type=int, default=2, help="micro-batches each data worker keeps ready")
    g.add_argument("--val_ratio", type=float, default=0.1, help="share held out for validation (shapes: size of its validation split)")
    g.add_argument("--seed", type=int, default=1234, help="seed for data order, splits and initialisation")
    g.add_argument("--feature_cache", default="auto", help="cache the frozen encoder's features on disk: 'auto' (on for shapes), "
                   "'on' (all data sets, in ~/.cache/visualchat/features), 'off', or a directory")
    g.add_argument("--feature_workers", type=int, default=0, help="processes that open (or draw) images while the "
                   "feature cache fills (0: one per CPU core but one, at most 8; a pool starts only for "
                   "64+ images per worker)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    g.add_argument("--embedding_lr", type=float, default=None, help="peak learning rate of the input embedding "
                   "(default: --lr; 0 keeps the embedding frozen and trains the projection alone)")
    g.add_argument("--projection_lr", type=float, default=None, help="peak learning rate of the projection "
                   "(default: --lr; a grounded projection keeps its start only with a small one, e.g. 3e-4)")
    g.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--adam_betas", default="0.0,0.95", help="AdamW betas as b1,b2 (the paper's; the reference code used 0.9,0.95)")
    g.add_argument("--epochs", type=float, default=1, help="passes over the training samples (ignored with --max_steps)")
    g.add_argument("--per_device_batch_size", type=int, default=1, help="samples per micro-batch per process")
    g.add_argument("--grad_accum_steps", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--global_batch_size", type=int, default=0, help="samples per optimizer step over all processes; if set, "
                   "must be divisible by per_device_batch_size x processes and sets --grad_accum_steps")
    g.add_argument("--scheduler", choices=("cosine", "linear", "constant", "cosine_with_restarts", "polynomial"),
                   default="cosine", help="learning-rate schedule after warm-up (the original's transformers "
                   "schedulers; 'constant' keeps the warm-up, as its constant_with_warmup)")
    g.add_argument("--scheduler_cycles", type=float, default=1.0, help="cosine_with_restarts: number of hard restarts")
    g.add_argument("--scheduler_power", type=float, default=1.0, help="polynomial: decay power (1: linear)")
    g.add_argument("--warmup_ratio", type=float, default=0.1, help="share of the steps spent warming up linearly")
    g.add_argument("--warmup_steps", type=int, default=None, help="warm-up length in optimizer steps "
                   "(overrides --warmup_ratio)")
    g.add_argument("--max_steps", type=int, default=0, help="optimizer steps (0: from --epochs)")
    g.add_argument("--grad_clip", type=float, default=1.0, help="gradient-norm clipping (0: off)")

    g = p.add_argument_group("engine / DeepSpeed")
    g.add_argument("--engine", choices=("auto", "deepspeed", "torch"), default="auto",
                   help="'deepspeed' (ZeRO engine, any number of processes), 'torch' (plain PyTorch loop, one process; "
                   "with --precision bf16 the frozen LM runs in bf16 under autocast), 'auto': deepspeed when installed")
    g.add_argument("--zero_stage", type=int, choices=(0, 1, 2, 3), default=0, help="ZeRO stage")
    g.add_argument("--offload", choices=("none", "cpu"), default="none", help="offload the optimizer (and for stage 3 the parameters) to CPU")
    g.add_argument("--precision", choices=("fp32", "fp16", "bf16", "auto"), default="fp32",
                   help="training precision; 'auto': bf16 where the device supports it (CUDA, or a CPU with "
                   "AVX-512 bf16 / AMX), else fp32 (what ran is recorded in the checkpoint's config)")
    g.add_argument("--gradient_checkpointing", action="store_true", help="recompute LM layer activations in backward")
    g.add_argument("--deepspeed_config", default=None, help="a DeepSpeed JSON whose keys override the generated config")
    g.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher

    g = p.add_argument_group("adapters (peft)")
    g.add_argument("--lora_rank", type=int, default=0, help="LoRA rank for the LM (0: off)")
    g.add_argument("--lora_alpha", type=float, default=None, help="LoRA alpha for the LM (default 2 x rank)")
    g.add_argument("--lora_target_modules", default="q_proj,k_proj,v_proj,o_proj", help="LM modules that get LoRA (comma separated, or 'all-linear')")
    g.add_argument("--lora_dropout", type=float, default=0.0, help="LoRA dropout")
    g.add_argument("--vision_lora_rank", type=int, default=0, help="LoRA rank for the vision encoder (0: off)")
    g.add_argument("--vision_lora_alpha", type=float, default=None, help="LoRA alpha for the vision encoder (default 2 x rank)")
    g.add_argument("--vision_lora_target_modules", default="q_proj,k_proj,v_proj,out_proj", help="vision modules that get LoRA")
    g.add_argument("--qlora", action="store_true", help="4-bit LM base through bitsandbytes (needs --lora_rank > 0, ZeRO <= 2)")

    g = p.add_argument_group("bookkeeping")
    g.add_argument("--output_dir", default="runs/train", help="where checkpoints, metrics.jsonl and plots go")
    g.add_argument("--eval_batch_size", type=int, default=0, help="validation samples per micro-batch per process "
                   "(0: --per_device_batch_size)")
    g.add_argument("--eval_every", type=int, default=100, help="validation loss every N optimizer steps (0: only at the end)")
    g.add_argument("--save_every", type=int, default=0, help="resumable checkpoint every N steps (0: only at the end)")
    g.add_argument("--keep_checkpoints", type=int, default=2, help="how many resumable checkpoints to keep")
    g.add_argument("--resume", default="auto", help="'auto' (newest complete checkpoint in output_dir, if any), a checkpoint path, or 'none'")
    g.add_argument("--tensorboard", action="store_true", help="also log to TensorBoard (output_dir/tensorboard)")
    g.add_argument("--max_train_minutes", type=float, default=0, help="stop (checkpoint, evaluate, export) once training "
                   "has run this long (0: no limit); --resume auto continues later")
    g.add_argument("--fit_schedule_to_time", action="store_true", help="with --max_train_minutes: shorten the "
                   "schedule to the steps that fit in the time (measured after 10, 20, 40, ... steps), so the lr decay "
                   "ends on time instead of the run stopping mid-schedule")
    g.add_argument("--log_every", type=int, default=1, help="write metrics.jsonl every N steps")
    g.add_argument("--no_progress", action="store_true", help="no tqdm bar")
    g.add_argument("--sleep_per_step", type=float, default=0.0, help=argparse.SUPPRESS)  # tests: slow a run down to kill it
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    if pre.preset:
        try:
            preset = load_recipe(pre.preset)
        except ValueError as e:
            parser.error(str(e))
        known = {a.dest for a in parser._actions}
        unknown = sorted(set(preset) - known)
        if unknown:
            parser.error(f"preset {pre.preset!r} sets unknown flags: {', '.join(unknown)}")
        parser.set_defaults(**preset)
    args = parser.parse_args(argv)
    args.argv = argv
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from .trainer import TrainError, train

    try:
        train(args)
    except TrainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
