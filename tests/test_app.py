"""The Gradio app's handlers and the serving layer, called as plain functions on tiny models (no browser,
no server). The same tiny models serve the gradio_client tests (test_app_client.py)."""
import base64
import io
import logging
import os
import pickle
import subprocess
import sys
import time
import types

import pytest
import torch
from PIL import Image

from tests.conftest import color_image, tiny_llama
from webapp import views

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "assets", "examples")


# ---------------------------------------------------------------------------------------------------
# Fixtures and helpers shared with the other app tests


def build_tiny_models(tokenizer, clip_dir, init=0.2):
    """chat (MMCA), CA and MMCA VisualChats sharing one tiny LM and one encoder. ``init`` 0.2 makes the
    random LM write varied text instead of a run of newlines."""
    from visualchat.encoders import build_encoder
    from visualchat.model import VisualChat

    lm = tiny_llama(tokenizer, initializer_range=init)
    enc = build_encoder("clip:" + clip_dir)
    out = []
    for seed, attention in enumerate(["mmca", "causal", "mmca"]):
        torch.manual_seed(10 + seed)
        vc = VisualChat.from_components(lm, tokenizer, enc, attention=attention)
        with torch.no_grad():
            vc.model.projection.weight.normal_(0, 0.3)
        out.append(vc)
    return out


@pytest.fixture(scope="module")
def tiny_models(tiny_tokenizer, tiny_clip_dir):
    return build_tiny_models(tiny_tokenizer, tiny_clip_dir)


@pytest.fixture
def demo(tiny_models):
    import app

    chat, ca, mm = tiny_models
    return app.build_demo(chat, compare=(ca, mm))


def png_bytes(im) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def write_bad_files(d):
    """A text file, a truncated PNG and a decompression bomb (a tiny file that decodes to 64 Mpx)."""
    d = str(d)
    text = os.path.join(d, "notes.txt")
    with open(text, "w") as f:
        f.write("this is not an image\n")
    corrupt = os.path.join(d, "corrupt.png")
    with open(corrupt, "wb") as f:
        f.write(png_bytes(color_image((1, 2, 3), (64, 64)))[:60])
    bomb = os.path.join(d, "bomb.png")
    Image.new("1", (8000, 8000)).save(bomb, optimize=True)
    return {"text": text, "corrupt": corrupt, "bomb": bomb}


def image_files(d, n, size=(40, 30)):
    paths = []
    for i in range(n):
        p = os.path.join(str(d), f"img{i}.png")
        color_image(((40 * i) % 256, 255 - (30 * i) % 256, (70 * i) % 256), size).save(p)
        paths.append(p)
    return paths


def last(gen):
    """Run a handler generator to the end; return its last output and how many it yielded."""
    out, n = None, 0
    for out in gen:
        n += 1
    return out, n


class Slow:
    """Make a model's forwards slow (so that Stop can land mid-answer) or fail after some calls."""

    active, saved_env = 0, None

    def __init__(self, vc, delay=0.0, fail_after=None):
        self.vc, self.delay, self.fail_after, self.calls = vc, delay, fail_after, 0
        self.orig = vc.model.forward

    def __enter__(self):
        def forward(*a, **k):
            self.calls += 1
            if self.fail_after is not None and self.calls > self.fail_after:
                raise RuntimeError("simulated failure inside the model")
            time.sleep(self.delay)
            return self.orig(*a, **k)

        self.vc.model.forward = forward
        # every decode step must go through model.forward to be slowed or failed: switch off the lean
        # LLaMA decode step (visualchat/kernels/decode.py), which runs the layers itself
        if Slow.active == 0:
            Slow.saved_env = os.environ.get("VISUALCHAT_DECODE")
            os.environ["VISUALCHAT_DECODE"] = "hf"
        Slow.active += 1
        return self

    def __exit__(self, *exc):
        self.vc.model.forward = self.orig
        Slow.active -= 1
        if Slow.active == 0:  # the last one out restores what was there before the first came in
            if Slow.saved_env is None:
                os.environ.pop("VISUALCHAT_DECODE", None)
            else:
                os.environ["VISUALCHAT_DECODE"] = Slow.saved_env


SETTINGS = (24, 0.0, 1.0, 1.0)  # max new tokens, temperature, top-p, repetition penalty


def msg(text, files=()):
    return {"text": text, "files": [{"path": f} for f in files]}


# ---------------------------------------------------------------------------------------------------
# Chat tab


