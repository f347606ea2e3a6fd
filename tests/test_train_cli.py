"""The trainer's command line, presets, checks before compute, schedules, data order and memory planner
(fast: no training)."""
import json
import os

import pytest

from visualchat_train import cli, memory
from visualchat_train import preflight as preflight_module
from visualchat_train import trainer as T
from visualchat_train.resume import COMPLETE


def args_for(*argv, tmp_path=None):
    a = list(argv)
    if tmp_path is not None and "--output_dir" not in a:
        a += ["--output_dir", str(tmp_path / "out")]
    return cli.parse_args(a)


def test_help_lists_every_flag():
    text = cli.build_parser().format_help()
    for flag in ["--lm", "--vision", "--attention", "--max_seq_len", "--max_images_per_sample", "--data_path",
                 "--dataset_names", "--dataset_samples", "--dataset_concatenate_samples", "--val_ratio", "--seed",
                 "--lr", "--weight_decay", "--adam_betas", "--epochs", "--per_device_batch_size", "--grad_accum_steps",
                 "--scheduler", "--warmup_ratio", "--max_steps", "--zero_stage", "--offload", "--precision",
                 "--gradient_checkpointing", "--deepspeed_config", "--lora_rank", "--lora_alpha",
                 "--lora_target_modules", "--vision_lora_rank", "--qlora", "--output_dir", "--eval_every",
                 "--save_every", "--resume", "--tensorboard", "--preset"]:
        assert flag in text, flag
    a = cli.parse_args([])
    assert (a.lr, a.adam_betas, a.max_seq_len, a.max_images_per_sample, a.val_ratio) == (1e-3, "0.0,0.95", 4096, 8, 0.1)


def test_presets_load_and_flags_override():
    assert {"smoke", "shapes", "shapes-mmca", "shapes-ca"} <= set(cli.recipe_names())
    a = cli.parse_args(["--preset", "smoke"])
    assert a.lm == "tiny" and a.vision == "tiny" and a.max_steps > 0
    b = cli.parse_args(["--preset", "smoke", "--max_steps", "3", "--lr", "0.5"])
    assert b.max_steps == 3 and b.lr == 0.5
    mm, ca = cli.load_recipe("shapes-mmca"), cli.load_recipe("shapes-ca")
    assert mm["attention"] == "mmca" and ca["attention"] == "causal" and mm["lr"] == 1e-2
    assert {k: v for k, v in mm.items() if k not in ("attention", "output_dir")} == \
           {k: v for k, v in ca.items() if k not in ("attention", "output_dir")}
    assert cli.load_recipe("shapes") == mm  # an alias, not a copy
    # the GPU pair: same data, steps and seed for both attentions, and every flag one the CLI knows
    gm, gc = cli.load_recipe("shapes-gpu-mmca"), cli.load_recipe("shapes-gpu-ca")
    assert gm["attention"] == "mmca" and gc["attention"] == "causal"
    assert {k: v for k, v in gm.items() if k not in ("attention", "output_dir")} == \
           {k: v for k, v in gc.items() if k not in ("attention", "output_dir")}
    assert cli.parse_args(["--preset", "shapes-gpu-mmca"]).per_device_batch_size == 16
    for name in ("shapes-mmca", "shapes-ca"):
        with open(os.path.join(cli.RECIPES_DIR, name + ".json")) as f:
            assert "python -m visualchat_train --preset " + name in json.load(f)["command"]
    with pytest.raises(SystemExit):
        cli.parse_args(["--preset", "no-such-recipe"])


def test_recipe_alias_of_an_alias_is_refused(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"alias": "shapes"}))  # shapes is itself an alias
    with pytest.raises(ValueError, match="not an alias itself"):
        cli.load_recipe(str(tmp_path / "a.json"))


def test_errors_before_compute(tmp_path, monkeypatch):
    with pytest.raises(T.TrainError, match="unknown data set.*valid names"):
        T.preflight(args_for("--dataset_names", "shapes", "nope", tmp_path=tmp_path))
    with pytest.raises(T.TrainError, match="--data_path is required"):
        T.preflight(args_for("--dataset_names", "llava", tmp_path=tmp_path))
    with pytest.raises(T.TrainError, match="does not exist"):
        T.preflight(args_for("--dataset_names", "llava", "--data_path", str(tmp_path / "missing"), tmp_path=tmp_path))
    with pytest.raises(T.TrainError, match="not divisible"):
        T.preflight(args_for("--per_device_batch_size", "3", "--global_batch_size", "8", tmp_path=tmp_path))
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_batch_size": 7}))
    with pytest.raises(T.TrainError, match="does not divide"):
        T.preflight(args_for("--engine", "deepspeed", "--deepspeed_config", str(ds), tmp_path=tmp_path))
    monkeypatch.setattr(preflight_module, "bf16_supported", lambda device: False)
    with pytest.raises(T.TrainError, match="bf16 is not supported"):
        T.preflight(args_for("--precision", "bf16", tmp_path=tmp_path))
    if not T.D.device().type == "cuda":
        with pytest.raises(T.TrainError, match="fp16 needs a CUDA GPU"):
            T.preflight(args_for("--precision", "fp16", tmp_path=tmp_path))
    with pytest.raises(T.TrainError, match="--qlora .*--lora_rank"):
        T.preflight(args_for("--qlora", tmp_path=tmp_path))
    with pytest.raises(T.TrainError, match="betas"):
        T.preflight(args_for("--adam_betas", "0.9", tmp_path=tmp_path))
    with pytest.raises(T.TrainError, match="--embedding_lr must be a number >= 0"):
        T.preflight(args_for("--embedding_lr", "-0.1", tmp_path=tmp_path))


