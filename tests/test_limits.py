"""Issue 20: every request's cost is bounded by a documented server limit, checked before any decoding
or model work, and a malformed /generate request gets a message naming the field and what is allowed
(never ``{"error": null}``). Tiny models; the served tests run the real app on 127.0.0.1."""
import base64
import json
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.conftest import color_image
from tests.test_app import ROOT, SETTINGS, Slow, last, msg, png_bytes, tiny_models  # noqa: F401 (a fixture)

PNG_URL = "data:image/png;base64," + base64.b64encode(png_bytes(color_image((9, 9, 200)))).decode()


@pytest.fixture
def demo(tiny_models):  # noqa: F811
    import app

    chat, ca, mm = tiny_models
    return app.build_demo(chat, compare=(ca, mm))


def api_error(ui, conversation, **kw) -> str:
    import gradio as gr

    with pytest.raises(gr.Error) as e:
        list(ui.api_generate(conversation, **kw))
    return str(e.value)


HI = [{"question": "Hi"}]
MALFORMED = {  # name: (conversation, keyword arguments, what the message must say)
    "answer_int": ([{"question": "Hi", "answer": 3}, {"question": "And?"}], {},
                   "the answer of round 1 must be text or null, got int"),
    "answer_list": ([{"question": "Hi", "answer": ["a"]}, {"question": "And?"}], {},
                    "the answer of round 1 must be text or null, got list"),
    "question_int": ([{"question": 7}], {}, "the question of round 1 must be text, got int"),
    "max_new_tokens_null": (HI, {"max_new_tokens": None}, "max_new_tokens must be a whole number from 1 to 1024"),
    "max_new_tokens_str": (HI, {"max_new_tokens": "12"}, "max_new_tokens must be a whole number from 1 to 1024 "
                                                         r"\(this server's limit\), got str"),
    "max_new_tokens_huge": (HI, {"max_new_tokens": 10 ** 9}, r"max_new_tokens must be .*got 1000000000"),
    "model_list": (HI, {"model": ["chat"]}, r"model must be one of \['ca', 'chat', 'mmca'\], got list"),
    "lone_surrogate": ([{"question": "Hi \ud800 there"}], {},
                       r"the question of round 1 contains a lone surrogate \(U\+D800\) at character 4"),
    "temperature_nan": (HI, {"temperature": float("nan")}, "temperature must be a number from 0 .* got nan"),
    "temperature_inf": (HI, {"temperature": float("inf")}, "temperature must be a number from 0 .* got inf"),
    "top_p_inf": (HI, {"top_p": float("-inf")}, r"top_p must be a number > 0 and <= 1, got -inf"),
    "repetition_penalty_bool": (HI, {"repetition_penalty": True}, "repetition_penalty must be a number"),
    "seed_2_70": (HI, {"seed": 2 ** 70}, r"seed must be null or a whole number from 0 to 2\*\*63-1, got 1180591620717411303424"),
    "seed_float": (HI, {"seed": 1.5}, "seed must be null or a whole number"),
    "data_text_html": ([{"question": "Hi", "images": ["data:text/html;base64," + PNG_URL.split(",", 1)[1]]}], {},
                       r"image 1 \(round 1\): a data URL's media type must be one of image/png, .*got 'text/html'"),
    "data_not_base64": ([{"question": "Hi", "images": ["data:image/png,abc"]}], {},
                        "a data URL must be data:<image type>;base64,<data>"),
    "bad_base64": ([{"question": "Hi", "images": ["base64:@@@@"]}], {}, r"image 1 \(round 1\) is not valid base64"),
    "image_null": ([{"question": "Hi", "images": [None]}], {}, r"image 1 \(round 1\) must be a file .* got null"),
    "path_not_text": ([{"question": "Hi", "images": [{"path": 5}]}], {}, "a file's path must be text, got int"),
    "round_int": ([5], {}, "round 1 must be an object .* got int"),
    "question_too_long": ([{"question": "why " * 2500}], {},
                          "the question of round 1 is 10,000 characters long; this server accepts at most 4,000"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_generate_requests_name_the_field(demo, case):
    conversation, kw, expect = MALFORMED[case]
    calls = []
    orig = demo.serving.chat.model.forward
    demo.serving.chat.model.forward = lambda *a, **k: calls.append(1) or orig(*a, **k)
    try:
        message = api_error(demo.ui, conversation, **kw)
    finally:
        demo.serving.chat.model.forward = orig
    import re

    assert re.search(expect, message), message
    assert calls == [], "the model ran before the request was refused"


def test_inline_image_over_the_size_limit_is_refused_before_decoding(demo, monkeypatch):
    import webapp.api as serving

    demo.serving.limits.max_image_bytes, before = 1000, demo.serving.limits.max_image_bytes
    decoded = []
    orig = serving.base64.b64decode
    monkeypatch.setattr(serving.base64, "b64decode", lambda *a, **k: decoded.append(1) or orig(*a, **k))
    try:
        big = "data:image/png;base64," + "A" * 4000  # about 3,000 bytes
        msg_ = api_error(demo.ui, [{"question": "Hi", "images": [big]}])
        assert "holds about 3,000 bytes of image data; this server accepts images of up to 1,000 bytes" in msg_
        assert "--max-file-size" not in msg_  # the operator's setting is named in the log line, not to the user
        msg_ = api_error(demo.ui, [{"question": "Hi", "images": ["base64:" + "A" * 4000]}])
        assert "up to 1,000 bytes" in msg_
        assert decoded == []
    finally:
        demo.serving.limits.max_image_bytes = before


def test_the_chat_tab_has_the_same_limits(demo):
    """The /chat endpoint can be called directly, past the UI's 4,000-character box and sliders."""
    from webapp.state import TabState

    ui, tab = demo.ui, TabState()
    for message, settings, expect in [
        (msg("why " * 1001), SETTINGS, "the question is 4,004 characters long; this server accepts at most 4,000"),
        (msg("Hi"), (5000, 0.0, 1.0, 1.0), "max_new_tokens must be a whole number from 1 to 1024"),
        (msg("Hi"), (8, float("nan"), 1.0, 1.0), "temperature must be a number from 0"),
    ]:
        views = list(ui.chat.send(message, tab, *settings))
        assert len(views) == 1 and expect in views[0][4] and "Not sent" in views[0][4], views[0][4]
    assert tab.chat.rounds == []


def test_answer_time_limit_stops_between_tokens(demo):
    from webapp.state import TabState

    server = demo.serving
    server.limits.answer_seconds, before = 0.3, server.limits.answer_seconds
    try:
        with Slow(server.chat, delay=0.05) as slow:
            t0 = time.time()
            answer = list(demo.ui.api_generate([{"question": "Tell me a long story."}], max_new_tokens=300))[-1]
            assert time.time() - t0 < 5 and slow.calls < 40
            assert answer["answer"] and answer["finish_reason"] == "timeout"  # the answer so far is kept
        with Slow(server.chat, delay=0.4):  # the limit passes during the first forwards
            tab = TabState()
            last(demo.ui.chat.send(msg("Tell me a long story."), tab, 300, 0.0, 1.0, 1.0))
        assert tab.chat.status == "stopped" and "limit per answer" in tab.chat.error
        assert "Stopped: the answer reached 0.3 s, this server&#x27;s time limit per answer" in demo.ui.chat.refresh(tab)[4]
        assert tab.chat.last_stats["new_tokens"] < 40
    finally:
        server.limits.answer_seconds = before


def test_kv_cache_budget_drops_least_recently_used_tabs_and_they_rebuild(demo):
    from webapp.state import TabState

    ui, server = demo.ui, demo.serving
    tabs = [TabState() for _ in range(3)]
    answers = []
    for i, tab in enumerate(tabs):
        last(ui.chat.send(msg(f"Hello number {i}, what is in the picture?"), tab, 6, 0.0, 1.0, 1.0))
        answers.append(tab.chat.rounds[-1].answer)
    one = max(t.chat.cache_bytes() for t in tabs)
    assert one > 0 and all(t.chat.cache_bytes() for t in tabs)  # no budget reached yet (2 GB default)
    server.limits.kv_cache_budget, before = int(one * 1.5), server.limits.kv_cache_budget
    try:
        last(ui.chat.send(msg("And a second round?"), tabs[2], 6, 0.0, 1.0, 1.0))
        assert tabs[2].chat.cache_bytes() > 0  # the tab that just answered keeps its cache (even over budget)
        assert server.kv_cache_bytes() == tabs[2].chat.cache_bytes() and server.kv_drops == 2
        assert tabs[0].chat.cache_bytes() == 0 and tabs[1].chat.cache_bytes() == 0  # the least recently used went
        # a dropped tab rebuilds its cache on its next round, and answers as if nothing happened
        ref = server.chat.new_session()
        ref.ask("Hello number 0, what is in the picture?", max_new_tokens=6)
        expected = ref.ask("Go on.", max_new_tokens=6)
        view = last(ui.chat.send(msg("Go on."), tabs[0], 6, 0.0, 1.0, 1.0))[0]
        assert tabs[0].chat.rounds[-1].answer == expected.strip() and "tokens/s" in view[4]
        assert tabs[0].chat.cache_bytes() > 0 and tabs[2].chat.cache_bytes() == 0  # now tab 2 is the oldest
    finally:
        server.limits.kv_cache_budget = before


def test_help_and_env_list_the_limits(monkeypatch):
    out = subprocess.run([sys.executable, "app.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for s in ["--max-new-tokens-limit", "VISUALCHAT_MAX_NEW_TOKENS_LIMIT", "--max-question-chars",
              "VISUALCHAT_MAX_QUESTION_CHARS", "--answer-seconds", "VISUALCHAT_ANSWER_SECONDS", "--unread-seconds",
              "VISUALCHAT_UNREAD_SECONDS", "--kv-cache-budget", "VISUALCHAT_KV_CACHE_BUDGET", "VISUALCHAT_MAX_FILE_SIZE",
              "VISUALCHAT_MAX_SIDE", "VISUALCHAT_MAX_ASPECT", "VISUALCHAT_MAX_PIXELS"]:
        assert s in out.stdout, s
    import app

    monkeypatch.setenv("VISUALCHAT_MAX_NEW_TOKENS_LIMIT", "64")
    monkeypatch.setenv("VISUALCHAT_KV_CACHE_BUDGET", "300mb")
    monkeypatch.setenv("VISUALCHAT_MAX_FILE_SIZE", "2mb")
    lim = app.serve_options(app.parse_args(["--answer-seconds", "30"])).limits
    assert (lim.max_new_tokens, lim.kv_cache_budget, lim.max_image_bytes, lim.answer_seconds) == (
        64, 300_000_000, 2_000_000, 30.0)


# ---------------------------------------------------------------------------------------------------
# Served on 127.0.0.1


def _post(url, api, data):
    req = urllib.request.Request(url + "gradio_api/call/" + api, data=json.dumps({"data": data}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())["event_id"]


def _get(url, api, event_id, timeout=120):
    with urllib.request.urlopen(f"{url}gradio_api/call/{api}/{event_id}", timeout=timeout) as r:
        return r.read().decode()


def test_a_path_gradio_refuses_gets_a_message_not_null(tiny_models):  # noqa: F811
    import app
    from tests.test_app_client import serve

    demo = app.build_demo(tiny_models[0])
    url = serve(demo)
    try:
        conv = [{"question": "Hi", "images": [{"path": "/etc/hostname", "meta": {"_type": "gradio.FileData"}}]}]
        with pytest.raises(urllib.error.HTTPError) as e:  # refused before Gradio reads it (issue 27)
            _post(url, "generate", [conv, 8, 0.0, 1.0, 1.0, None, "chat"])
        detail = json.loads(e.value.read())["detail"]
        assert e.value.code == 400 and "not uploaded to this server" in detail and "/etc/hostname" not in detail
        out = _get(url, "generate", _post(url, "generate", [[{"question": "Hi", "answer": 5}, {"question": "x"}],
                                                            8, 0.0, 1.0, 1.0, None, "chat"]))
        assert "the answer of round 1 must be text or null, got int" in out, out
    finally:
        demo.close()


def test_an_answer_nobody_reads_does_not_hold_the_worker(tiny_models):  # noqa: F811
    """A POST to /gradio_api/call/generate whose result is never fetched: with one worker, the next caller
    would wait for all of it; it is stopped once nothing has been read for --unread-seconds."""
    import app
    from tests.test_app_client import client, serve

    chat = tiny_models[0]
    demo = app.build_demo(chat, concurrency=1)
    demo.serving.limits.unread_seconds = 1.0
    url = serve(demo)
    try:
        with Slow(chat, delay=0.05) as slow:
            _post(url, "generate", [[{"question": "Tell me a very long story."}], 400, 0.0, 1.0, 1.0, None, "chat"])
            t0 = time.time()
            while slow.calls == 0 and time.time() - t0 < 30:
                time.sleep(0.05)
            t0 = time.time()
            answer = client(url).predict(conversation=[{"question": "Hi"}], max_new_tokens=3, api_name="/generate")
            waited = time.time() - t0
        assert isinstance(answer["answer"], str) and answer["finish_reason"] in ("stop", "length")
        assert waited < 8, f"the next caller waited {waited:.1f} s behind an answer nobody read"
        assert slow.calls < 150, f"the unread answer ran {slow.calls} forwards"
    finally:
        demo.close()


def test_gradio_does_not_keep_each_api_requests_inputs(tiny_models):  # noqa: F811
    """Gradio keeps every session's input values (up to 10,000 sessions) and each POST to
    /gradio_api/call/generate is a session of its own: a refused 5 MB data URL stayed in memory per
    request. After the call, nothing of the request's conversation is kept."""
    import app
    from tests.test_app_client import serve

    demo = app.build_demo(tiny_models[0])
    url = serve(demo)
    try:
        demo.serving.limits.max_image_bytes = 1_000_000
        big = "data:image/png;base64," + "A" * 7_000_000
        ids = [_post(url, "generate", [[{"question": "Hi", "images": [big]}], 8, 0.0, 1.0, 1.0, None, "chat"])
               for _ in range(2)]
        ids.append(_post(url, "generate", [[{"question": "Hello " * 60}], 2, 0.0, 1.0, 1.0, None, "chat"]))
        outs = [_get(url, "generate", i) for i in ids]
        assert "up to 1,000,000 bytes" in outs[0] and "event: complete" in outs[2], outs
        kept = [len(json.dumps(cfg.get("props", {}).get("value"), default=str))
                for st in demo.state_holder.session_data.values() for cfg in st.config_values.values()
                if isinstance(cfg, dict)]
        assert max(kept) < 100_000, f"a session still holds {max(kept):,} characters of a request"
    finally:
        demo.close()


def test_an_api_body_over_the_request_size_is_refused_before_it_is_read(tiny_models):  # noqa: F811
    import urllib.error

    import app
    from tests.test_app_client import serve

    demo = app.build_demo(tiny_models[0])
    demo.serving.limits.max_request_bytes = 1_000_000
    url = serve(demo)
    try:
        big = "data:image/png;base64," + "A" * 2_000_000
        with pytest.raises(urllib.error.HTTPError) as e:
            _post(url, "generate", [[{"question": "Hi", "images": [big]}], 8, 0.0, 1.0, 1.0, None, "chat"])
        assert e.value.code == 413
        detail = json.loads(e.value.read())["detail"]
        assert "this server accepts at most 1,000,000. Send large images" in detail, detail
        out = _get(url, "generate", _post(url, "generate", [[{"question": "Hi"}], 2, 0.0, 1.0, 1.0, None, "chat"]))
        assert "event: complete" in out, out
    finally:
        demo.close()
