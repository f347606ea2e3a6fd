"""Trainer options from the original code: the output-directory lock, skipping malformed JSONL lines,
the other lr schedulers and warm-up in steps, the eval batch size and --data_debug_path."""
import json
import os
import socket
import subprocess
import sys

import pytest

from visualchat_train import trainer as T
from visualchat_train.lock import LOCK_NAME, OutputDirLocked, OutputLock


# -- the output-directory lock ------------------------------------------------------------------
@pytest.fixture
def live_pid():
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield p.pid
    p.kill()
    p.wait()


def dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def write_lock(out, pid, host=None):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, LOCK_NAME), "w") as f:
        json.dump({"pid": pid, "host": host or socket.gethostname(), "started": "earlier"}, f)


def test_lock_refuses_a_live_owner_and_takes_over_a_dead_ones(tmp_path, live_pid):
    out = str(tmp_path / "run")
    write_lock(out, live_pid)
    with pytest.raises(OutputDirLocked, match=f"in use by another training run \\(pid {live_pid}"):
        OutputLock(out).acquire()
    write_lock(out, dead_pid())  # a killed run's lock
    lock = OutputLock(out).acquire()
    with open(os.path.join(out, LOCK_NAME)) as f:
        assert json.load(f)["pid"] == os.getpid()
    lock.release()
    assert not os.path.exists(os.path.join(out, LOCK_NAME))
    write_lock(out, 12345, host="another-node")  # cannot be checked from here: refused, with the file to delete
    with pytest.raises(OutputDirLocked, match="another-node.*delete .*\\.lock"):
        OutputLock(out).acquire()


def test_a_second_run_on_the_same_output_dir_is_refused(tmp_path, live_pid):
    from visualchat_train import cli

    out = tmp_path / "run"
    write_lock(str(out), live_pid)
    args = cli.parse_args(["--preset", "smoke", "--engine", "torch", "--output_dir", str(out), "--no_progress"])
    with pytest.raises(T.TrainError, match="in use by another training run.*another --output_dir"):
        T.train(args)
    assert not os.path.exists(out / "summary.json")


# -- malformed JSONL lines ------------------------------------------------------------------------
def test_skip_bad_lines_counts_them_with_their_line_numbers(tmp_path, caplog):
    from visualchat_train.data import load_dataset

    f = tmp_path / "chat.jsonl"
    good = json.dumps({"rounds": [{"question": "q", "answer": "a"}]})
    f.write_bytes((good + "\n{not json\n" + good + "\n" + json.dumps({"rounds": []}) + "\n\n").encode()
                  + b"\xff\xfe\n" + (good + "\n").encode())
    with pytest.raises(ValueError, match="chat.jsonl:2"):
        load_dataset("jsonl", str(f))
    stats = {}
    with caplog.at_level("WARNING", logger="visualchat_train.data.jsonl"):
        convs = load_dataset("jsonl", str(f), skip_bad_lines=True, stats=stats)
    assert len(convs) == 3 and stats["skipped_bad_line"] == 3
    assert stats["bad_line_list"] == [f"{f}:2", f"{f}:4", f"{f}:6"]
    assert "chat.jsonl:4: 'rounds' must be a non-empty list" in caplog.text and "not UTF-8" in caplog.text


# -- schedulers -----------------------------------------------------------------------------------
def test_other_schedulers_and_warmup_in_steps():
    r = T.lr_lambda(110, 10, "cosine_with_restarts", cycles=2)
    assert r(10) == pytest.approx(1.0) and r(35) == pytest.approx(0.5) and r(59) < 0.01
    assert r(60) == pytest.approx(1.0) and r(110) == 0.0  # restarted at half-way, 0 at the end
    p = T.lr_lambda(110, 10, "polynomial", power=2)
    assert p(60) == pytest.approx(0.25) and p(110) == 0.0
    assert T.lr_lambda(110, 10, "polynomial")(60) == pytest.approx(T.lr_lambda(110, 10, "linear")(60))
    with pytest.raises(ValueError, match="unknown scheduler"):
        T.lr_lambda(10, 0, "exponential")

    class A:
        warmup_ratio, warmup_steps = 0.1, None
    assert T.warmup_steps(A, 200) == 20
    A.warmup_steps = 7
    assert T.warmup_steps(A, 200) == 7 and T.warmup_steps(A, 5) == 5