def test_resume_errors(tmp_path):
    with pytest.raises(T.TrainError, match="no such checkpoint"):
        T.preflight(args_for("--resume", str(tmp_path / "nothing"), tmp_path=tmp_path))
    half = tmp_path / "out" / "checkpoints" / "step-00000004"
    half.mkdir(parents=True)
    with pytest.raises(T.TrainError, match="not a complete"):
        T.preflight(args_for("--resume", str(half), tmp_path=tmp_path))
    # auto ignores incomplete folders (a kill during a save) and starts fresh
    assert T.preflight(args_for("--resume", "auto", tmp_path=tmp_path)).resume_dir is None
    a = args_for("--lm", "tiny", "--vision", "tiny", "--engine", "torch", tmp_path=tmp_path)
    meta = T.run_meta(a, "torch", 1)
    (half / COMPLETE).write_text(json.dumps({"step": 4, "meta": {**meta, "lm": "tiny:5"}}))
    with pytest.raises(T.TrainError, match="does not match this run.*lm"):
        T.preflight(a)
    (half / COMPLETE).write_text(json.dumps({"step": 4, "meta": meta}))
    assert T.preflight(a).resume_dir == str(half)
    assert T.preflight(args_for("--lm", "tiny", "--vision", "tiny", "--engine", "torch", "--resume", "none",
                                tmp_path=tmp_path)).resume_dir is None


def test_lr_schedules():
    cos = T.lr_lambda(100, 10, "cosine")
    assert cos(0) == pytest.approx(0.1) and cos(9) == pytest.approx(1.0)
    assert cos(10) == pytest.approx(1.0) and cos(55) == pytest.approx(0.5) and cos(100) == pytest.approx(0.0)
    lin = T.lr_lambda(100, 0, "linear")
    assert lin(0) == 1.0 and lin(50) == pytest.approx(0.5)
    assert T.lr_lambda(100, 10, "constant")(80) == 1.0


def test_data_order_depends_only_on_seed_and_step_and_matches_across_world_sizes():
    from visualchat_train.samples import Sample

    samples = [Sample([1, 2], [False, False], [-100, 2], []) for _ in range(10)]
    one = T.Batcher(samples, micro=2, world=1, rank=0, seed=3)
    r0 = T.Batcher(samples, micro=2, world=2, rank=0, seed=3)
    r1 = T.Batcher(samples, micro=2, world=2, rank=1, seed=3)
    for step in range(7):  # 1 process x accumulation 2 == 2 processes x accumulation 1
        assert one.train_indices(2 * step) + one.train_indices(2 * step + 1) == r0.train_indices(step) + r1.train_indices(step)
    epoch0 = [i for g in range(5) for i in one.train_indices(g)]
    assert sorted(epoch0) == list(range(10))  # every sample once per epoch
    assert T.Batcher(samples, 2, 1, 0, seed=3).train_indices(6) == one.train_indices(6)
    assert T.Batcher(samples, 2, 1, 0, seed=4).order(0) != one.order(0)


def test_memory_planner(capsys):
    memory.main(["--lm", "llama-2-70b", "--vision", "qwen-vl", "--zero_stage", "3", "--gpus", "8", "--nodes", "2"])
    out = capsys.readouterr().out
    assert "llama-2-70b" in out and "per GPU" in out and "ZeRO-3" in out
    lm, vis = memory.lm_shape("llama-2-7b"), memory.vision_shape("qwen-vl")
    assert 6.5e9 < lm.params() < 7.0e9
    assert 68e9 < memory.lm_shape("llama-2-70b").params() < 70e9
    z = [memory.estimate(lm, vis, s, 16)["per_gpu"] for s in range(4)]
    assert z[0] > z[1] > z[2] > z[3]
    # ZeRO-3 partitions the frozen weights too: about 1/16 of the bf16 LM + encoder
    assert memory.estimate(lm, vis, 3, 16)["frozen"] == pytest.approx((lm.params() + vis[0]) * 2 / 16)
    assert memory.estimate(lm, vis, 2, 16, qlora=True)["frozen"] < memory.estimate(lm, vis, 2, 16)["frozen"] / 2
    assert memory.lm_shape("default").params() == pytest.approx(134.5e6, rel=0.01)


def test_a_count_above_a_sets_size_repeats_its_training_share(tmp_path):
    """jsonl:25 of a 10-conversation file: 1 held out (val_ratio 0.1) and never trained on, the other
    9 repeated to 24 (each twice, 6 of them a third time); only a count given by name repeats."""
    from visualchat_train.samples import DataStats, load_splits, named_counts, oversample

    f = tmp_path / "chat.jsonl"
    f.write_text("".join(json.dumps({"rounds": [{"question": f"q{i}", "answer": f"a{i}"}]}) + "\n" for i in range(10)))
    assert named_counts("shapes:2400,jsonl:25") == {"shapes", "jsonl"} and named_counts("160") == set()
    stats = DataStats()
    train, val = load_splits(["jsonl"], str(f), {"jsonl": 25}, 0.1, 0, 8, stats)
    train = oversample(train, val, {"jsonl": 25}, 0, stats)
    qs = [c.rounds[0].question for c in train["jsonl"]]
    held = {c.rounds[0].question for c in val["jsonl"]}
    assert len(qs) == 24 and len(held) == 1 and not held & set(qs)
    counts = sorted(qs.count(q) for q in set(qs))
    assert len(counts) == 9 and counts == [2] * 3 + [3] * 6
    assert stats.as_dict()["jsonl/repeated"] == 24
    assert oversample(train, val, {"jsonl": 10}, 0, DataStats()) == train  # not above the size: unchanged