def test_two_rounds_three_images_gallery_chat_and_prompt(demo, tmp_path):
    from webapp.state import TabState

    ui, tab = demo.ui, TabState()
    ims = image_files(tmp_path, 3)
    views = list(ui.chat.send(msg("What is in Image 1 and Image 2?", ims[:2]), tab, *SETTINGS))
    assert len(views) >= 2  # the question shows at once, the answer follows
    busy, idle = views[0][3], views[-1][3]
    assert busy.value == {"text": "", "files": []}  # the message was taken: the box is cleared at once
    assert busy.stop_btn and not busy.submit_btn and idle.submit_btn and not idle.stop_btn  # stop while generating
    chatbot, gallery, prompt, _, status = last(ui.chat.send(msg("And Image 3?", ims[2:]), tab, *SETTINGS))[0]
    assert [c for _, c in gallery] == ["Image 1", "Image 2", "Image 3"]
    user = [m for m in chatbot if m["role"] == "user"]
    assert [len([c for c in m["content"] if isinstance(c, dict)]) for m in user] == [2, 1]  # images beside their round
    assert [c["alt_text"] for c in user[1]["content"] if isinstance(c, dict)] == ["Image 3"]
    assert "Image 3 attached" in user[1]["content"][-1]
    k = demo.serving.chat.config.image_tokens
    assert f"### Image 3:\n[Image 3: {k} tokens]\n### Question:\nAnd Image 3?" in prompt
    assert prompt.count("### Answer:") == 2
    assert "tokens/s" in status
    chat = tab.chat
    assert [len(r.paths) for r in chat.rounds] == [2, 1] and all(r.answer is not None for r in chat.rounds)
    # the display copies are served from a temp folder, one per image
    assert all(os.path.isfile(p) for p, _ in gallery)


def test_streaming_stop_keeps_partial_then_regenerate_undo_clear(demo, tmp_path):
    from webapp.state import TabState

    ui, tab = demo.ui, TabState()
    vc = demo.serving.chat
    with Slow(vc, delay=0.01):
        gen = ui.chat.send(msg("Describe Image 1.", image_files(tmp_path, 1)), tab, 200, 0.0, 1.0, 1.0)
        first = next(gen)
        assert first[0][-1]["content"] == views.GENERATING  # the question is shown before the first token
        partial = None
        for view in gen:
            partial = view[0][-1]["content"]
            if partial not in (views.GENERATING, "") and len(partial) > 3:
                break
        gen.close()  # what the Stop button (a cancelled event) does
    chat = tab.chat
    assert chat.status == "stopped"
    kept = chat.rounds[-1].answer
    assert kept and partial.strip().startswith(kept[:3])
    chatbot, _, prompt, _, status = ui.chat.refresh(tab)
    assert "Stopped" in status and chatbot[-1]["content"] == f"{kept}\n\n*({views.FINISH_NOTES['stopped']})*"
    assert kept in prompt and chat.finish_reason == "stopped"
    # Regenerate replaces the last answer; Undo removes the round; Clear empties everything
    chatbot, *_ , status = last(ui.chat.regenerate(tab, *SETTINGS))[0]
    assert len(chatbot) == 2 and chat.status == "done"
    chatbot, gallery, prompt, textbox, status = ui.chat.undo(tab)
    assert chatbot == [] and gallery == [] and "Removed the last round" in status
    # the question and its image go back into the input box, the image as the model saw it
    assert textbox.value["text"] == "Describe Image 1." and len(textbox.value["files"]) == 1
    back = textbox.value["files"][0]
    with Image.open(back["path"] if isinstance(back, dict) else back) as im:
        assert im.size == (40, 30)
    assert "Nothing to undo" in ui.chat.undo(tab)[4]
    last(ui.chat.send(msg("Hi?"), tab, *SETTINGS))
    chatbot, gallery, prompt, textbox, status = ui.chat.clear(tab)
    assert chatbot == [] and gallery == [] and "### Question" not in prompt


def test_examples_play_whole_conversations(demo):
    import app
    from webapp.state import TabState

    ui, tab = demo.ui, TabState()
    for i, (title, rounds) in enumerate(app.EXAMPLES):
        for _, files in rounds:
            for f in files:
                assert os.path.isfile(os.path.join(app.EXAMPLES_DIR, f)), f
        chatbot, gallery, prompt, _, status = last(ui.chat.run_example(i, tab, 8, 0.0, 1.0, 1.0))[0]
        assert len(chatbot) == 2 * len(rounds), title
        assert len(gallery) == sum(len(f) for _, f in rounds)
        assert prompt.count("### Question:") == len(rounds)
    assert any(len(r) > 1 for _, r in app.EXAMPLES) and any(len(f) > 1 for _, r in app.EXAMPLES for _, f in r)