def test_warmup_and_eval_batch_flags_are_checked(tmp_path):
    from visualchat_train import cli

    for flags, msg in ((["--warmup_steps", "-1"], "--warmup_steps must be >= 0"),
                       (["--eval_batch_size", "-2"], "--eval_batch_size must be >= 0"),
                       (["--warmup_ratio", "1.5"], "--warmup_ratio must be in")):
        with pytest.raises(T.TrainError, match=msg):
            T.preflight(cli.parse_args([*flags, "--output_dir", str(tmp_path)]))


# -- eval batch size and the data debug dump (in-process runs of the smoke preset) ---------------------
def test_eval_batch_size_gives_the_same_val_loss_and_debug_dump(tmp_path, monkeypatch):
    from tests.test_train_run import _train_in_process

    sizes = []
    collate = T.Batcher.collate
    monkeypatch.setattr(T.Batcher, "collate", lambda self, items, **kw: sizes.append(len(items)) or collate(self, items, **kw))
    a = _train_in_process(tmp_path / "b1", "--max_steps", "1", "--eval_batch_size", "1")
    assert max(sizes) == 2  # the smoke preset's micro-batch; validation one by one
    sizes.clear()
    b = _train_in_process(tmp_path / "b5", "--max_steps", "1", "--eval_batch_size", "5",
                          "--data_debug_path", str(tmp_path / "debug"), "--warmup_steps", "1")
    assert max(sizes) == 5
    assert a["val_loss_first"] == pytest.approx(b["val_loss_first"], rel=1e-4)
    files = sorted(os.listdir(tmp_path / "debug"))
    assert files == ["shapes_0.txt", "shapes_1.txt", "shapes_2.txt"]
    text = (tmp_path / "debug" / "shapes_0.txt").read_text()
    assert "data set: shapes" in text and "<Image 1:" in text and "[[" in text


# -- the data pipeline: a DataLoader with workers gives the same micro-batches -------------------------
def test_micro_batch_stream_with_workers_matches_the_in_process_order():
    import torch

    from visualchat_train.samples import Sample

    samples = [Sample([i + 1, i + 2, i + 3][: 1 + i % 3], [False] * (1 + i % 3), [-100] + [5] * (i % 3), [])
               for i in range(11)]
    b = T.Batcher(samples, micro=2, world=2, rank=1, seed=5)
    inline = list(T.micro_batch_stream(b, 3, 9, workers=0))
    loaded = list(T.micro_batch_stream(b, 3, 9, workers=2, prefetch=3))
    assert len(inline) == len(loaded) == 9
    for x, y in zip(inline, loaded):
        assert x.keys() == y.keys() and x["n_tokens"] == y["n_tokens"]
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"])
    want = b.collate([samples[j] for j in b.train_indices(3)], to_device=False)
    assert torch.equal(inline[0]["input_ids"], want["input_ids"])


def test_training_with_data_workers_gives_the_same_weights(tmp_path):
    from tests.test_train_run import _train_in_process, assert_same, weights

    a = _train_in_process(tmp_path / "w0", "--max_steps", "3", "--feature_cache", "off")
    b = _train_in_process(tmp_path / "w2", "--max_steps", "3", "--feature_cache", "off", "--data_workers", "2")
    assert a["steps"] == b["steps"] == 3
    assert_same(weights(tmp_path / "w0" / "final"), weights(tmp_path / "w2" / "final"), atol=1e-6)


