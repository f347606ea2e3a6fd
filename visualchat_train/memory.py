"""``python -m visualchat_train.memory``: the memory the model states need per GPU, from a config only (no weights).

Model states are parameters, gradients and optimiser states (activations, buffers and fragmentation
come on top). VisualChat trains only the projection, the embedding copy and LoRA weights; the LM and
the vision encoder are frozen, so they cost only their (half-precision) weights, which ZeRO-3
partitions over all GPUs (under ZeRO-3 from the moment they are loaded: the load peak is reported
too, and Qwen-VL's encoder is loaded partitioned the same way). Per trainable parameter, mixed-precision Adam keeps 2 (param) + 2 (grad) +
12 (fp32 master, m, v) bytes (fp32 training: 4 + 4 + 8); ZeRO-1 partitions the 12, ZeRO-2 also the
gradients, ZeRO-3 also the parameters (frozen ones included).

    python -m visualchat_train.memory --lm llama-2-70b --vision qwen-vl --zero_stage 3 --gpus 8 --nodes 2
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

GiB = 1024 ** 3

#: LLaMA-style shapes: hidden, layers, intermediate, vocab, heads, kv heads, tied embeddings.
KNOWN_LMS = {
    "llama-2-7b": (4096, 32, 11008, 32000, 32, 32, False),
    "llama-2-13b": (5120, 40, 13824, 32000, 40, 40, False),
    "llama-2-70b": (8192, 80, 28672, 32000, 64, 8, False),
    "default": (576, 30, 1536, 49152, 9, 3, True),  # SmolLM2-135M-Instruct
    "smollm2-135m": (576, 30, 1536, 49152, 9, 3, True),
    "tiny": (32, 2, 64, 512, 4, 2, True),
}
#: Vision encoders: (parameters, output width d_vis).
KNOWN_VISION = {
    "default": (4_652_008, 1280),  # EfficientNet-Lite0 (with its unused classifier)
    "efficientnet-lite0": (4_652_008, 1280),
    "qwen-vl": (1_940_000_000, 4096),  # Qwen-VL ViT-bigG + resampler (paper's encoder)
    "clip-vit-large-patch14": (303_179_776, 1024),
    "tiny": (20_000, 24),
}
ALIASES = {"meta-llama/Llama-2-7b-hf": "llama-2-7b", "meta-llama/Llama-2-13b-hf": "llama-2-13b",
           "meta-llama/Llama-2-70b-hf": "llama-2-70b", "openai/clip-vit-large-patch14": "clip-vit-large-patch14"}


@dataclass
class LMShape:
    hidden: int
    layers: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    tied: bool

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of the linear layers in one decoder layer."""
        h, kv = self.hidden, self.kv_heads * self.head_dim
        return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, self.intermediate), "up_proj": (h, self.intermediate), "down_proj": (self.intermediate, h)}

    def params(self) -> int:
        per_layer = sum(i * o for i, o in self.linear_shapes().values()) + 2 * self.hidden
        emb = self.vocab * self.hidden
        return emb * (1 if self.tied else 2) + self.layers * per_layer + self.hidden

    def largest_layer(self) -> int:
        return max(self.vocab * self.hidden, sum(i * o for i, o in self.linear_shapes().values()))


def zero3_unit(lm: LMShape) -> int:
    """Parameters of the largest unit ZeRO-3 gathers at once: one decoder layer's weights, or the
    embedding / LM head (whichever is larger: :meth:`LMShape.largest_layer`)."""
    return lm.largest_layer()


