"""``python -m visualchat_train``: flags, presets (``--preset NAME`` from ``visualchat_train/recipes/NAME.json``) and the
checks that run before any compute."""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

from .config import TrainConfig, field_spec

RECIPES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recipes")


def recipe_names() -> list[str]:
    return sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(RECIPES_DIR, "*.json")))


def load_recipe(name: str, _follow_alias: bool = True) -> dict:
    """The flag set of recipe ``name`` (a name in visualchat_train/recipes/ or a path to a .json). A recipe
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


def flag(group, name: str, help: str) -> None:
    """Add flag ``name`` for the :class:`~visualchat_train.config.TrainConfig` field of the same name: its default,
    type and choices come from the field, the help text from here."""
    spec = field_spec(name.lstrip("-"))
    if spec.pop("switch", False):
        group.add_argument(name, action="store_true", help=help)
        return
    group.add_argument(name, help=help, **spec)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m visualchat_train",
        description="Train the projection and embedding (and LoRA adapters) of a VisualChat model and export "
                    "checkpoints that VisualChat.from_pretrained and the app load. Runs as is, under torchrun, "
                    "and under the deepspeed launcher.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    flag(p, "--preset", help="load a named flag set from visualchat_train/recipes/ (" + ", ".join(recipe_names())
                   + "); flags given on the command line override it")

    g = p.add_argument_group("model")
    flag(g, "--lm", help="HF id or local path of the causal LM, 'default' for the embedded "
            "SmolLM2-135M-Instruct, or 'tiny[:seed]' for a tiny random LLaMA (tests)")
    flag(g, "--vision", help="'default' (EfficientNet-Lite0), 'clip:<path>', "
            "'qwen-vl:<path>', or 'tiny[:seed]' for a tiny random CLIP (tests)")
    flag(g, "--attention", help="multi-modal causal attention or plain causal")
    flag(g, "--max_seq_len", help="longest training sample in tokens; longer ones lose trailing rounds")
    flag(g, "--max_images_per_sample", help="most images in one training sample")
    flag(g, "--init_from", help="start the projection and embedding from this checkpoint directory "
            "(e.g. a first-stage run's final/) instead of a random projection; its LoRA adapters, if any, are "
            "continued (the run must ask for the same --lora_rank/--lora_layers/--lora_target_modules)")
    flag(g, "--vis_proj", help="the trainable projection from vision features to LM rows: linear (default), baseline "
            "(Linear + LayerNorm, the original's), mlp (Linear, GELU, Linear: LLaVA-1.5's), perceiver[:N] (N "
            "learned latents, default 16, cross-attend to the image's tokens: N rows per image)")
    flag(g, "--projection_init_scale", help="multiply the projection's random initialisation by this (e.g. 0.001: image tokens start "
            "near zero; see bench/RESULTS.md for what that did to MMCA's start)")
    flag(g, "--projection_init", help="'grounded': before training, fit the projection by least squares so each image token of a "
            "shapes scene lands near the LM's embedding of the words it shows (visualchat_train/grounding.py; needs shapes "
            "scenes in the training data)")
    flag(g, "--trust_remote_code", help="allow the LM's own code from the hub")

    g = p.add_argument_group("data")
    flag(g, "--data_path", help="root of the data sets (see visualchat_train/data/__init__.py); not needed for shapes")
    flag(g, "--dataset_names", help="data sets to blend (space or comma separated)")
    flag(g, "--dataset_samples", help="'all', a count for every set, or name:count,... "
            "(for shapes: how many conversations to generate; 'all' = 2000; another set given a count of its own "
            "above its size, e.g. jsonl:3000, repeats its training share)")
    flag(g, "--dataset_concatenate_samples", help="conversations packed into one training sample: "
            "'paper' (llava 3, llava_dial 2, others 1), a number, or name:count,...")
    flag(g, "--concatenate_draw", help="'exact': every sample packs the --dataset_concatenate_samples count of conversations; "
            "'random': a random 1..count per sample, drawn once per run with --seed (the original's "
            "DST.random_grouping, which gives the paper's Table 1 counts)")
    flag(g, "--over_max_images", help="a conversation with more than --max_images_per_sample images: 'cut' keeps it within the "
            "limit (trailing rounds go; MIMIC-IT frames are spread evenly), 'drop' leaves it out (the paper)")
    flag(g, "--missing_image", help="an image id missing from a MIMIC-IT SD/SN/TVC/VST images file: leave the sample out, or "
            "leave just that image out (the original; the paper). An image file missing on disk always "
            "leaves its sample out")
    flag(g, "--blend_llava_per_image", help="llava_otter_blend: LLaVA conversations per CGD "
            "image, a count or 'random' (1..all of them, the original's draw)")
    flag(g, "--blend_cgd_questions", help="llava_otter_blend: CGD questions per group, "
            "'all', a count or 'random' (1..all, the original's draw)")
    flag(g, "--skip_bad_lines", help="jsonl: a malformed line is logged with its file "
            "and line number, left out and counted instead of stopping the run")
    flag(g, "--data_debug_path", help="write a few training samples per data set as the model "
            "sees them (rendered prompt with image slots numbered, label mask, image references) to this "
            "folder, then train as usual")
    flag(g, "--image_check", help="check that every image "
            "opens before training: 'node' opens each once per node (local rank 0) and keeps the result in "
            "~/.cache/visualchat/image_checks for later runs; 'every_rank': every process opens every image")
    flag(g, "--data_workers", help="worker processes that open and preprocess the "
            "next micro-batches while the model trains (a torch DataLoader; 0: in the training process)")
    flag(g, "--prefetch_factor", help="micro-batches each data worker keeps ready")
    flag(g, "--val_ratio", help="share held out for validation (shapes: size of its validation split)")
    flag(g, "--seed", help="seed for data order, splits and initialisation")
    flag(g, "--feature_cache", help="cache the frozen encoder's features on disk: 'auto' (on for shapes), "
            "'on' (all data sets, in ~/.cache/visualchat/features), 'off', or a directory")
    flag(g, "--feature_workers", help="processes that open (or draw) images while the "
            "feature cache fills (0: one per CPU core but one, at most 8; a pool starts only for "
            "64+ images per worker)")

    g = p.add_argument_group("optimisation")
    flag(g, "--lr", help="peak learning rate")
    flag(g, "--embedding_lr", help="peak learning rate of the input embedding "
            "(default: --lr; 0 keeps the embedding frozen and trains the projection alone)")
    flag(g, "--projection_lr", help="peak learning rate of the projection "
            "(default: --lr; a grounded projection keeps its start only with a small one, e.g. 3e-4)")
    flag(g, "--aux_loss", help="weight of the 'words' projection's per-cell label loss, added to the answers' loss "
            "for every image whose data set labels its cells (shapes); 0: off (real data has no labels)")
    flag(g, "--aux_only", help="a perception stage: train the 'words' projection's heads on their per-cell labels "
            "alone (no LM forward, minutes on a CPU); a later run starts from it with --init_from DIR --projection_lr 0")
    flag(g, "--detach_image_rows", help="the answers' loss does not reach the projection (it learns from "
            "--aux_loss alone), so the backward need not run through the LM below its lowest trained layer")
    flag(g, "--weight_decay", help="AdamW weight decay")
    flag(g, "--adam_betas", help="AdamW betas as b1,b2 (the paper's; the reference code used 0.9,0.95)")
    flag(g, "--epochs", help="passes over the training samples (ignored with --max_steps)")
    flag(g, "--per_device_batch_size", help="samples per micro-batch per process")
    flag(g, "--grad_accum_steps", help="micro-batches per optimizer step")
    flag(g, "--global_batch_size", help="samples per optimizer step over all processes; if set, "
            "must be divisible by per_device_batch_size x processes and sets --grad_accum_steps")
    flag(g, "--scheduler", help="learning-rate schedule after warm-up (the original's transformers "
            "schedulers; 'constant' keeps the warm-up, as its constant_with_warmup)")
    flag(g, "--scheduler_cycles", help="cosine_with_restarts: number of hard restarts")
    flag(g, "--scheduler_power", help="polynomial: decay power (1: linear)")
    flag(g, "--warmup_ratio", help="share of the steps spent warming up linearly")
    flag(g, "--warmup_steps", help="warm-up length in optimizer steps "
            "(overrides --warmup_ratio)")
    flag(g, "--max_steps", help="optimizer steps (0: from --epochs)")
    flag(g, "--grad_clip", help="gradient-norm clipping (0: off)")

    g = p.add_argument_group("engine / DeepSpeed")
    flag(g, "--engine", help="'deepspeed' (ZeRO engine, any number of processes), 'torch' (plain PyTorch loop, one process; "
            "with --precision bf16 the frozen LM runs in bf16 under autocast), 'auto': deepspeed when installed")
    flag(g, "--zero_stage", help="ZeRO stage")
    flag(g, "--offload", help="offload the optimizer (and for stage 3 the parameters) to CPU")
    flag(g, "--precision", help="training precision; 'auto': bf16 where the device supports it (CUDA, or a CPU with "
            "AVX-512 bf16 / AMX), else fp32 (what ran is recorded in the checkpoint's config)")
    flag(g, "--gradient_checkpointing", help="recompute LM layer activations in backward")
    flag(g, "--deepspeed_config", help="a DeepSpeed JSON whose keys override the generated config")
    flag(g, "--local_rank", help=argparse.SUPPRESS)  # set by the deepspeed launcher

    g = p.add_argument_group("adapters (peft)")
    flag(g, "--lora_rank", help="LoRA rank for the LM (0: off)")
    flag(g, "--lora_alpha", help="LoRA alpha for the LM (default 2 x rank)")
    flag(g, "--lora_target_modules", help="LM modules that get LoRA (comma separated, or 'all-linear')")
    flag(g, "--lora_dropout", help="LoRA dropout")
    flag(g, "--lora_layers", help="LM LoRA on the top N decoder layers only (0: all); with a frozen input side "
            "(--embedding_lr 0 and --detach_image_rows) the backward stops below them")
    flag(g, "--vision_lora_rank", help="LoRA rank for the vision encoder (0: off)")
    flag(g, "--vision_lora_alpha", help="LoRA alpha for the vision encoder (default 2 x rank)")
    flag(g, "--vision_lora_target_modules", help="vision modules that get LoRA")
    flag(g, "--qlora", help="4-bit LM base through bitsandbytes (needs --lora_rank > 0, ZeRO <= 2)")

    g = p.add_argument_group("bookkeeping")
    flag(g, "--output_dir", help="where checkpoints, metrics.jsonl and plots go")
    flag(g, "--eval_batch_size", help="validation samples per micro-batch per process "
            "(0: --per_device_batch_size)")
    flag(g, "--eval_every", help="validation loss every N optimizer steps (0: only at the end)")
    flag(g, "--save_every", help="resumable checkpoint every N steps (0: only at the end)")
    flag(g, "--keep_checkpoints", help="how many resumable checkpoints to keep")
    flag(g, "--resume", help="'auto' (newest complete checkpoint in output_dir, if any), a checkpoint path, or 'none'")
    flag(g, "--tensorboard", help="also log to TensorBoard (output_dir/tensorboard)")
    flag(g, "--max_train_minutes", help="stop (checkpoint, evaluate, export) once training "
            "has run this long (0: no limit); --resume auto continues later")
    flag(g, "--fit_schedule_to_time", help="with --max_train_minutes: shorten the "
            "schedule to the steps that fit in the time (measured after 10, 20, 40, ... steps), so the lr decay "
            "ends on time instead of the run stopping mid-schedule")
    flag(g, "--log_every", help="write metrics.jsonl every N steps")
    flag(g, "--no_progress", help="no tqdm bar")
    flag(g, "--sleep_per_step", help=argparse.SUPPRESS)  # tests: slow a run down to kill it
    return p


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """The run's :class:`TrainConfig` from the command line (a ``--preset`` recipe's values are the
    defaults that the flags given override). The argparse result goes no further than here."""
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
    ns = vars(parser.parse_args(argv))
    ns.pop("help", None)
    return TrainConfig.from_dict({**ns, "argv": argv})


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    from .errors import TrainError
    from .trainer import train

    try:
        train(cfg)
    except TrainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
