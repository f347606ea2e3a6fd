"""DeepSpeed-Inference AutoTP over 2 CPU ranks (gloo), launched with torchrun: rank 0 drives chats
through the lockstep, rank 1 follows; logits and answers must match the unsharded 1-rank model.

This file is also the worker: ``torchrun --nproc_per_node 2 -m tests.test_app_tp CKPT_DIR OUT_JSON``.
"""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from webapp.views import FINISH_NOTES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_tiny_checkpoints(tmp, tokenizer, clip_dir):
    """A tiny LLaMA saved as an LM directory, and three checkpoints on it: chat (MMCA), ca, mmca,
    with different (seeded) projections so that the three models differ."""
    from tests.conftest import tiny_llama
    from visualchat.model import VisualChat

    lm_dir = os.path.join(tmp, "lm")
    tiny_llama(tokenizer, initializer_range=0.5).save_pretrained(lm_dir)  # large weights: outputs depend on the input
    tokenizer.save_pretrained(lm_dir)
    out = {}
    for seed, (name, attention) in enumerate([("chat", "mmca"), ("ca", "causal"), ("mmca", "mmca")]):
        with pytest.warns(UserWarning, match="UNTRAINED"):
            vc = VisualChat.from_pretrained(None, lm=lm_dir, vision="clip:" + clip_dir, device="cpu")
        torch.manual_seed(100 + seed)
        with torch.no_grad():
            vc.model.projection.weight.normal_(0, 0.5)
            vc.model.projection.bias.normal_(0, 0.5)
        vc.config.attention = attention
        vc.save_pretrained(os.path.join(tmp, name))
        out[name] = os.path.join(tmp, name)
    out["lm"] = lm_dir
    return out


def _worker(ckpt_root: str, out_path: str) -> None:
    """One rank. Rank 0 runs the scenario and writes the results; rank 1 follows."""
    import warnings

    from PIL import Image

    from visualchat.model import VisualChat
    from visualchat.served import ServedConversation
    from visualchat.server import Server, ServeOptions

    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    lm = os.path.join(ckpt_root, "lm")
    clip = open(os.path.join(ckpt_root, "clip_path")).read().strip()
    ims = [Image.new("RGB", (40, 30), c) for c in [(255, 0, 0), (0, 200, 0), (0, 0, 255)]]
    gen = dict(max_new_tokens=12, temperature=1.0, seed=7)  # sampled: the answers depend on the logits

    def scenario(send):
        """The same conversation, on the 1-rank reference or through the served conversations."""
        answers = []
        answers.append(send("chat", "What is in Image 1 and Image 2?", ims[:2]))
        answers.append(send("chat", "And in Image 3?", ims[2:]))
        answers.append(send("ca", "Compare Image 1 and Image 2.", ims[:2]))
        answers.append(send("mmca", "Compare Image 1 and Image 2.", ims[:2]))
        return answers

    # the 1-rank reference: plain PyTorch, unsharded, fp32 weights (AutoTP shards those), loaded before the
    # process group exists
    ref = {name: VisualChat.from_pretrained(os.path.join(ckpt_root, name), lm=lm, vision="clip:" + clip, device="cpu",
                                            lm_weights="fp32") for name in ("chat", "ca", "mmca")}
    ref_sessions = {name: vc.new_session() for name, vc in ref.items()}
    ids = torch.tensor([list(range(3, 40))])
    is_img = torch.zeros_like(ids, dtype=torch.bool)
    is_img[0, 5:5 + ref["chat"].config.image_tokens] = True
    rows = ref["chat"].model.encode_images(ims[:1])
    with torch.no_grad():
        ref_logits = {name: vc.model(ids, is_img, rows).logits for name, vc in ref.items()}
    ref_answers = scenario(lambda name, q, im: ref_sessions[name].ask(q, im, **gen))
    undo_regen_ref = ref_sessions["chat"]
    undo_regen_ref.undo()
    ref_regen = "".join(undo_regen_ref.regenerate(**gen))

    opts = ServeOptions(checkpoint=os.path.join(ckpt_root, "chat"), lm=lm, vision="clip:" + clip,
                        ca_checkpoint=os.path.join(ckpt_root, "ca"), mmca_checkpoint=os.path.join(ckpt_root, "mmca"),
                        device="cpu", deepspeed="on", tp_allreduce=os.environ.get("TP_ALLREDUCE", "gloo"))
    server = Server.load(opts)
    import torch.distributed as dist

    sharded = sum(p.numel() for p in server.chat.model.lm.get_decoder().layers.parameters())
    full = sum(p.numel() for p in ref["chat"].model.lm.get_decoder().layers.parameters())
    if server.rank != 0:
        server.follow()
        result = {"rank": server.rank, "forwards": server.lockstep.forwards, "lm_params": sharded}
        with open(out_path + f".rank{server.rank}", "w") as f:
            json.dump(result, f)
        return

    chats = {name: ServedConversation(server, name) for name in ("chat", "ca", "mmca")}
    diffs = {}
    for name, vc in server.models.items():
        with torch.no_grad():
            logits = vc.model(ids, is_img, vc.model.encode_images(ims[:1])).logits
        diffs[name] = float((logits - ref_logits[name]).abs().max() / ref_logits[name].abs().max())  # relative
    answers = scenario(lambda name, q, im: "".join(chats[name].send(q, im, **gen)))
    # Stop mid-answer, Undo, Regenerate: the followers crop their caches the same way
    stream = chats["chat"].send("Tell me more about Image 1.", [], max_new_tokens=30, temperature=1.0, seed=1)
    next(stream)
    stream.close()
    chats["chat"].undo()
    chats["chat"].undo()
    regen = "".join(chats["chat"].regenerate(**gen))
    server.lockstep.stop()
    result = {"rank": 0, "world": dist.get_world_size(), "backend": server.backend, "max_logit_diff": diffs,
              "answers": answers, "ref_answers": ref_answers, "regen": regen, "ref_regen": ref_regen,
              "forwards": server.lockstep.forwards, "lm_params": sharded, "lm_params_full": full}
    with open(out_path, "w") as f:
        json.dump(result, f)