def test_data_pipeline_bench_runs(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("data_pipeline", os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "data_pipeline.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "r.json"
    r = mod.main(["--workers", "0,1", "--samples", "8", "--images", "4", "--micro", "2", "--image_size", "32",
                  "--consume", "10", "--json", str(out)])
    assert [row["workers"] for row in r["rows"]] == [0, 1] and all(row["samples_per_s"] > 0 for row in r["rows"])
    assert json.loads(out.read_text())["rows"][0]["micro_batches"] == 4 and r["workers_needed"] > 0


# -- image checks once per node, cached ---------------------------------------------------------------
def test_image_checks_once_per_node_are_cached(tmp_path, monkeypatch, caplog):
    from tests.test_data_loaders import COLORS, write_img
    import visualchat_train.samples as S
    from visualchat.template import Conversation, Round

    monkeypatch.setenv("VISUALCHAT_CACHE", str(tmp_path / "cache"))
    good = write_img(tmp_path / "good.jpg", COLORS[0])
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    convs = [Conversation(rounds=[Round("q", images=[good], answer="a")]),
             Conversation(rounds=[Round("q", images=[str(bad)], answer="a")]),
             Conversation(rounds=[Round("q", images=[str(tmp_path / "gone.jpg")], answer="a")])]
    opened = []
    real = S.open_ref
    monkeypatch.setattr(S, "open_ref", lambda r: opened.append(r) or real(r))
    stats = S.DataStats()
    out = S.check_images({"jsonl": convs}, stats, {}, "node")
    assert out["jsonl"] == convs[:1] and stats.as_dict()["jsonl/skipped_bad_image"] == 2
    assert sorted(opened) == sorted([good, str(bad), str(tmp_path / "gone.jpg")])
    assert len(os.listdir(tmp_path / "cache" / "image_checks")) == 1
    # a later run on this node: the two files that exist are not opened again (the missing one has no key)
    opened.clear()
    stats = S.DataStats()
    with caplog.at_level("WARNING"):
        out = S.check_images({"jsonl": convs}, stats, {}, "node")
    assert out["jsonl"] == convs[:1] and stats.as_dict()["jsonl/skipped_bad_image"] == 2
    assert opened == [str(tmp_path / "gone.jpg")] and "bad.jpg" in caplog.text and "checked earlier" in caplog.text
    # a changed file is checked again
    write_img(bad, COLORS[1])
    opened.clear()
    out = S.check_images({"jsonl": convs}, S.DataStats(), {}, "node")
    assert str(bad) in opened and len(out["jsonl"]) == 2


def test_lock_of_a_reused_pid_is_taken_over(tmp_path, live_pid):
    """The pid lives, but it is another process than the one that wrote the lock (its start time differs)."""
    from visualchat_train.lock import start_ticks

    out = str(tmp_path / "run")
    os.makedirs(out)
    ticks = start_ticks(live_pid)
    assert ticks is not None
    with open(os.path.join(out, LOCK_NAME), "w") as f:
        json.dump({"pid": live_pid, "host": socket.gethostname(), "start_ticks": ticks - 1}, f)
    OutputLock(out).acquire().release()
    with open(os.path.join(out, LOCK_NAME), "w") as f:  # the same start time: the owner itself, refused
        json.dump({"pid": live_pid, "host": socket.gethostname(), "start_ticks": ticks}, f)
    with pytest.raises(OutputDirLocked):
        OutputLock(out).acquire()


def test_a_staged_run_records_its_earlier_stages(tmp_path):
    """--init_from: the new checkpoint's info lists every earlier stage (command, hardware, steps, wall
    time), oldest first, read from the checkpoint it started from."""
    import json

    from visualchat_train.trainer import earlier_stages

    s1, s2 = tmp_path / "s1", tmp_path / "s2"
    s1.mkdir()
    s2.mkdir()
    (s1 / "config.json").write_text(json.dumps({"info": {"command": "python -m visualchat_train --preset a", "steps": 693,
                                                         "wall_time_s": 3354.6, "hardware": "CPU"}}))
    first = earlier_stages(str(s1))
    assert first == [{"command": "python -m visualchat_train --preset a", "steps": 693, "wall_time_s": 3354.6, "hardware": "CPU"}]
    (s2 / "config.json").write_text(json.dumps({"info": {"command": "python -m visualchat_train --preset b", "steps": 598,
                                                         "earlier_stages": first}}))
    assert [st["steps"] for st in earlier_stages(str(s2))] == [693, 598]
    assert earlier_stages(str(tmp_path / "missing")) == []
