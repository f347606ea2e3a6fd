"""The trainer's settings as one typed dataclass, :class:`TrainConfig`.

Each field is one ``python -m visualchat_train`` flag (same name, ``--lm`` -> ``lm``): its type, its default and,
for a ``Literal``, its allowed values are written here once; ``visualchat_train/cli.py`` builds the flags from
these fields (adding the help text) and converts the parsed flags, recipe values included, into a
``TrainConfig`` at the command-line boundary. Everything after the CLI takes the dataclass.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Optional, Union, get_args, get_origin, get_type_hints

from visualchat.config import AttentionMode

Engine = Literal["auto", "deepspeed", "torch"]
Precision = Literal["fp32", "fp16", "bf16", "auto"]
Scheduler = Literal["cosine", "linear", "constant", "cosine_with_restarts", "polynomial"]
ZeroStage = Literal[0, 1, 2, 3]


@dataclass
class TrainConfig:
    # -- recipe
    preset: Optional[str] = None
    # -- model
    lm: str = "default"
    vision: str = "default"
    attention: AttentionMode = "mmca"
    max_seq_len: int = 4096
    max_images_per_sample: int = 8
    init_from: Optional[str] = None
    vis_proj: str = "linear"
    projection_init_scale: float = 1.0
    projection_init: Literal["random", "grounded"] = "random"
    trust_remote_code: bool = False
    # -- data
    data_path: Optional[str] = None
    dataset_names: list[str] = field(default_factory=lambda: ["shapes"])
    dataset_samples: str = "all"
    dataset_concatenate_samples: str = "paper"
    concatenate_draw: Literal["exact", "random"] = "exact"
    over_max_images: Literal["cut", "drop"] = "cut"
    missing_image: Literal["skip_sample", "drop_image"] = "skip_sample"
    blend_llava_per_image: str = "1"
    blend_cgd_questions: str = "all"
    skip_bad_lines: bool = False
    data_debug_path: Optional[str] = None
    image_check: Literal["node", "every_rank"] = "node"
    data_workers: int = 0
    prefetch_factor: int = 2
    val_ratio: float = 0.1
    seed: int = 1234
    feature_cache: str = "auto"
    feature_workers: int = 0
    # -- optimisation
    lr: float = 1e-3
    embedding_lr: Optional[float] = None
    projection_lr: Optional[float] = None
    aux_loss: float = 0.0
    detach_image_rows: bool = False
    aux_only: bool = False
    weight_decay: float = 0.0
    adam_betas: str = "0.0,0.95"
    epochs: float = 1
    per_device_batch_size: int = 1
    grad_accum_steps: int = 1
    global_batch_size: int = 0
    scheduler: Scheduler = "cosine"
    scheduler_cycles: float = 1.0
    scheduler_power: float = 1.0
    warmup_ratio: float = 0.1
    warmup_steps: Optional[int] = None
    max_steps: int = 0
    grad_clip: float = 1.0
    # -- engine / DeepSpeed
    engine: Engine = "auto"
    zero_stage: ZeroStage = 0
    offload: Literal["none", "cpu"] = "none"
    precision: Precision = "fp32"
    gradient_checkpointing: bool = False
    deepspeed_config: Optional[str] = None
    local_rank: Optional[int] = None  # set by the deepspeed launcher
    # -- adapters (peft)
    lora_rank: int = 0
    lora_alpha: Optional[float] = None
    lora_target_modules: str = "q_proj,k_proj,v_proj,o_proj"
    lora_dropout: float = 0.0
    lora_layers: int = 0
    vision_lora_rank: int = 0
    vision_lora_alpha: Optional[float] = None
    vision_lora_target_modules: str = "q_proj,k_proj,v_proj,out_proj"
    qlora: bool = False
    # -- bookkeeping
    output_dir: str = "runs/train"
    eval_batch_size: int = 0
    eval_every: int = 100
    save_every: int = 0
    keep_checkpoints: int = 2
    resume: str = "auto"
    tensorboard: bool = False
    max_train_minutes: float = 0
    fit_schedule_to_time: bool = False
    log_every: int = 1
    no_progress: bool = False
    sleep_per_step: float = 0.0  # tests: slow a run down to kill it
    # -- not a flag: the command line as given (recorded in the checkpoint's info)
    argv: list[str] = field(default_factory=list)

    @classmethod
    def from_dict(cls, values: dict, where: str = "the flags") -> "TrainConfig":
        """A config from flag name -> value (parsed flags, a recipe's values); an unknown name is an error
        that names ``where``."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"{where} set(s) unknown settings: {', '.join(unknown)}")
        return cls(**values)


#: the settings that are not command-line flags
NOT_FLAGS = ("argv",)


def field_spec(name: str) -> dict:
    """What ``argparse`` needs to know about field ``name``: its default, its value type, its choices
    (a ``Literal``'s values), whether it is a switch (``bool``) or a list (``nargs='+'``)."""
    f = {f.name: f for f in dataclasses.fields(TrainConfig)}[name]
    hint = get_type_hints(TrainConfig)[name]
    if get_origin(hint) is Union:  # Optional[X]
        hint = next(a for a in get_args(hint) if a is not type(None))
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    spec: dict = {"default": default}
    if hint is bool:
        spec["switch"] = True
    elif get_origin(hint) is Literal:
        choices = get_args(hint)
        spec["choices"] = choices
        if all(isinstance(c, int) for c in choices):
            spec["type"] = int
    elif get_origin(hint) is list:
        spec["nargs"] = "+"
    elif hint in (int, float):
        spec["type"] = hint
    return spec
