"""End-to-end trainer runs on tiny random models (CPU, gloo): the smoke preset, ZeRO stages 0/2/3 with
one and two processes, kill-and-resume, LoRA / QLoRA, bad images. Each run takes seconds."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(**extra):
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": ROOT, "TOKENIZERS_PARALLELISM": "false",
                "DS_ACCELERATOR": "cpu" if not torch.cuda.is_available() else env.get("DS_ACCELERATOR", "cuda")})
    env.update(extra)
    return env


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def train_cmd(out, *flags, nproc: int = 1):
    base = [sys.executable, "-m", "visualchat_train", "--preset", "smoke", "--output_dir", str(out), "--no_progress", *flags]
    if nproc == 1:
        return base
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", _port(),
            "-m", "visualchat_train"] + base[3:]


def run_train(out, *flags, nproc: int = 1, timeout: int = 240, check: bool = True):
    env = _env(OMP_NUM_THREADS="1") if nproc > 1 else _env()
    p = subprocess.run(train_cmd(out, *flags, nproc=nproc), cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"training failed ({p.returncode}):\n{p.stderr[-4000:]}")
    return p


def summary(out):
    with open(os.path.join(out, "summary.json")) as f:
        return json.load(f)


def weights(path):
    """The trained tensors of an exported checkpoint, embedding made dense against the base."""
    from visualchat.model import VisualChat

    vc = VisualChat.from_pretrained(str(path), device="cpu", dtype=torch.float32)
    return {"projection.weight": vc.model.projection.weight.detach().clone(),
            "projection.bias": vc.model.projection.bias.detach().clone(),
            "embed_tokens.weight": vc.model.embed_tokens.weight.detach().clone()}


def assert_same(a, b, atol=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-4, msg=lambda m: f"{k}: {m}")


# -- the smoke preset ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    t0 = time.time()
    run_train(out, "--zero_stage", "0", "--tensorboard")
    return out, time.time() - t0


def test_smoke_preset_trains_and_exports_an_app_checkpoint(smoke_run):
    out, seconds = smoke_run
    assert seconds < 120
    s = summary(out)
    assert s["val_loss_last"] < s["val_loss_first"] - 0.1, s  # validation loss went down
    for name in ("final", "best"):
        cfg = json.load(open(out / name / "config.json"))
        assert cfg["format"] == "visualchat-checkpoint" and cfg["lora"] is None
        assert {"hardware", "wall_time_s", "steps", "command"} <= set(cfg["info"])
    assert "--preset smoke" in cfg["info"]["command"]
    from visualchat.model import VisualChat

    vc = VisualChat.from_pretrained(str(out / "final"), device="cpu")
    assert vc.config.attention == "mmca" and vc.config.image_tokens == 16
    from PIL import Image

    assert isinstance(vc.new_session().ask("Describe Image 1.", images=[Image.new("RGB", (40, 40), (255, 0, 0))],
                                           max_new_tokens=4), str)
    recs = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert any("val_loss" in r for r in recs) and sum("loss" in r for r in recs) == s["steps"]
    assert all({"lr", "tokens_per_s"} <= set(r) for r in recs if "loss" in r)
    png = (out / "loss_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert any((out / "tensorboard").iterdir())
    assert (out / "checkpoints").is_dir() and any(p.name.startswith("step-") for p in (out / "checkpoints").iterdir())


def test_app_loads_the_smoke_checkpoint(smoke_run):
    out, _ = smoke_run
    from visualchat.checkpoint import load_tensors

    t = load_tensors(str(out / "final"))
    assert {"projection.weight", "projection.bias"} <= set(t)
    assert "embed_tokens.rows" in t or "embed_tokens.weight" in t


# -- ZeRO stages, one and two processes -----------------------------------------------------------
@pytest.fixture(scope="module")
def stage_runs(tmp_path_factory, smoke_run):
    runs = {("ds", 0, 1): smoke_run[0] / "final"}
    for stage in (2, 3):
        out = tmp_path_factory.mktemp(f"z{stage}")
        run_train(out, "--zero_stage", str(stage), "--engine", "deepspeed")
        runs[("ds", stage, 1)] = out / "final"
    return runs


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_stages_agree_with_stage_0(stage_runs, stage):
    assert_same(weights(stage_runs[("ds", 0, 1)]), weights(stage_runs[("ds", stage, 1)]))


def test_plain_torch_engine_agrees(stage_runs, tmp_path):
    run_train(tmp_path, "--engine", "torch")
    assert_same(weights(stage_runs[("ds", 0, 1)]), weights(tmp_path / "final"), atol=1e-4)


@pytest.mark.parametrize("stage", [0, 3])
def test_two_processes_under_torchrun(stage_runs, tmp_path, stage):
    run_train(tmp_path, "--zero_stage", str(stage), "--engine", "deepspeed", nproc=2)
    # global batch 4 = 1 process x 2 x accumulation 2 = 2 processes x 2: the same samples per step
    assert_same(weights(stage_runs[("ds", 0, 1)]), weights(tmp_path / "final"), atol=1e-4)
    cfg = json.load(open(tmp_path / "final" / "config.json"))
    assert cfg["info"]["processes"] == 2 and cfg["info"]["zero_stage"] == stage


def test_zero3_export_round_trips(stage_runs):
    """Gathered ZeRO-3 export -> from_pretrained gives the same model outputs as the stage-0 export."""
    from visualchat.model import VisualChat

    from visualchat_train.data.shapes import generate

    conv = generate("validation", 1, seed=9)[0].materialize(size=32)
    out = []
    for key in [("ds", 0, 1), ("ds", 3, 1)]:
        vc = VisualChat.from_pretrained(str(stage_runs[key]), device="cpu")
        r = vc.template.render(conv)
        feats = vc.model.encode_images(conv.images)
        ids = torch.tensor([r.input_ids])
        res = vc.model(ids, torch.tensor([r.is_image]), feats, None, torch.tensor([r.labels]))
        out.append(float(res.loss.detach()))
        assert res.n_tokens > 0 and vc.model.projection.weight.abs().sum() > 0
    assert out[0] == pytest.approx(out[1], abs=1e-4)


# -- kill and resume ------------------------------------------------------------------------------
def test_sigkill_and_resume_gives_the_same_weights(tmp_path):
    flags = ["--engine", "deepspeed", "--zero_stage", "2", "--max_steps", "16", "--save_every", "4", "--eval_every", "8"]
    ref = tmp_path / "straight"
    run_train(ref, *flags)
    cut = tmp_path / "killed"
    p = subprocess.Popen(train_cmd(cut, *flags, "--sleep_per_step", "0.5"), cwd=ROOT, env=_env(),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    marker = cut / "checkpoints" / "step-00000008" / "complete.json"
    deadline = time.time() + 180
    while not marker.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), p.stderr.read()[-3000:] if p.poll() is not None else "no checkpoint in time"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    p.stderr.close()
    assert not (cut / "final").exists() and not (cut / "summary.json").exists()
    res = run_train(cut, *flags)  # --resume auto is the default
    assert "resumed from" in res.stderr and "step-0000000" in res.stderr
    assert_same(weights(ref / "final"), weights(cut / "final"), atol=1e-6)
    assert summary(cut)["steps"] == 16
    steps = [json.loads(x)["step"] for x in open(cut / "metrics.jsonl") if '"loss"' in x]
    assert steps == list(range(1, 17))  # no step logged twice


def test_incomplete_checkpoint_is_ignored(tmp_path):
    """A kill during a save leaves a .tmp folder (or one without complete.json): auto skips it."""
    from visualchat_train.resume import find_resume

    ck = tmp_path / "checkpoints"
    (ck / "step-00000004").mkdir(parents=True)
    (ck / "step-00000004" / "complete.json").write_text(json.dumps({"step": 4, "meta": {}}))
    (ck / ".tmp-step-00000008").mkdir()
    (ck / "step-00000012").mkdir()  # no complete.json
    assert find_resume("auto", str(tmp_path)).endswith("step-00000004")
    assert find_resume("none", str(tmp_path)) is None


# -- adapters ---------------------------------------------------------------------------------------
def test_lora_smoke_trains_and_export_holds_only_adapters(tmp_path):
    run_train(tmp_path, "--lora_rank", "4", "--vision_lora_rank", "2", "--max_steps", "8", "--eval_every", "4",
              "--zero_stage", "2")
    cfg = json.load(open(tmp_path / "final" / "config.json"))
    assert cfg["lora"]["lm"]["r"] == 4 and cfg["lora"]["lm"]["lora_alpha"] == 8
    assert cfg["lora"]["vision"]["r"] == 2
    t = load_file(str(tmp_path / "final" / "trainable.safetensors"))
    lora = {k: v for k, v in t.items() if k.startswith("lora.")}
    assert lora and all("lora_A" in k or "lora_B" in k for k in lora)
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)  # B starts at 0: it trained
    assert not any(k.startswith("lora.") and "lora_" not in k for k in t)  # no base weights stored
    from visualchat import VisualChat

    vc = VisualChat.from_pretrained(str(tmp_path / "final"), device="cpu")  # folds the adapters into the base
    assert not [n for n, _ in vc.model.named_parameters() if "lora_" in n]  # (tests/test_lora_merge.py: same logits)
    s = summary(tmp_path)
    assert s["val_loss_last"] < s["val_loss_first"]


def test_qlora_smoke(tmp_path):
    from visualchat_train.lora import qlora_unsupported_reason

    why = qlora_unsupported_reason()
    if why:
        pytest.skip(f"QLoRA: {why}")
    run_train(tmp_path, "--qlora", "--lora_rank", "4", "--zero_stage", "2", "--max_steps", "4", "--eval_every", "4",
              timeout=400)
    cfg = json.load(open(tmp_path / "final" / "config.json"))
    assert cfg["lora"]["lm"]["r"] == 4 and cfg["info"]["qlora"] is True
    assert any(k.startswith("lora.") for k in load_file(str(tmp_path / "final" / "trainable.safetensors")))


# -- bad images ------------------------------------------------------------------------------------
def test_missing_and_corrupt_images_skip_their_samples(tmp_path):
    from PIL import Image

    d = tmp_path / "data"
    d.mkdir()
    lines = []
    for i in range(12):
        name = f"im{i}.png"
        Image.new("RGB", (32, 32), (20 * i, 100, 200 - 10 * i)).save(d / name)
        lines.append({"rounds": [{"images": [name], "question": "What colour?", "answer": f"colour {i}"}]})
    (d / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    lines.append({"rounds": [{"images": ["bad.png"], "question": "What?", "answer": "x"}]})
    lines.append({"rounds": [{"images": ["gone.png"], "question": "What?", "answer": "y"}]})
    (d / "chat.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    p = run_train(tmp_path / "out", "--dataset_names", "jsonl", "--data_path", str(d / "chat.jsonl"),
                  "--val_ratio", "0.2", "--max_steps", "3", "--eval_every", "3", "--engine", "torch")
    data = summary(tmp_path / "out")["data"]
    assert data.get("jsonl/skipped_bad_image") == 2 or data.get("skipped_bad_image") == 2, data
    assert data["train_samples"] + data["val_samples"] == 12
    for name in ("bad.png", "gone.png"):  # logged once per file
        assert sum(name in line for line in p.stderr.splitlines()) == 1, p.stderr[-3000:]


def _train_in_process(out, *flags):
    """One run of the smoke preset on the plain engine, in this process; returns its summary."""
    from visualchat_train import cli
    from visualchat_train.trainer import train

    args = cli.parse_args(["--preset", "smoke", "--engine", "torch", "--eval_every", "0", "--output_dir", str(out),
                           "--no_progress", *flags])
    return train(args)


def test_gradient_checkpointing_gives_the_same_weights(tmp_path):
    """In-process runs of the plain engine: recomputing the LM layers in backward changes nothing."""
    outs = []
    for i, extra in enumerate([[], ["--gradient_checkpointing"]]):
        out = tmp_path / f"r{i}"
        s = _train_in_process(out, "--max_steps", "4", *extra)
        assert s["steps"] == 4
        outs.append(out / "final")
    assert_same(weights(outs[0]), weights(outs[1]), atol=1e-6)


def test_embedding_lr_zero_freezes_the_embedding(tmp_path):
    """--embedding_lr sets the embedding's own peak lr; 0 trains the projection alone."""
    from visualchat.model import VisualChat

    _train_in_process(tmp_path / "frozen", "--max_steps", "2", "--embedding_lr", "0")
    _train_in_process(tmp_path / "both", "--max_steps", "2")
    frozen, both = weights(tmp_path / "frozen" / "final"), weights(tmp_path / "both" / "final")
    base = VisualChat.from_pretrained(str(tmp_path / "frozen" / "final"), device="cpu").model.base_embedding
    assert torch.equal(frozen["embed_tokens.weight"], base.float())
    assert not torch.equal(both["embed_tokens.weight"], base.float())
    assert frozen["projection.weight"].abs().sum() > 0 and not torch.equal(frozen["projection.weight"], both["projection.weight"])