@pytest.mark.parametrize("case", ["text", "corrupt", "bomb", "too_many", "empty", "context", "settings"])
def test_bad_input_is_refused_visibly_and_keeps_the_conversation(demo, tmp_path, case):
    from webapp.state import TabState

    ui, tab = demo.ui, TabState()
    ims = image_files(tmp_path, 9)
    last(ui.chat.send(msg("What is in Image 1?", ims[:1]), tab, *SETTINGS))
    before = (tab.chat.prompt_text(), len(tab.chat.image_paths))
    bad = write_bad_files(tmp_path)
    settings = SETTINGS
    if case in ("text", "corrupt", "bomb"):
        m = msg("And this one?", [bad[case]])
        expect = {"text": "not an image", "corrupt": "corrupt or truncated", "bomb": "decompression bomb"}[case]
    elif case == "too_many":
        m, expect = msg("All of them?", ims[1:9]), "at most 8"
    elif case == "empty":
        m, expect = msg("   "), "empty"
    elif case == "context":
        m, expect = msg("why " * 600), "context window"
    else:
        m, expect, settings = msg("Hello?"), "top_p", (24, 0.0, 0.0, 1.0)
    views = list(ui.chat.send(m, tab, *settings))
    assert len(views) == 1
    chatbot, gallery, prompt, textbox, status = views[0]
    assert expect in status and "Not sent" in status and "unchanged" in status
    assert (prompt, len(gallery)) == before
    assert textbox == {"__type__": "update"}  # the message stays in the box, to fix and resend
    assert expect in ui.chat.refresh(tab)[4]  # the notice survives the refresh that follows every request
    # and the app keeps serving this chat
    chatbot, gallery, *_ = last(ui.chat.send(msg("Still there?"), tab, *SETTINGS))[0]
    assert len(chatbot) == 4 and tab.chat.status == "done"


def test_exception_during_generation_keeps_partial_and_recovers(demo):
    from webapp.state import TabState

    ui, tab = demo.ui, TabState()
    with Slow(demo.serving.chat, fail_after=5):
        chatbot, _, prompt, _, status = last(ui.chat.send(msg("Tell me a story."), tab, 40, 0.0, 1.0, 1.0))[0]
    assert "failed while answering" in status and "simulated failure" in status
    assert tab.chat.status == "failed" and len(tab.chat.rounds) == 1  # the round and its partial answer stay
    chatbot, *_ = last(ui.chat.send(msg("Again?"), tab, *SETTINGS))[0]
    assert len(chatbot) == 4 and tab.chat.status == "done"
    # a failure before the first token drops the round (nothing to keep), and says so
    with Slow(demo.serving.chat, fail_after=0):
        chatbot, _, _, _, status = last(ui.chat.send(msg("Once more?"), tab, *SETTINGS))[0]
    assert "failed" in status and len(chatbot) == 4


def test_tabs_are_isolated(demo, tmp_path):
    from webapp.state import TabState

    ui = demo.ui
    a, b = TabState(), TabState()
    last(ui.chat.send(msg("Alice's question about Image 1", image_files(tmp_path, 1)), a, *SETTINGS))
    chatbot, gallery, prompt, *_ = last(ui.chat.send(msg("Bob's question"), b, *SETTINGS))[0]
    assert gallery == [] and "Alice" not in prompt and len(chatbot) == 2
    import copy

    fresh = copy.deepcopy(a)  # what Gradio does with the initial State value for every new tab
    assert fresh.chat is None and a.chat is not None


# ---------------------------------------------------------------------------------------------------
# Compare tab


def test_compare_streams_both_models(demo, tmp_path):
    from webapp.state import TabState

    ui, tab = demo.ui, TabState()
    ims = image_files(tmp_path, 2)
    views = list(ui.compare.send(msg("What is different between Image 1 and Image 2?", ims), tab, *SETTINGS))
    ca, mm, gallery, textbox, status = views[-1]
    assert len(ca) == 2 and len(mm) == 2 and [c for _, c in gallery] == ["Image 1", "Image 2"]
    assert ca[1]["content"] and mm[1]["content"]
    assert ca[1]["content"] != mm[1]["content"]  # different projections and attention modes
    pair = tab.compare
    assert pair[0].vc.model.attention_mode == "causal" and pair[1].vc.model.attention_mode == "mmca"
    # bad input is refused for both columns
    ca, mm, gallery, _, status = list(ui.compare.send(msg(""), tab, *SETTINGS))[-1]
    assert "empty" in status and len(ca) == 2 and len(mm) == 2
    ca, mm, gallery, _, _ = last(ui.compare.run_example(1, tab, 8, 0.0, 1.0, 1.0))[0]
    assert len(ca) == 2 and len(gallery) == 2
    assert ui.compare.clear(tab)[0] == []


def test_compare_tab_says_what_is_missing(tiny_models):
    import app

    demo = app.build_demo(tiny_models[0], compare_missing=["assets/checkpoints/shapes-ca",
                                                           "assets/checkpoints/shapes-mmca"])
    from webapp.state import TabState

    out = list(demo.ui.compare.send(msg("Hi"), TabState(), *SETTINGS))
    assert "shapes-ca" in out[-1][4] and "shapes-mmca" in out[-1][4] and "missing" in out[-1][4]


