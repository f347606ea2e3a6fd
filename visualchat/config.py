"""Which LM, vision encoder, attention mode, K and template version a checkpoint uses (config.json)."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from .template import DEFAULT_SYSTEM, TEMPLATE_VERSION

CONFIG_NAME = "config.json"
FORMAT = "visualchat-checkpoint"

#: the attention modes: multi-modal causal attention (the paper's) or plain causal (the baseline)
AttentionMode = Literal["mmca", "causal"]
ATTENTION_MODES: tuple[str, ...] = get_args(AttentionMode)


@dataclass
class VisualChatConfig:
    lm: str = "default"  # HF id or local path, or "default" (the embedded SmolLM2-135M-Instruct)
    vision: str = "efficientnet-lite0"  # encoders.build_encoder spec
    attention: AttentionMode = "mmca"
    vis_proj: str = "linear"  # visualchat.projection spec; configs from before it existed are linear
    template_version: int = TEMPLATE_VERSION
    image_tokens: int = 49  # K
    vision_hidden_size: int = 1280  # d_vis
    lm_hidden_size: int = 576
    vocab_size: int = 49152
    max_images: int = 8
    max_seq_len: int | None = None  # None: the LM's max_position_embeddings
    system: str = DEFAULT_SYSTEM
    lora: dict[str, Any] | None = None  # peft LoraConfig kwargs when the checkpoint holds adapters
    concepts: dict[str, Any] | None = None  # the "words" projection's cells, heads and labels (else None)
    info: dict[str, Any] = field(default_factory=dict)  # provenance: hardware, time, data, command

    def __post_init__(self):
        self.validate()

    def validate(self, where: str = "config") -> None:
        """Check every field's type and range; the message names ``where`` and the field."""
        from .projection import parse_spec

        def bad(name, allowed):
            raise ValueError(f"{where}: field {name!r} is {getattr(self, name)!r}; allowed: {allowed}")

        for name in ("lm", "vision", "system"):
            if not isinstance(getattr(self, name), str) or (name != "system" and not getattr(self, name)):
                bad(name, "a non-empty string" if name != "system" else "a string")
        if self.attention not in ATTENTION_MODES:
            bad("attention", " or ".join(repr(m) for m in ATTENTION_MODES))
        try:
            parse_spec(self.vis_proj)
        except ValueError as e:
            raise ValueError(f"{where}: field 'vis_proj': {e}") from None
        for name, lo in (("template_version", 1), ("image_tokens", 1), ("vision_hidden_size", 1),
                         ("lm_hidden_size", 1), ("vocab_size", 1), ("max_images", 1)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                bad(name, f"an integer >= {lo} (a number, not a string)")
        if self.max_seq_len is not None and (not isinstance(self.max_seq_len, int) or isinstance(self.max_seq_len, bool)
                                             or self.max_seq_len < 1):
            bad("max_seq_len", "null or an integer >= 1")
        if (parse_spec(self.vis_proj)[0] == "words") != (self.concepts is not None):  # (the spec was checked above)
            bad("concepts", "an object of cells, heads and labels exactly when vis_proj is 'words', else null")
        if self.concepts is not None:
            from .projection import check_concepts

            try:
                check_concepts(self.concepts)
            except ValueError as e:
                raise ValueError(f"{where}: field 'concepts': {e}") from None
        if self.lora is not None and not isinstance(self.lora, dict):
            bad("lora", "null or an object of LoRA settings")
        if not isinstance(self.info, dict):
            bad("info", "an object")

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
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path} must hold a JSON object (a VisualChat checkpoint config), got a {type(d).__name__}")
        if d.pop("format", None) != FORMAT:
            raise ValueError(f"{path} is not a VisualChat checkpoint config (no \"format\": \"{FORMAT}\")")
        if d.get("template_version") != TEMPLATE_VERSION:
            raise ValueError(f"{path} uses template version {d.get('template_version')}, "
                             f"this code renders version {TEMPLATE_VERSION}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{path} has unknown fields {unknown}; is it from a newer VisualChat?")
        config = cls.__new__(cls)  # fill, then validate with the file's name in every message
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            setattr(config, f.name, d.get(f.name, default))
        config.validate(path)
        return config