def zero3_live_settings(lm: LMShape) -> dict[str, int]:
    """The ZeRO-3 gathering limits the trainer writes into its DeepSpeed config, from the LM's shape.

    DeepSpeed's defaults (``stage3_max_live_parameters`` and ``stage3_max_reuse_distance`` 1e9) let a
    rank keep up to 10^9 gathered parameters alive: for a frozen LM whose backward runs through every
    layer (the trainable embedding sits at its input) a gathered layer is reused within 10^9
    parameters of traversal, so most of a 1 B LM stays gathered from its forward to its backward.
    Here: at most two units (:func:`zero3_unit`: a decoder layer or the embedding) alive, so the next
    unit is prefetched while one runs (capped at DeepSpeed's 10^9 for LMs whose unit is over 5 x 10^8,
    e.g. LLaMA-2-70B's 0.86 B-parameter layers: then one unit plus what fits beside it); a gathered unit is kept only when it is used again within one
    unit of traversal (gradient checkpointing's recompute right before its backward), otherwise it is
    released after use; prefetch one decoder layer ahead. The gradient bucket (``reduce_bucket_size``,
    DeepSpeed's default 5 x 10^8 elements, allocated whole under ZeRO-3: 1 GB in bf16 per GPU) is one
    unit: only the embedding copy, the projection and LoRA weights have gradients, and a larger
    tensor is reduced on its own. ``stage3_param_persistence_threshold`` stays
    DeepSpeed's (1e5: norms and biases stay whole on every rank). ``--deepspeed_config`` overrides."""
    unit = zero3_unit(lm)
    live = max(unit, min(2 * unit, 10 ** 9))  # never above DeepSpeed's default, never below one unit
    return {"stage3_max_live_parameters": live, "stage3_max_reuse_distance": unit,
            "stage3_prefetch_bucket_size": sum(i * o for i, o in lm.linear_shapes().values()),
            "reduce_bucket_size": unit}


def lm_shape(spec: str) -> LMShape:
    key = ALIASES.get(spec, spec).lower()
    if key in KNOWN_LMS:
        return LMShape(*KNOWN_LMS[key])
    if key.startswith("tiny"):
        return LMShape(*KNOWN_LMS["tiny"])
    try:  # a local path or a cached hub id: its config.json only, never the weights
        from transformers import AutoConfig

        path = spec
        if spec == "default":
            from visualchat.assets import default_lm_dir
            path = default_lm_dir()
        c = AutoConfig.from_pretrained(path)
        c = getattr(c, "text_config", c)
        return LMShape(c.hidden_size, c.num_hidden_layers, c.intermediate_size, c.vocab_size, c.num_attention_heads,
                       getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
                       bool(getattr(c, "tie_word_embeddings", False)))
    except Exception as e:
        raise SystemExit(f"cannot read a config for --lm {spec!r} ({e}); known without a download: "
                         + ", ".join(sorted(KNOWN_LMS)))