def test_server_load_shares_lm_and_encoder_and_reports_missing(tmp_path, tiny_tokenizer, tiny_clip_dir, caplog,
                                                               monkeypatch):
    """Server.load (what app.py runs): the compare models reuse the chat model's LM and encoder, so the
    tab costs about one model's memory; without checkpoints it says which are missing."""
    from tests.test_app_tp import make_tiny_checkpoints
    from visualchat.server import Server, ServeOptions

    paths = make_tiny_checkpoints(str(tmp_path), tiny_tokenizer, tiny_clip_dir)
    opts = ServeOptions(checkpoint=paths["chat"], ca_checkpoint=paths["ca"], mmca_checkpoint=paths["mmca"],
                        device="cpu", deepspeed="off")
    s = Server.load(opts)
    ca, mm, chat = s.compare.ca, s.compare.mmca, s.chat
    assert ca.model.lm is chat.model.lm and mm.model.lm is chat.model.lm
    assert ca.model.encoder is chat.model.encoder and mm.model.encoder is chat.model.encoder
    assert ca.model.attention_mode == "causal" and mm.model.attention_mode == "mmca"
    assert not torch.equal(ca.model.projection.weight, mm.model.projection.weight)
    shared = sum(p.numel() for p in chat.model.lm.parameters()) + sum(p.numel() for p in chat.model.encoder.parameters())
    own = sum(p.numel() for m in (ca, mm) for p in [*m.model.projection.parameters(), *m.model.embed_tokens.parameters()])
    assert own < shared  # each extra model costs its projection and embedding copy only
    # the chat checkpoint given as the MMCA one is the same model, not a second copy
    s2 = Server.load(ServeOptions(checkpoint=paths["chat"], ca_checkpoint=paths["ca"], mmca_checkpoint=paths["chat"],
                                  device="cpu", deepspeed="off"))
    assert s2.compare.mmca is s2.chat
    # no compare checkpoints shipped: the note names both defaults
    monkeypatch.setattr("visualchat.server.shipped_checkpoint", lambda name: None)
    s3 = Server.load(ServeOptions(checkpoint=paths["chat"], device="cpu", deepspeed="off"))
    assert not s3.compare.ready
    assert "shapes-ca" in s3.compare.note and "shapes-mmca" in s3.compare.note and "--ca-checkpoint" in s3.compare.note


# ---------------------------------------------------------------------------------------------------
# The stateless API


def test_api_generate_whole_conversation(demo, tmp_path, monkeypatch):
    import gradio as gr

    ui = demo.ui
    upload = tmp_path / "uploads"
    upload.mkdir()
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(upload))
    ims = image_files(upload, 2)
    data_url = "data:image/png;base64," + base64.b64encode(png_bytes(color_image((9, 9, 200)))).decode()
    conv = [{"question": "What is in Image 1?", "images": [{"path": ims[0]}], "answer": "A square."},
            {"question": "Compare Image 1, Image 2 and Image 3.", "images": [{"path": ims[1]}, data_url]}]
    outs = list(ui.api_generate(conv, max_new_tokens=12))
    assert all(o["finish_reason"] is None for o in outs[:-1]) and outs[-1]["finish_reason"] in ("stop", "length")
    answer = outs[-1]["answer"]
    # the same conversation in a chat session (greedy) gives the same answer
    s = demo.serving.chat.new_session()
    s.add_round("What is in Image 1?", [ims[0]], "A square.")
    from webapp.api import api_image

    assert answer == s.ask("Compare Image 1, Image 2 and Image 3.", [ims[1], api_image(data_url)], max_new_tokens=12)
    for model in ("ca", "mmca"):
        assert isinstance(list(ui.api_generate(conv, max_new_tokens=4, model=model))[-1]["answer"], str)
    bad = [
        ([], "non-empty list"),
        ([{"question": ""}], "empty"),
        ([{"question": "Hi", "images": [{"path": "/etc/hostname"}]}], "not uploaded through this server"),
        ([{"question": "Hi", "images": [42]}], r"image 1 \(round 1\) must be a file"),
        ([{"question": "Hi", "answer": "done"}], "already has an answer"),
        ([{"question": "Hi", "images": ["data:image/png;base64,aGVsbG8="]}], "not an image"),
        ([{"question": "Hi", "image": []}], "unknown keys"),
        ([{"question": "Hi", "images": [{"path": ims[0]}] * 9}], "at most 8"),
        ([{"question": "why " * 600}], "context window"),
    ]
    for conv, expect in bad:
        with pytest.raises(gr.Error, match=expect):
            list(ui.api_generate(conv))
    with pytest.raises(gr.Error, match="model must be one of"):
        list(ui.api_generate([{"question": "Hi"}], model="gpt"))


