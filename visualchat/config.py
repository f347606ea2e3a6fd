"""Which LM, vision encoder, attention mode, K and template version a checkpoint uses (config.json)."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from .template import DEFAULT_SYSTEM, TEMPLATE_VERSION

CONFIG_NAME = "config.json"
FORMAT = "visualchat-checkpoint"


@dataclass
class VisualChatConfig:
    lm: str = "default"  # HF id or local path, or "default" (the embedded SmolLM2-135M-Instruct)
    vision: str = "efficientnet-lite0"  # encoders.build_encoder spec
    attention: str = "mmca"  # "mmca" | "causal"
    template_version: int = TEMPLATE_VERSION
    image_tokens: int = 49  # K
    vision_hidden_size: int = 1280  # d_vis
    lm_hidden_size: int = 576
    vocab_size: int = 49152
    max_images: int = 8
    max_seq_len: int | None = None  # None: the LM's max_position_embeddings
    system: str = DEFAULT_SYSTEM
    lora: dict[str, Any] | None = None  # peft LoraConfig kwargs when the checkpoint holds adapters
    info: dict[str, Any] = field(default_factory=dict)  # provenance: hardware, time, data, command

    def __post_init__(self):
        if self.attention not in ("mmca", "causal"):
            raise ValueError(f"attention must be 'mmca' or 'causal', got {self.attention!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, **dataclasses.asdict(self)}

    def save(self, directory: str) -> None:
        with open(os.path.join(directory, CONFIG_NAME), "w") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")

    @classmethod
    def load(cls, directory: str) -> "VisualChatConfig":
        path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no VisualChat checkpoint at {directory!r}: {CONFIG_NAME} is missing")
        with open(path) as f:
            d = json.load(f)
        if d.pop("format", None) != FORMAT:
            raise ValueError(f"{path} is not a VisualChat checkpoint config (no \"format\": \"{FORMAT}\")")
        if d.get("template_version") != TEMPLATE_VERSION:
            raise ValueError(f"{path} uses template version {d.get('template_version')}, "
                             f"this code renders version {TEMPLATE_VERSION}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{path} has unknown fields {unknown}; is it from a newer VisualChat?")
        return cls(**d)