def vision_shape(spec: str) -> tuple[int, int]:
    key = spec.split(":", 1)[0] if spec.startswith("qwen-vl") else spec
    key = ALIASES.get(key, key)
    if key in KNOWN_VISION:
        return KNOWN_VISION[key]
    if spec.startswith("efficientnet-lite0:"):
        from visualchat.encoders.efficientnet import parse_taps, taps_width

        taps, grid = parse_taps(spec.split(":", 1)[1])
        return KNOWN_VISION["efficientnet-lite0"][0], taps_width(taps, grid)
    if spec.startswith("clip:"):
        try:
            from transformers import CLIPVisionConfig

            c = CLIPVisionConfig.from_pretrained(spec[5:])
            h, L, i = c.hidden_size, c.num_hidden_layers, c.intermediate_size
            return L * (4 * h * h + 2 * h * i) + (c.image_size // c.patch_size) ** 2 * h, h
        except Exception:
            return KNOWN_VISION["clip-vit-large-patch14"]
    raise SystemExit(f"unknown --vision {spec!r}; known: {', '.join(sorted(KNOWN_VISION))}, clip:<path>, "
                     "efficientnet-lite0:<taps>")


def estimate(lm: LMShape, vision: tuple[int, int], zero_stage: int, world: int, precision: str = "bf16",
             lora_rank: int = 0, lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj"),
             qlora: bool = False, offload: str = "none", vision_partitioned: bool = False) -> dict[str, float]:
    """Bytes per GPU (and per node's CPU for offload) of the model states. ``vision_partitioned``: the
    encoder is one that ZeRO-3 loads partitioned (:func:`visualchat_train.zero3.encoder_partitioned`)."""
    v_params, d_vis = vision
    proj = d_vis * lm.hidden + lm.hidden
    emb = lm.vocab * lm.hidden
    lora = 0
    if lora_rank:
        shapes = lm.linear_shapes()
        lora = lm.layers * sum(lora_rank * (shapes[t][0] + shapes[t][1]) for t in lora_targets if t in shapes)
    trainable = proj + emb + lora
    half = 4 if precision == "fp32" else 2
    frozen_lm_bytes = lm.params() * (0.5 + 0.03 if qlora else half)  # nf4 + its quantisation constants
    frozen_bytes = frozen_lm_bytes + v_params * half
    p_b, g_b, o_b = (4, 4, 8) if precision == "fp32" else (2, 2, 12)
    opt = trainable * o_b
    grads = trainable * g_b
    params_t = trainable * p_b
    frozen = frozen_bytes
    if zero_stage >= 1:
        opt /= world
    if zero_stage >= 2:
        grads /= world
    if zero_stage >= 3:
        params_t /= world
        frozen /= world
    cpu = 0.0
    if offload == "cpu":
        cpu += opt
        opt = 0.0
        if zero_stage == 3:
            cpu += params_t + frozen
            params_t = frozen = 0.0
    # ZeRO-3: the parameters gathered whole at once, bounded by the stage3_max_live_parameters the
    # trainer writes (zero3_live_settings: two layers' worth); DeepSpeed's buffers for them not counted
    gather = zero3_live_settings(lm)["stage3_max_live_parameters"] * half if zero_stage == 3 else 0
    return {"total_params": lm.params() + v_params + proj, "trainable_params": trainable, "frozen": frozen,
            "trainable_weights": params_t, "grads": grads, "optimizer": opt, "zero3_gather": gather,
            "per_gpu": frozen + params_t + grads + opt + gather, "cpu_offload_per_gpu": cpu,
            "load_peak": load_peak(lm, vision, zero_stage, world, precision, qlora, vision_partitioned)}


def load_peak(lm: LMShape, vision: tuple[int, int], zero_stage: int, world: int, precision: str = "bf16",
              qlora: bool = False, vision_partitioned: bool = False) -> float:
    """Bytes per GPU while the trainer builds the model, before DeepSpeed takes it over.

    ZeRO-0/1/2 (and QLoRA): every rank loads the whole LM in fp32 (nf4 for QLoRA), the encoder in fp32
    and fp32 copies of the embedding and the projection. ZeRO-3: the LM is built partitioned
    (``deepspeed.zero.Init``) in the run's precision and filled one tensor at a time
    (:func:`visualchat_train.zero3.partitioned_lm`; rank 0 then holds one gathered parameter and that tensor as
    read from the checkpoint, less than what follows), so a rank holds
    its share, plus the input embedding gathered whole while the trainable copy is made, the copy and
    the projection (whole until DeepSpeed partitions them), and the encoder: a large one
    (``vision_partitioned``, Qwen-VL) built partitioned the same way (its share in the run's
    precision, plus one of its tensors gathered whole while rank 0 copies it in: at most
    d_vis x d_vis, counted in fp32), a small one loaded whole in fp32. Not counted: the runtime (CUDA
    context, libraries) and, for an LM that is not a local safetensors folder (transformers' ZeRO-3
    loader), the whole checkpoint that rank 0 reads into host memory first."""
    v_params, d_vis = vision
    emb, proj = lm.vocab * lm.hidden, d_vis * lm.hidden + lm.hidden
    if zero_stage == 3 and not qlora:
        half = 4 if precision == "fp32" else 2
        enc = v_params * half / world + d_vis * d_vis * 4 if vision_partitioned else v_params * 4
        return lm.params() * half / world + emb * half + (emb + proj) * half + enc
    lm_bytes = lm.params() * (0.5 + 0.03) if qlora else lm.params() * 4
    return lm_bytes + v_params * 4 + (emb + proj) * 4


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m visualchat_train.memory", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--lm", default="default", help="HF id / path (config.json only) or a known name: " + ", ".join(sorted(KNOWN_LMS)))
    p.add_argument("--vision", default="default", help="default, qwen-vl[:path], clip:<path>, " + ", ".join(sorted(KNOWN_VISION)))
    p.add_argument("--zero_stage", type=int, choices=(0, 1, 2, 3), default=3)
    p.add_argument("--gpus", type=int, default=8, help="GPUs per node")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="bf16")
    p.add_argument("--lora_rank", type=int, default=0)
    p.add_argument("--qlora", action="store_true")
    p.add_argument("--offload", choices=("none", "cpu"), default="none")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    a = p.parse_args(argv)
    lm, vis = lm_shape(a.lm), vision_shape(a.vision)
    world = a.gpus * a.nodes
    from .zero3 import encoder_partitioned

    vis_part = encoder_partitioned(a.vision)
    rows = {s: estimate(lm, vis, s, world, a.precision, a.lora_rank, qlora=a.qlora, offload=a.offload,
                        vision_partitioned=vis_part) for s in range(4)}
    if a.json:
        print(json.dumps({"lm": a.lm, "vision": a.vision, "world": world, "stages": rows}, indent=2))
        return
    e = rows[a.zero_stage]
    print(f"LM {a.lm}: {lm.params() / 1e9:.2f} B params (hidden {lm.hidden}, {lm.layers} layers, vocab {lm.vocab}); "
          f"vision {a.vision}: {vis[0] / 1e9:.2f} B params, d_vis {vis[1]}")
    print(f"trainable {e['trainable_params'] / 1e6:.1f} M (projection + embedding"
          + (f" + LoRA r={a.lora_rank}" if a.lora_rank else "") + f"), {a.precision}, {a.gpus} GPUs x {a.nodes} node(s) = {world}"
          + (", QLoRA 4-bit LM" if a.qlora else "") + (", optimizer offloaded to CPU" if a.offload == "cpu" else ""))
    print(f"\n{'ZeRO':>5} {'frozen':>9} {'trainable':>10} {'grads':>8} {'optim':>8} {'gather':>8} {'per GPU':>9}  (GiB, model states only)")
    for s, r in rows.items():
        mark = " <-" if s == a.zero_stage else ""
        print(f"{s:>5} {r['frozen'] / GiB:9.2f} {r['trainable_weights'] / GiB:10.2f} {r['grads'] / GiB:8.2f} "
              f"{r['optimizer'] / GiB:8.2f} {r['zero3_gather'] / GiB:8.2f} {r['per_gpu'] / GiB:9.2f}{mark}")
    if a.offload == "cpu":
        print(f"\nCPU memory for the offloaded states: {e['cpu_offload_per_gpu'] / GiB:.2f} GiB per GPU, "
              f"{e['cpu_offload_per_gpu'] * a.gpus / GiB:.2f} GiB per node")
    print(f"\nZeRO-{a.zero_stage}: {e['per_gpu'] / GiB:.2f} GiB per GPU for model states; add activations "
          "(reduce with --gradient_checkpointing and a smaller --per_device_batch_size).")
    if a.zero_stage == 3:
        z = zero3_live_settings(lm)
        print(f"ZeRO-3 gathering (the trainer's DeepSpeed config): stage3_max_live_parameters "
              f"{z['stage3_max_live_parameters'] / 1e6:.0f} M, stage3_max_reuse_distance {z['stage3_max_reuse_distance'] / 1e6:.0f} M, "
              f"stage3_prefetch_bucket_size {z['stage3_prefetch_bucket_size'] / 1e6:.0f} M parameters: "
              f"{e['zero3_gather'] / GiB:.2f} GiB of gathered parameters (the 'gather' column; a rank may go over by one tensor while it prefetches).")
    z3 = a.zero_stage == 3 and not a.qlora
    how = ("the LM built partitioned in " + a.precision if z3
           else "the whole LM in " + ("4-bit" if a.qlora else "fp32") + " on every GPU")
    enc = "the encoder partitioned in " + a.precision if z3 and vis_part else "the encoder whole in fp32"
    print(f"Loading ({how}; {enc}): {e['load_peak'] / GiB:.2f} GiB per GPU at its peak, "
          "before training starts.")


if __name__ == "__main__":
    main()