# ---------------------------------------------------------------------------------------------------
# ZeroGPU: stateless replay through spaces.GPU


def test_zero_gpu_replay_matches_stateful_and_pickles_everything(tiny_models, tmp_path, monkeypatch):
    """On ZeroGPU, spaces.GPU runs the function in a forked worker with pickled arguments. A fake
    ``spaces`` that pickles both ways proves that the chat needs no shared state with the worker."""
    import app
    from webapp.state import TabState

    calls = []

    def GPU(fn=None, duration=None):
        def wrap(f):
            def run(*args, **kwargs):
                args, kwargs = pickle.loads(pickle.dumps((args, kwargs)))
                calls.append(args[0])
                for piece in f(*args, **kwargs):
                    yield pickle.loads(pickle.dumps(piece))
            return run
        return wrap(fn) if fn is not None else wrap

    monkeypatch.setitem(sys.modules, "spaces", types.SimpleNamespace(GPU=GPU))
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    chat, ca, mm = tiny_models
    zero = app.build_demo(chat, compare=(ca, mm))
    assert zero.serving.stateless
    monkeypatch.delenv("SPACES_ZERO_GPU")
    local = app.build_demo(chat, compare=(ca, mm))
    assert not local.serving.stateless
    ims = image_files(tmp_path, 3)
    tabs = {}
    for name, d in (("zero", zero), ("local", local)):
        tab = tabs[name] = TabState()
        last(d.ui.chat.send(msg("What is in Image 1 and Image 2?", ims[:2]), tab, *SETTINGS))
        last(d.ui.chat.send(msg("And Image 3?", ims[2:]), tab, *SETTINGS))
        last(d.ui.chat.regenerate(tab, *SETTINGS))
    assert [r.answer for r in tabs["zero"].chat.rounds] == [r.answer for r in tabs["local"].chat.rounds]
    assert tabs["zero"].chat.prompt_text() == tabs["local"].chat.prompt_text()
    assert len(calls) == 3
    # Stop keeps the partial answer in the replayed conversation too
    with Slow(chat, delay=0.01):
        gen = zero.ui.chat.send(msg("Go on."), tabs["zero"], 200, 0.0, 1.0, 1.0)
        for i, _ in enumerate(gen):
            if i == 3:
                break
        gen.close()
    assert tabs["zero"].chat.status == "stopped" and tabs["zero"].chat.rounds[-1].answer is not None
    # bad input is refused before any GPU time is spent
    n = len(calls)
    out = list(zero.ui.chat.send(msg("", ims[:1]), tabs["zero"], *SETTINGS))
    assert "empty" in out[-1][4] and len(calls) == n


# ---------------------------------------------------------------------------------------------------
# DeepSpeed wrapping and the fallback


def test_deepspeed_inference_wraps_one_rank_and_logits_match(tiny_models):
    pytest.importorskip("deepspeed")
    from visualchat.tensor_parallel import wrap_deepspeed

    vc = tiny_models[0]
    ids = torch.tensor([list(range(3, 30))])
    is_img = torch.zeros_like(ids, dtype=torch.bool)
    with torch.no_grad():
        before = vc.model(ids, is_img).logits
    backend = wrap_deepspeed(vc.model.lm, "auto", 1, torch.float32)
    assert backend.startswith("DeepSpeed-Inference") and "kernel injection off" in backend
    assert vc.model.lm.config._attn_implementation == "visualchat"  # our attention is still the one used
    with torch.no_grad():
        assert torch.equal(vc.model(ids, is_img).logits, before)


def test_without_deepspeed_the_app_logs_it_and_serves_with_pytorch(tiny_models, monkeypatch, caplog):
    from visualchat.tensor_parallel import wrap_deepspeed

    monkeypatch.setitem(sys.modules, "deepspeed", None)  # `import deepspeed` now raises ImportError
    with caplog.at_level(logging.WARNING, logger="visualchat.tensor_parallel"):
        backend = wrap_deepspeed(tiny_models[0].model.lm, "auto", 1, torch.float32)
    assert backend.startswith("PyTorch (DeepSpeed unavailable")
    assert "DeepSpeed could not be loaded" in caplog.text and "plain PyTorch" in caplog.text
    with pytest.raises(RuntimeError, match="several ranks need it"):
        wrap_deepspeed(tiny_models[0].model.lm, "auto", 2, torch.float32)


