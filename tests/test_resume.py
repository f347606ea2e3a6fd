"""Resumable state without pickle (issue 20): safetensors + JSON for our own files, weights-only loading for
DeepSpeed's and for the older .pt format; a malicious pickle in a run directory never runs."""
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.test_train_run import ROOT, _env, train_cmd
from visualchat_train.resume import Checkpointer, load_state, rng_state, weights_only_loads
from visualchat_train.trainer import TrainError


def tiny_state(seed=0):
    torch.manual_seed(seed)
    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    module[1].bias.requires_grad_(False)
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=0.1, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return module, opt, sched, names


def train_steps(module, opt, sched, n):
    for _ in range(n):
        loss = module(torch.randn(5, 4)).pow(2).sum()
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)


def draws():
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def checkpoint(tmp_path, step=3):
    """A complete plain-engine checkpoint after ``step`` steps; returns (its dir, what was saved, draws after)."""
    module, opt, sched, names = tiny_state()
    train_steps(module, opt, sched, step)
    ck = Checkpointer(str(tmp_path), keep=2, rank=0, meta={}, names=names)
    path = ck.save(step, module, opt, sched, None, {"best_val": float("inf"), "tokens_seen": 12})
    saved = {n: p.detach().clone() for n, p in module.named_parameters()}
    return path, ck, saved, opt.state_dict(), sched.state_dict(), draws()


def test_resume_state_is_safetensors_and_json_and_round_trips_exactly(tmp_path):
    path, ck, saved, opt_sd, sched_sd, after = checkpoint(tmp_path)
    files = sorted(os.listdir(path))
    assert files == ["complete.json", "rng-rank0.safetensors", "state.safetensors"], files
    for f in ("rng-rank0.safetensors", "state.safetensors"):
        raw = open(os.path.join(path, f), "rb").read()
        header = json.loads(raw[8: 8 + int.from_bytes(raw[:8], "little")])  # a safetensors header: JSON
        assert header["__metadata__"]["format"] == "visualchat-resume-1"
        assert b"\x80\x02" not in raw[:2] and not raw.startswith(b"PK")  # neither a pickle nor torch's zip
    rng = load_state(os.path.join(path, "rng-rank0.safetensors"))
    assert rng["torch"].dtype == torch.uint8 and isinstance(rng["numpy"][1], np.ndarray)
    # a fresh model, optimizer and scheduler, with other RNG states, get everything back
    module, opt, sched, names = tiny_state(seed=1)
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    step, client = ck.load(path, module, opt, sched, None)
    assert step == 3 and client == {"best_val": float("inf"), "tokens_seen": 12}
    assert draws() == after
    for n, p in module.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, saved[n]), n
    got = opt.state_dict()
    assert got["param_groups"] == opt_sd["param_groups"] and got["state"].keys() == opt_sd["state"].keys()
    for i, st in opt_sd["state"].items():
        for k, v in st.items():
            assert torch.equal(got["state"][i][k], v), (i, k)
    assert sched.state_dict() == sched_sd


def evil_pickle(path, marker):
    """A pickle that, if ever unpickled with weights_only=False, writes ``marker``."""
    class Evil:
        def __reduce__(self):
            return exec, (f"open({str(marker)!r}, 'w').write('pwned')",)

    torch.save({"trainable": {"0.weight": Evil()}, "optimizer": {}, "scheduler": {}, "python": Evil()}, path)


def test_the_evil_pickle_would_run_if_unpickled(tmp_path):
    """The payload is live: an unrestricted torch.load runs it (so the tests below can fail)."""
    marker = tmp_path / "pwned"
    evil_pickle(tmp_path / "state.pt", marker)
    subprocess.run([sys.executable, "-c", f"import torch; torch.load({str(tmp_path / 'state.pt')!r}, "
                    "weights_only=False)"], check=False, capture_output=True, timeout=120)
    assert marker.exists()