@pytest.mark.parametrize("allreduce", ["gloo", "shm"])
def test_autotp_two_cpu_ranks_match_one_rank(tmp_path, tiny_tokenizer, tiny_clip_dir, allreduce):
    """gloo: the default (DeepSpeed's shm op is neither built nor called). shm: DeepSpeed's shared-memory
    kernel, made safe under torchrun by setting LOCAL_SIZE; its first JIT build takes over a minute, so
    it runs only with VISUALCHAT_TEST_SHM=1."""
    if allreduce == "shm" and os.environ.get("VISUALCHAT_TEST_SHM") != "1":
        pytest.skip("set VISUALCHAT_TEST_SHM=1 to test DeepSpeed's shm all-reduce (its JIT build takes > 1 min)")
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not installed")
    pytest.importorskip("deepspeed")
    make_tiny_checkpoints(str(tmp_path), tiny_tokenizer, tiny_clip_dir)
    (tmp_path / "clip_path").write_text(tiny_clip_dir)
    out = tmp_path / "result.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", TP_ALLREDUCE=allreduce, PYTHONPATH=ROOT,
               MASTER_PORT=str(29500 + os.getpid() % 1000))
    env.pop("LOCAL_SIZE", None)  # as torchrun leaves it: the case where DeepSpeed's shm all-reduce crashes
    t0 = time.time()
    proc = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", env["MASTER_PORT"], "-m",
                           "tests.test_app_tp", str(tmp_path), str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    r = json.loads(out.read_text())
    r1 = json.loads((tmp_path / "result.json.rank1").read_text())
    print(f"2-rank run took {time.time() - t0:.1f} s; backend {r['backend']}; diffs {r['max_logit_diff']}")
    assert r["world"] == 2 and "AutoTP over 2 ranks" in r["backend"]
    assert r["lm_params"] < r["lm_params_full"], "the LM was not sharded"
    for name, d in r["max_logit_diff"].items():
        assert d < 1e-5, f"{name}: 2-rank logits differ from 1 rank by {d} (relative to the largest logit)"
    assert r["answers"] == r["ref_answers"]
    assert r["regen"] == r["ref_regen"]
    assert r1["forwards"] == r["forwards"] > 10  # rank 1 ran every forward rank 0 ran


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])