def test_shm_allreduce_is_routed_through_the_process_group(monkeypatch):
    """The workaround itself: deepspeed.comm.inference_all_reduce becomes torch.distributed.all_reduce."""
    pytest.importorskip("deepspeed")
    import deepspeed.comm as dscomm
    import torch.distributed as dist

    from visualchat.tensor_parallel import route_inference_all_reduce_through_process_group

    monkeypatch.setattr(dscomm, "inference_all_reduce", dscomm.inference_all_reduce)
    seen = []
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "all_reduce", lambda t, op=None, group=None: seen.append((t, op, group)) or t.mul_(2))
    route_inference_all_reduce_through_process_group()
    t = torch.ones(3)
    assert dscomm.inference_all_reduce(t, group="g") is t and torch.equal(t, torch.full((3,), 2.0))
    assert seen[0][1] == dist.ReduceOp.SUM and seen[0][2] == "g"
    patched = dscomm.inference_all_reduce
    route_inference_all_reduce_through_process_group()  # idempotent
    assert dscomm.inference_all_reduce is patched


# ---------------------------------------------------------------------------------------------------
# Flags and environment variables


def test_help_documents_every_flag():
    out = subprocess.run([sys.executable, "app.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for flag in ["--checkpoint", "--lm", "--vision", "--ca-checkpoint", "--mmca-checkpoint", "--no-compare", "--device",
                 "--dtype", "--load-in", "--deepspeed", "--tp-allreduce", "--host", "--port", "--queue-size",
                 "--concurrency", "--max-new-tokens", "--max-file-size", "--share", "--trust-remote-code",
                 "--log-level"]:
        assert flag in out.stdout, flag
    for env in ["VISUALCHAT_CHECKPOINT", "VISUALCHAT_LM", "VISUALCHAT_VISION", "VISUALCHAT_DEVICE", "VISUALCHAT_DTYPE",
                "VISUALCHAT_LOAD_IN", "VISUALCHAT_HOST", "VISUALCHAT_PORT", "VISUALCHAT_MAX_PIXELS", "GRADIO_SERVER_NAME"]:
        assert env in out.stdout, env
    assert "127.0.0.1" in out.stdout and "7860" in out.stdout


def test_environment_configures_a_space_without_code_changes(monkeypatch):
    import app

    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")  # what Spaces sets
    monkeypatch.setenv("VISUALCHAT_PORT", "7999")
    monkeypatch.setenv("VISUALCHAT_CHECKPOINT", "/ckpt")
    monkeypatch.setenv("VISUALCHAT_LOAD_IN", "4bit")
    monkeypatch.setenv("VISUALCHAT_DTYPE", "bfloat16")
    monkeypatch.setenv("VISUALCHAT_COMPARE", "0")
    monkeypatch.setenv("VISUALCHAT_QUEUE_SIZE", "3")
    a = app.parse_args([])
    assert (a.host, a.port, a.checkpoint, a.load_in, a.dtype, a.compare, a.queue_size) == (
        "0.0.0.0", 7999, "/ckpt", "4bit", "bfloat16", False, 3)
    o = app.serve_options(a)
    assert o.quantization == "4bit" and o.checkpoint == "/ckpt" and not o.compare
    assert app.parse_args(["--port", "1234", "--local_rank=1"]).port == 1234  # the DeepSpeed launcher's flag is accepted


# ---------------------------------------------------------------------------------------------------
# Issue 16: what the default knows, the trash icon, Stop, the Compare stop note, where it looked


def _elem(demo, elem_id):
    return next(c for c in demo.config["components"] if c.get("props", {}).get("elem_id") == elem_id)


def _listeners(demo, elem_id, event):
    """The event listeners that ``event`` of the component ``elem_id`` triggers directly."""
    cid = _elem(demo, elem_id)["id"]
    return [f for f in demo.fns.values() if (cid, event) in f.targets and f.fn is not None]  # not the cancels


def _then(demo, dep):
    """The chain that follows a listener (.then, .then, ...)."""
    out, cur = [], dep
    while True:
        nxt = [f for f in demo.fns.values() if f.trigger_after == cur._id]
        if not nxt:
            return out
        cur = nxt[0]
        out.append(cur)


def test_page_says_what_the_default_knows_and_steers_to_shapes_questions(tiny_models, monkeypatch):
    import app

    chat, ca, mm = tiny_models
    plain = app.build_demo(chat, compare=(ca, mm))
    assert not [c for c in plain.config["components"] if c.get("props", {}).get("elem_id") == "vc-knows"]
    # a checkpoint trained on the shapes world (as the shipped default records in its config.json)
    monkeypatch.setattr(chat.config, "info", {"datasets": ["shapes", "jsonl"]})
    d = app.build_demo(chat, compare=(ca, mm))
    note = _elem(d, "vc-knows")["props"]["value"]
    assert "synthetic world of coloured shapes" in note and "Train your own" in note and "--checkpoint" in note
    ids = [c["id"] for c in d.config["components"]]
    assert ids.index(_elem(d, "vc-knows")["id"]) == ids.index(_elem(d, "vc-model")["id"]) + 1  # next to the model line
    assert "What color is the star in Image 1?" in _elem(d, "message")["props"]["placeholder"]
    assert "shapes" in _elem(d, "chatbot")["props"]["placeholder"]
    assert "shapes scenes" in _elem(d, "examples")["props"]["label"]



def test_untrained_banner_follows_the_models_attribute(tiny_models, monkeypatch):
    """The page warns about an untrained projection when the model says so (``VisualChat.untrained``, set by
    from_pretrained when no checkpoint was loaded), not by reading captured warnings."""
    import app

    chat, ca, mm = tiny_models
    assert chat.untrained is False and chat.path is None  # built from parts: both set in __init__
    has_banner = lambda d: any(c.get("props", {}).get("elem_id") == "vc-untrained"  # noqa: E731
                               for c in d.config["components"])
    assert not has_banner(app.build_demo(chat, compare=(ca, mm)))
    monkeypatch.setattr(chat, "untrained", True)
    d = app.build_demo(chat, compare=(ca, mm))
    assert "Untrained projection" in _elem(d, "vc-untrained")["props"]["value"]

def test_chat_trash_icon_clears_like_clear(demo, tmp_path):
    from webapp.state import TabState

    ui, tab = demo.ui, TabState()
    last(ui.chat.send(msg("What is in Image 1?", image_files(tmp_path, 1)), tab, *SETTINGS))
    (trash,) = _listeners(demo, "chatbot", "clear")
    assert trash.fn == ui.chat.clear
    chatbot, gallery, prompt, textbox, status = trash.fn(tab)  # what clicking the trash icon runs
    assert chatbot == [] and gallery == [] and "### Question" not in prompt
    assert tab.chat.conversation.rounds == []  # the model's state too: the next answer does not bring it back
    chatbot, gallery, prompt, *_ = last(ui.chat.send(msg("Hi?"), tab, *SETTINGS))[0]
    assert len(chatbot) == 2 and gallery == [] and "What is in Image 1?" not in prompt


def test_chat_and_compare_are_one_panel_with_one_set_of_handlers(demo):
    """The Chat tab is a panel with one model, Compare the same panel with two: every event of both tabs
    runs the same Panel method (no per-tab copies), bound to that tab's panel."""
    from webapp.panel import Panel

    ui = demo.ui
    assert type(ui.chat) is Panel and type(ui.compare) is Panel
    assert ui.chat.spec.models == ("chat",) and ui.compare.spec.models == ("ca", "mmca")
    for name in ("send", "run_example", "clear", "refresh", "looked"):
        panels = {f.fn.__self__.spec.key for f in demo.fns.values()
                  if getattr(f.fn, "__func__", None) is getattr(Panel, name)}
        assert panels == {"chat", "compare"}, name
    assert not [n for n in dir(ui) if n.startswith("compare_")]


def test_compare_trash_icons_clear_both_columns(demo, tmp_path):
    from webapp.state import TabState

    ui, tab = demo.ui, TabState()
    last(ui.compare.send(msg("What is in Image 1?", image_files(tmp_path, 1)), tab, *SETTINGS))
    for elem in ("chat-ca", "chat-mmca"):
        (trash,) = _listeners(demo, elem, "clear")
        assert trash.fn == ui.compare.clear
    ca, mm, gallery, _, _ = _listeners(demo, "chat-mmca", "clear")[0].fn(tab)
    assert ca == [] and mm == [] and gallery == []
    assert all(c.conversation.rounds == [] for c in tab.compare)


@pytest.mark.parametrize("tab_name,stop,trigger", [("chat", "stop", ("message", "submit")),
                                                   ("chat", "stop", ("regenerate", "click")),
                                                   ("chat", "stop", ("examples", "click")),
                                                   ("compare", "compare-stop", ("compare-message", "submit")),
                                                   ("compare", "compare-stop", ("compare-examples", "click"))])
def test_stop_is_enabled_and_red_only_while_answering(demo, tab_name, stop, trigger):
    ui = demo.ui
    stop_id = _elem(demo, stop)["id"]
    props = _elem(demo, stop)["props"]
    assert props["interactive"] is False and props["variant"] != "stop"  # idle: disabled, not red
    (busy,) = _listeners(demo, *trigger)  # the trigger turns Stop on first ...
    assert [o._id for o in busy.outputs] == [stop_id] and not busy.queue
    b = busy.fn()
    assert b.interactive is True and b.variant == "stop"
    chain = _then(demo, busy)  # ... then the answer runs, and after it ends (or is stopped) Stop turns off
    answer = {"message": ui.chat.send, "regenerate": ui.chat.regenerate, "examples": ui.chat.run_example,
              "compare-message": ui.compare.send, "compare-examples": ui.compare.run_example}[trigger[0]]
    assert chain[0].fn == answer
    idle = [d for d in chain[1:] if [o._id for o in d.outputs] == [stop_id]]
    assert len(idle) == 1 and idle[0].fn == ui.stop_idle
    i = idle[0].fn()
    assert i.interactive is False and i.variant != "stop"
    assert isinstance(views.stop_button(False), type(b))


def test_compare_stop_note_does_not_point_to_regenerate(demo, tmp_path):
    from webapp.state import TabState

    ui, tab = demo.ui, TabState()
    _, ca_vc, mm_vc = demo.serving.chat, demo.serving.compare.ca, demo.serving.compare.mmca
    with Slow(ca_vc, delay=0.01), Slow(mm_vc, delay=0.01):
        gen = ui.compare.send(msg("Describe Image 1.", image_files(tmp_path, 1)), tab, 200, 0.0, 1.0, 1.0)
        for i, _ in enumerate(gen):
            if i == 4:
                break
        gen.close()  # Stop
    status = ui.compare.refresh(tab)[4]
    assert "Stopped" in status and "Regenerate" not in status
    assert "Regenerate" in views.outcome_html(tab.compare[0])  # the Chat tab's note still says it


def test_where_it_looked_chat_tab(demo, tmp_path):
    from PIL import Image

    from webapp.state import TabState

    ui, tab = demo.ui, TabState()
    gallery, note = ui.chat.looked(True, -1, tab)
    assert gallery == [] and "no answer yet" in note
    ims = image_files(tmp_path, 2, size=(64, 48))
    last(ui.chat.send(msg("Which is brighter, Image 1 or Image 2?", ims), tab, *SETTINGS))
    gallery, note = ui.chat.looked(True, -1, tab)
    assert [c.split(" · ")[0] for _, c in gallery] == ["Image 1", "Image 2"]
    shares = [float(c.split(" · ")[1].split("%")[0]) for _, c in gallery]
    assert abs(sum(shares) - 100) <= 1
    assert "Where it looked" in note and "mean of all 2 layers" in note and "MMCA" in note
    for (path, _), src in zip(gallery, tab.chat.image_paths):  # each image with its map beside it
        drawn, plain = Image.open(path), Image.open(src)
        assert drawn.size == (2 * plain.size[0] + 6, plain.size[1])
        assert drawn.crop((0, 0, *plain.size)).tobytes() != plain.convert("RGB").tobytes()  # the outline
    gallery1, note1 = ui.chat.looked(True, 1, tab)
    assert "layer 2 of 2" in note1 and not any(os.path.exists(p) for p, _ in gallery)  # the old overlays are gone
    m = tab.chat.attention_maps()
    assert [c for _, c in gallery1] == [f"Image {i + 1} · {s:.0%}"
                                        for i, s in enumerate(m.shares(1))]
    plain, note = ui.chat.looked(False, -1, tab)
    assert plain == app_gallery(tab.chat) and note == ""


def app_gallery(chat):
    return views.gallery_items(chat)


def test_where_it_looked_compare_tab_side_by_side(demo, tmp_path):
    from webapp.state import TabState

    ui, tab = demo.ui, TabState()
    last(ui.compare.send(msg("What is different between Image 1 and Image 2?", image_files(tmp_path, 2)), tab,
                         *SETTINGS))
    gallery, note = ui.compare.looked(True, -1, tab)
    assert [c.split(" · ")[1].split()[0] for _, c in gallery] == ["CA", "MMCA", "CA", "MMCA"]
    assert [c.split(" · ")[0] for _, c in gallery] == ["Image 1", "Image 1", "Image 2", "Image 2"]
    assert "CA uses causal attention" in note and "went to image tokens at all" in note and "MMCA uses MMCA" in note
    ca_maps, mm_maps = (c.attention_maps() for c in tab.compare)
    assert ca_maps.mode == "causal" and mm_maps.mode == "mmca"
    assert f"{ca_maps.image_share():.0%} of its attention" in note
    assert ui.compare.looked(False, -1, tab)[0] == app_gallery(tab.compare[1])


def test_where_it_looked_is_the_same_on_the_stateless_path(tiny_models, tmp_path):
    """ZeroGPU keeps no session: the conversation is rebuilt for the extra forward, with the same maps."""
    import numpy as np

    import app
    from webapp.state import TabState

    chat, ca, mm = tiny_models
    ims = image_files(tmp_path, 2)
    maps = []
    for stateless in (False, True):
        d = app.build_demo(chat, compare=(ca, mm), stateless=stateless)
        tab = TabState()
        last(d.ui.chat.send(msg("What is in Image 1 and Image 2?", ims), tab, *SETTINGS))
        maps.append(tab.chat.attention_maps())
    np.testing.assert_allclose(maps[0].probs, maps[1].probs, atol=1e-5)