def test_lora_on_the_plain_engine(tmp_path):
    """LoRA without DeepSpeed: the adapters (fp32 masters) train and are exported."""
    s = _train_in_process(tmp_path, "--max_steps", "3", "--lora_rank", "4")
    assert s["steps"] == 3
    t = load_file(str(tmp_path / "final" / "trainable.safetensors"))
    lora_b = [v for k, v in t.items() if k.startswith("lora.") and "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)  # B starts at 0: it trained


def test_init_from_starts_from_a_checkpoint(smoke_run, tmp_path):
    """--init_from loads projection and embedding before training: with lr 0 the export equals it."""
    src = smoke_run[0] / "final"
    run_train(tmp_path / "out", "--init_from", str(src), "--lr", "0", "--max_steps", "1", "--engine", "torch",
              "--eval_every", "0")
    assert_same(weights(src), weights(tmp_path / "out" / "final"), atol=0)
    bad = run_train(tmp_path / "bad", "--init_from", str(tmp_path / "nowhere"), "--max_steps", "1", check=False)
    assert bad.returncode != 0 and "--init_from" in bad.stderr and "nowhere" in bad.stderr, bad.stderr[-2000:]


def test_projection_init_scale_scales_the_initial_projection(tmp_path):
    for name, scale in (("one", "1"), ("small", "0.001")):
        run_train(tmp_path / name, "--projection_init_scale", scale, "--lr", "0", "--max_steps", "1", "--engine",
                  "torch", "--eval_every", "0")
    one, small = weights(tmp_path / "one" / "final"), weights(tmp_path / "small" / "final")
    for k in ("projection.weight", "projection.bias"):
        assert one[k].abs().max() > 0
        torch.testing.assert_close(small[k], one[k] * 0.001)
    bad = run_train(tmp_path / "bad", "--projection_init_scale", "0", "--max_steps", "1", check=False)
    assert bad.returncode != 0 and "--projection_init_scale must be a positive number" in bad.stderr


def test_a_diverging_run_stops_with_a_clear_error(tmp_path):
    # a projection scaled past float32's range turns the image tokens into inf, the loss into NaN
    p = run_train(tmp_path, "--projection_init_scale", "1e38", "--max_steps", "6", "--engine", "torch",
                  "--eval_every", "0", check=False)
    assert p.returncode != 0 and "training diverged" in p.stderr, p.stderr[-3000:]


def test_fit_schedule_to_time_ends_the_decay_on_time(tmp_path):
    """A budget that fits fewer steps than planned: the schedule shrinks to it, so the run ends its
    cosine decay (lr near 0 at the last step) instead of stopping at a high lr."""
    flags = ("--max_steps", "60", "--sleep_per_step", "0.1", "--max_train_minutes", "0.06", "--log_every", "1")
    fitted = _train_in_process(tmp_path / "fit", *flags, "--fit_schedule_to_time")
    plain = _train_in_process(tmp_path / "plain", *flags)
    assert fitted["planned_steps"] == plain["planned_steps"] == 60
    assert 10 < fitted["steps"] == fitted["total_steps"] < 60, fitted
    assert plain["steps"] < plain["total_steps"] == 60  # stopped mid-schedule

    def last_lr(out):
        with open(out / "metrics.jsonl") as f:
            return [json.loads(x) for x in f if '"lr"' in x][-1]["lr"]

    peak = 0.01  # the smoke preset's lr
    assert last_lr(tmp_path / "fit") < 0.1 * peak < last_lr(tmp_path / "plain"), (last_lr(tmp_path / "fit"), last_lr(tmp_path / "plain"))