def test_app_served_by_two_ranks_answers_like_one(tmp_path, tiny_tokenizer, tiny_clip_dir):
    """`torchrun --nproc_per_node 2 app.py ...`: rank 0 serves the UI and broadcasts every forward of each
    request; rank 1 runs them in lockstep. Answers through the web API equal the 1-rank model's."""
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not installed")
    pytest.importorskip("deepspeed")
    from gradio_client import Client, handle_file
    from PIL import Image

    from tests.test_app_real import free_port
    from visualchat.model import VisualChat

    paths = make_tiny_checkpoints(str(tmp_path), tiny_tokenizer, tiny_clip_dir)
    port, master = free_port(), free_port()
    log_path = tmp_path / "torchrun.log"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    env.pop("LOCAL_SIZE", None)
    proc = subprocess.Popen([torchrun, "--nproc_per_node", "2", "--master_port", str(master), "app.py",
                             "--checkpoint", paths["chat"], "--ca-checkpoint", paths["ca"],
                             "--mmca-checkpoint", paths["mmca"], "--port", str(port), "--device", "cpu"],
                            cwd=ROOT, env=env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        import urllib.request

        t0 = time.time()
        while True:
            assert proc.poll() is None, log_path.read_text()[-5000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
                break
            except OSError:
                assert time.time() - t0 < 180, log_path.read_text()[-5000:]
                time.sleep(0.3)
        ims = []
        for i, c in enumerate([(255, 0, 0), (0, 200, 0), (0, 0, 255)]):
            ims.append(str(tmp_path / f"im{i}.png"))
            Image.new("RGB", (40, 30), c).save(ims[-1])
        gen = dict(max_new_tokens=12, temperature=1.0, top_p=1.0, repetition_penalty=1.0, seed=3)
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        served = {}
        for model in ("chat", "ca", "mmca"):
            served[model] = client.predict(
                conversation=[{"question": "What is in Image 1?", "images": [handle_file(ims[0])], "answer": "Red."},
                              {"question": "And Image 2 and Image 3?", "images": [handle_file(p) for p in ims[1:]]}],
                model=model, api_name="/generate", **gen)
        chatbot, gallery, prompt, _, status = client.predict(
            {"text": "Describe Image 1.", "files": [handle_file(ims[0])]}, 12, 0.0, 1.0, 1.0, api_name="/chat")
        chatbot, gallery, prompt, _, status = client.predict(
            {"text": "Now Image 2.", "files": [handle_file(ims[1])]}, 12, 0.0, 1.0, 1.0, api_name="/chat")
        assert len(chatbot) == 4 and len(gallery) == 2
    finally:
        import signal

        os.killpg(proc.pid, signal.SIGINT)
        try:
            rc = proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait(10)
    log = log_path.read_text()
    assert "AutoTP over 2 ranks" in log and "rank 1 follows rank 0" in log
    for model in ("chat", "ca", "mmca"):
        vc = VisualChat.from_pretrained(paths[model], device="cpu", lm_weights="fp32")  # as the 2 ranks serve it
        s = vc.new_session()
        s.add_round("What is in Image 1?", [ims[0]], "Red.")
        assert served[model]["answer"] == s.ask("And Image 2 and Image 3?", ims[1:], **gen), model
    s = VisualChat.from_pretrained(paths["chat"], device="cpu", lm_weights="fp32").new_session()
    s.ask("Describe Image 1.", [ims[0]], max_new_tokens=12)
    shown = chatbot[-1]["content"]
    shown = shown[0]["text"] if isinstance(shown, list) else shown
    expected = s.ask("Now Image 2.", [ims[1]], max_new_tokens=12) or "*(no answer)*"
    if s.finish_reason in FINISH_NOTES:  # the chat says why an answer ended when the model did not end it
        expected += f"\n\n*({FINISH_NOTES[s.finish_reason]})*"
    assert shown == expected
    assert rc is not None
    assert "[rank0]: Traceback" not in log and "[rank1]: Traceback" not in log, log[-3000:]  # Ctrl-C: both ranks end cleanly