@pytest.mark.parametrize("plant", ["state", "rng", "beside"])
def test_a_malicious_pickle_in_a_run_directory_is_never_executed(tmp_path, plant):
    path, ck, *_ = checkpoint(tmp_path)
    marker = tmp_path / "pwned"
    module, opt, sched, _ = tiny_state(seed=1)
    if plant == "state":  # an older-format checkpoint whose state.pt is the payload
        os.remove(os.path.join(path, "state.safetensors"))
        evil_pickle(os.path.join(path, "state.pt"), marker)
        with pytest.raises(TrainError, match=r"state\.pt .*could run code"):
            ck.load(path, module, opt, sched, None)
    elif plant == "rng":
        os.remove(os.path.join(path, "rng-rank0.safetensors"))
        evil_pickle(os.path.join(path, "rng-rank0.pt"), marker)
        with pytest.raises(TrainError, match=r"rng-rank0\.pt .*could run code"):
            ck.load(path, module, opt, sched, None)
    else:  # .pt files planted beside the real state are never opened
        evil_pickle(os.path.join(path, "state.pt"), marker)
        evil_pickle(os.path.join(path, "rng-rank0.pt"), marker)
        assert ck.load(path, module, opt, sched, None)[0] == 3
    assert not marker.exists()
    with weights_only_loads(), pytest.raises(Exception, match="exec"):  # what DeepSpeed's loads go through
        torch.load(os.path.join(path, "state.pt") if plant != "rng" else os.path.join(path, "rng-rank0.pt"),
                   weights_only=False)
    assert not marker.exists()


def test_an_older_pt_checkpoint_still_resumes_through_the_weights_only_loader(tmp_path):
    module, opt, sched, names = tiny_state()
    train_steps(module, opt, sched, 2)
    ck = Checkpointer(str(tmp_path), keep=2, rank=0, meta={}, names=names)
    path = ck.save(2, module, opt, sched, None, {})
    os.remove(os.path.join(path, "state.safetensors"))
    os.remove(os.path.join(path, "rng-rank0.safetensors"))
    params = dict(module.named_parameters())
    torch.save({"trainable": {n: params[n].detach().clone() for n in names}, "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "step": 2}, os.path.join(path, "state.pt"))  # as written before
    torch.save(rng_state(), os.path.join(path, "rng-rank0.pt"))
    after = draws()
    fresh, opt2, sched2, _ = tiny_state(seed=1)
    assert ck.load(path, fresh, opt2, sched2, None)[0] == 2
    assert draws() == after
    assert all(torch.equal(p, params[n]) for n, p in fresh.named_parameters() if p.requires_grad)


def test_deepspeed_resume_refuses_a_malicious_engine_file(tmp_path):
    """End to end on the DeepSpeed engine: its checkpoint's model-states file is swapped for the payload;
    the resume stops with a message and the payload never runs."""
    out, marker = tmp_path / "run", tmp_path / "pwned"
    flags = ["--engine", "deepspeed", "--zero_stage", "0", "--dataset_samples", "24", "--eval_every", "0",
             "--save_every", "2"]
    env = _env(OMP_NUM_THREADS="1", TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    p = subprocess.run(train_cmd(out, *flags, "--max_steps", "2"), cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    ds = out / "checkpoints" / "step-00000002" / "ds"
    target = next(ds.glob("*model_states.pt"))
    evil_pickle(target, marker)
    p = subprocess.run(train_cmd(out, *flags, "--max_steps", "4"), cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=240)
    assert p.returncode != 0
    assert "could run code" in p.stderr and "ds/" in p.stderr, p.stderr[-3000:]
    assert not marker.exists()


def test_plain_engine_resume_gives_the_same_weights(tmp_path, caplog):
    """The plain engine's safetensors state resumes exactly: a run cut after its step-2 checkpoint (final,
    later checkpoints and summary gone, as after a kill) and resumed ends on the straight run's weights."""
    import shutil

    from safetensors.torch import load_file

    from tests.test_train_run import _train_in_process

    flags = ["--max_steps", "4", "--save_every", "2", "--dataset_samples", "24", "--keep_checkpoints", "3"]
    out = tmp_path / "run"
    _train_in_process(out, *flags)
    straight = load_file(str(out / "final" / "trainable.safetensors"))
    step2 = out / "checkpoints" / "step-00000002"
    assert (step2 / "state.safetensors").is_file() and not list(step2.glob("*.pt"))
    shutil.rmtree(out / "final"), shutil.rmtree(out / "best"), shutil.rmtree(out / "checkpoints" / "step-00000004")
    os.remove(out / "summary.json")
    caplog.set_level("INFO", logger="visualchat_train")
    _train_in_process(out, *flags)
    assert "resumed from" in caplog.text and "step-00000002 at step 2" in caplog.text
    resumed = load_file(str(out / "final" / "trainable.safetensors"))
    assert straight.keys() == resumed.keys()
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k
