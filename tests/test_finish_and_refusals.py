"""Issue 27: why an answer ended (finish_reason: stop, length, stopped, timeout, refused) through the
library (Session, ServedConversation), the Chat tab's handlers and the served /generate API; refusals that cost
the server one log line and show the user no server path, environment variable, exception class or
traceback; the model line and its Details; Regenerate at temperature 0; the Compare tab's speed."""
import base64
import io
import json
import logging
import os
import re
import urllib.error
import urllib.request

import pytest
from PIL import Image

from tests.test_app import Slow, image_files, last, tiny_models  # noqa: F401 (tiny_models: a fixture)
from webapp import views

SETTINGS = (24, 0.0, 1.0, 1.0)


class EndsAtOnce:
    """The model's first answer token is EOS: its LM head's EOS logit raised far above the rest."""

    def __init__(self, vc):
        self.vc, self.handle = vc, None

    def __enter__(self):
        eos = self.vc.template.eos_id

        def hook(module, args, out):
            out = out.clone()
            out[..., eos] += 1e4
            return out

        self.handle = self.vc.model.lm.get_output_embeddings().register_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def msg(text, files=()):
    return {"text": text, "files": list(files)}


# ---------------------------------------------------------------------------------------------------
# The library: Session and ServedConversation


def test_session_says_why_each_answer_ended(tiny_models):  # noqa: F811
    vc = tiny_models[0]
    s = vc.new_session()
    with EndsAtOnce(vc):
        answer = s.ask("Hello?", max_new_tokens=20)
    assert answer.finish_reason == "stop" and s.finish_reason == "stop"
    answer = s.ask("Tell me more.", max_new_tokens=3)
    assert answer.finish_reason == "length" and s.finish_reason == "length" and s.last_stats["new_tokens"] == 3
    stream = s.stream("And more?", max_new_tokens=50)
    next(stream)
    assert s.finish_reason is None  # running
    stream.close()  # Stop
    assert s.finish_reason == "stopped" and s.conversation.rounds[-1].answer


def test_chat_session_timeout_and_refusal(tiny_models, tmp_path):  # noqa: F811
    import app
    from webapp.state import TabState

    demo = app.build_demo(tiny_models[0])
    ui, tab = demo.ui, TabState()
    demo.serving.limits.answer_seconds = 0.3
    with Slow(demo.serving.chat, delay=0.05):
        chatbot, *_, status = last(ui.chat.send(msg("Tell me a long story."), tab, 200, 0.0, 1.0, 1.0))[0]
    assert tab.chat.finish_reason == "timeout" and tab.chat.rounds[-1].finish_reason == "timeout"
    assert chatbot[-1]["content"].endswith(f"*({views.FINISH_NOTES['timeout']})*")
    assert "time limit per answer" in status and "--answer-seconds" not in status
    chatbot, *_, status = last(ui.chat.send(msg("x" * 4001), tab, *SETTINGS))[0]
    assert tab.chat.finish_reason == "refused" and "Not sent" in status and len(chatbot) == 2


def test_the_chat_notes_an_answer_cut_at_the_cap_and_none_for_a_finished_one(tiny_models):  # noqa: F811
    import app
    from webapp.state import TabState

    demo = app.build_demo(tiny_models[0])
    ui, tab = demo.ui, TabState()
    chatbot = last(ui.chat.send(msg("Hi"), tab, 3, 0.0, 1.0, 1.0))[0][0]
    assert tab.chat.finish_reason == "length"
    assert chatbot[-1]["content"].endswith(f"*({views.FINISH_NOTES['length']})*")
    with EndsAtOnce(demo.serving.chat):
        chatbot = last(ui.chat.send(msg("Hi again"), tab, 30, 0.0, 1.0, 1.0))[0][0]
    assert tab.chat.finish_reason == "stop"
    assert chatbot[-1]["content"] == "*(no answer)*"  # an empty answer, and no note
    assert [r.finish_reason for r in tab.chat.rounds] == ["length", "stop"]


def test_regenerate_at_temperature_zero_says_so_and_offers_sampling(tiny_models):  # noqa: F811
    import app
    from webapp.state import TabState

    demo = app.build_demo(tiny_models[0])
    ui, tab = demo.ui, TabState()
    last(ui.chat.send(msg("Hi"), tab, *SETTINGS))
    assert not ui.chat.sample_offer(tab).visible
    first = tab.chat.rounds[-1].answer
    status = last(ui.chat.regenerate(tab, *SETTINGS))[0][-1]
    assert "same answer" in status and "Sample a different answer" in status
    assert tab.chat.rounds[-1].answer == first and ui.chat.sample_offer(tab).visible
    last(ui.chat.sample(tab, *SETTINGS))  # temperature 0 on the slider: samples at SAMPLE_TEMPERATURE
    assert tab.chat.last_request == ("regenerate", {"max_new_tokens": 24, "temperature": views.SAMPLE_TEMPERATURE,
                                                    "top_p": 1.0, "repetition_penalty": 1.0, "seed": None})
    assert "same answer" not in ui.chat.refresh(tab)[-1] and not ui.chat.sample_offer(tab).visible
    status = last(ui.chat.regenerate(tab, 24, 0.8, 1.0, 1.0))[0][-1]
    assert "same answer" not in status


def test_compare_tab_shows_each_columns_speed(tiny_models):  # noqa: F811
    import app
    from webapp.state import TabState

    chat, ca, mm = tiny_models
    demo = app.build_demo(chat, compare=(ca, mm))
    tab = TabState()
    status = last(demo.ui.compare.send(msg("Hi"), tab, 8, 0.0, 1.0, 1.0))[0][-1]
    assert re.search(r"<b>CA:</b> [\d.]+ tokens/s · first token after [\d.]+ s", status), status
    assert re.search(r"<b>MMCA:</b> [\d.]+ tokens/s · first token after [\d.]+ s", status), status


# ---------------------------------------------------------------------------------------------------
# The model line and its Details


def test_model_line_reads_the_score_the_checkpoint_records(tiny_models, tmp_path):  # noqa: F811
    import app
    from visualchat_train.eval import eval_info, score_shapes, write_eval_info
    from visualchat.config import VisualChatConfig

    chat = tiny_models[0]
    demo = app.build_demo(chat)
    line = app._model_line(demo.serving)
    assert "Its accuracy has not been measured" in line and "K=" not in line and "DeepSpeed" not in line
    assert "--write_info" in app._details(demo.serving)
    result = score_shapes(chat, n=2, max_new_tokens=4, progress=False)
    info = eval_info(result, "python -m visualchat_train.eval --n 2")
    chat.save_pretrained(str(tmp_path))
    write_eval_info(str(tmp_path), info)
    saved = VisualChatConfig.load(str(tmp_path)).info["eval"]
    assert saved == json.loads(json.dumps(info)) and saved["rounds"] == result["accuracy"]["all"]["n"]
    before = chat.config.info
    chat.config.info = {**before, "eval": saved}
    try:
        line = app._model_line(demo.serving)
        details = app._details(demo.serving)
    finally:
        chat.config.info = before
    assert f"**{100 * saved['accuracy']:.0f}%**" in line and f"measured on {saved['rounds']} test questions" in line
    assert "K=16" in details and demo.serving.backend in details and "python -m visualchat_train.eval --n 2" in details


def test_eval_write_info_needs_a_checkpoint():
    from visualchat_train.eval import main

    with pytest.raises(SystemExit):
        main(["--write_info", "--n", "1"])


# ---------------------------------------------------------------------------------------------------
# The served /generate API: finish_reason for each ending; refusals


def _post(url, data, api="generate"):
    req = urllib.request.Request(url + "gradio_api/call/" + api, data=json.dumps({"data": data}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())["event_id"]


def _get(url, event_id, api="generate"):
    with urllib.request.urlopen(f"{url}gradio_api/call/{api}/{event_id}", timeout=120) as r:
        return r.read().decode()


def _final(sse: str):
    """(event, data) of an event stream's last complete/error event."""
    out = None
    for block in sse.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if lines.get("event") in ("complete", "error"):
            out = lines["event"], json.loads(lines.get("data", "null"))
    return out


@pytest.fixture(scope="module")
def served(tiny_models):  # noqa: F811
    import app
    from tests.test_app_client import serve

    demo = app.build_demo(tiny_models[0], concurrency=1)
    url = serve(demo)
    yield demo, url
    demo.close()


def test_generate_returns_finish_reason_for_each_ending(served):
    from tests.test_app_client import client

    demo, url = served
    c = client(url)
    out = c.predict(conversation=[{"question": "Hi"}], max_new_tokens=3, api_name="/generate")
    assert out["finish_reason"] == "length" and isinstance(out["answer"], str)
    with EndsAtOnce(demo.serving.chat):
        out = c.predict(conversation=[{"question": "Hi"}], max_new_tokens=30, api_name="/generate")
    assert out == {"answer": "", "finish_reason": "stop"}
    before = demo.serving.limits.answer_seconds
    demo.serving.limits.answer_seconds = 0.3
    try:
        with Slow(demo.serving.chat, delay=0.05):
            out = c.predict(conversation=[{"question": "Tell me a long story."}], max_new_tokens=300,
                            api_name="/generate")
    finally:
        demo.serving.limits.answer_seconds = before
    assert out["finish_reason"] == "timeout" and out["answer"]
    # a refusal: an error titled "Refused" that says what to change
    event, data = _final(_get(url, _post(url, [[{"question": "x" * 4001}], 8, 0.0, 1.0, 1.0, None, "chat"])))
    assert event == "error" and data["title"] == "Refused" and "at most 4,000" in data["error"], data
    # stopped: a cancelled answer (nobody is left to receive it) ends "stopped", as Stop does in the Chat tab
    ui = demo.ui
    gen = ui.api_generate([{"question": "Tell me a long story."}], 300)
    assert next(gen)["finish_reason"] is None
    gen.close()
    from visualchat.served import ServedConversation

    chat = ServedConversation.from_history(demo.serving, "chat", [])  # what /generate answers with
    stream = chat.send("Tell me a long story.", max_new_tokens=300)
    next(stream)
    stream.close()
    assert chat.finish_reason == "stopped"


def _refused_file_entries():
    entry = lambda path: {"path": path, "meta": {"_type": "gradio.FileData"}}  # noqa: E731
    return [entry("x.png"), entry("../../etc/passwd"), entry("/etc/passwd"), entry("file:///etc/passwd"),
            entry("http://127.0.0.1:9/x.png"), entry(os.path.join(os.getcwd(), "README.md"))]


def _text_lines(caplog, capfd, level=logging.INFO):
    err = capfd.readouterr().err
    logged = [r for r in caplog.records if r.levelno >= level]
    return logged, [line for line in err.splitlines() if line.strip()]


@pytest.mark.parametrize("entry", _refused_file_entries(), ids=lambda e: e["path"])
def test_a_refused_file_entry_costs_at_most_two_log_lines(served, entry, caplog, capfd):
    demo, url = served
    capfd.readouterr()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        with pytest.raises(urllib.error.HTTPError) as e:
            _post(url, [[{"question": "Hi", "images": [entry]}], 8, 0.0, 1.0, 1.0, None, "chat"])
        message = json.loads(e.value.read())["detail"]
    logged, stderr = _text_lines(caplog, capfd)
    assert e.value.code == 400
    assert len(logged) + len(stderr) <= 2, ([r.getMessage() for r in logged], stderr)
    assert len(logged) == 1 and "refused" in logged[0].getMessage() and "Traceback" not in "\n".join(stderr)
    assert re.search(r"\[[0-9a-f]{8}\]", logged[0].getMessage())  # a short request id
    _assert_clean(message)
    assert "not uploaded to this server" in message


def _assert_clean(message: str):
    """What a user may be told: no server path, environment variable, exception class or traceback."""
    assert os.getcwd() not in message and "VISUALCHAT_" not in message and "Traceback" not in message, message
    assert not re.search(r"\b[A-Z][A-Za-z]*(Error|Exception)\b", message), message
    assert "/tmp/" not in message and "/etc/" not in message, message


def _png(size, mode="1"):
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_no_refusal_message_holds_a_path_a_variable_or_internals(served, tmp_path, caplog, capfd):
    from bench.load_test import cases

    demo, url = served
    text_png = "data:image/png;base64," + base64.b64encode(b"this is text, not a picture").decode()
    probes = [data for kind, data in cases() if kind != "normal"] + [
        [[{"question": "Hi", "images": [_png((8000, 8000))]}], 8, 0.0, 1.0, 1.0, None, "chat"],
        [[{"question": "Hi", "images": [_png((3000, 20))]}], 8, 0.0, 1.0, 1.0, None, "chat"],
        [[{"question": "Hi", "images": [text_png]}], 8, 0.0, 1.0, 1.0, None, "chat"],
        [[{"question": "Hi", "images": ["data:text/plain;base64,aGVsbG8="]}], 8, 0.0, 1.0, 1.0, None, "chat"],
        [[{"question": "Hi", "images": [{"path": "x.png"}]}], 8, 0.0, 1.0, 1.0, None, "chat"],
    ]
    capfd.readouterr()
    caplog.clear()
    messages = []
    with caplog.at_level(logging.INFO):
        for data in probes:
            try:
                event, payload = _final(_get(url, _post(url, data)))
                assert event == "error", (data, payload)
                messages.append(payload["error"])
            except urllib.error.HTTPError as e:
                messages.append(json.loads(e.read())["detail"])
    logged, stderr = _text_lines(caplog, capfd)
    assert len(messages) == len(probes)
    for m in messages:
        _assert_clean(m)
    assert any("8000x8000" in m for m in messages)
    lines = [r.getMessage() for r in logged]
    assert len(lines) == len(probes) and all(line.startswith("refused ") for line in lines), lines
    assert any("operator setting: VISUALCHAT_MAX_PIXELS" in line for line in lines)  # the knob is in the log
    assert not [line for line in stderr if "Traceback" in line]
    # the Chat tab: the same refusals, the same words
    from webapp.state import TabState

    tab = TabState()
    big = tmp_path / "big.png"
    Image.new("1", (8000, 8000)).save(big, optimize=True)
    status = last(demo.ui.chat.send(msg("Hi", [str(big)]), tab, *SETTINGS))[0][-1]
    assert "Not sent" in status and "8000x8000" in status
    _assert_clean(status)
    assert "big.png" in status


def test_the_zerogpu_replay_reports_why_it_ended(tiny_models):  # noqa: F811
    """On ZeroGPU every answer is replayed in the GPU worker; its finish reason comes back as the stream's
    last item (here the worker is this process: `spaces` is not installed)."""
    from visualchat.served import ServedConversation
    from visualchat.server import Server

    server = Server.from_models(tiny_models[0], stateless=True)
    request = ServedConversation.from_history(server, "chat", [])  # a /generate request's
    assert all(isinstance(p, str) for p in request.send("Hi", max_new_tokens=3)) and request.finish_reason == "length"
    chat = ServedConversation(server)
    with EndsAtOnce(tiny_models[0]):
        list(chat.send("Hi", max_new_tokens=30))
    assert chat.finish_reason == "stop" and chat.rounds[-1].finish_reason == "stop"
    list(chat.send("Again", max_new_tokens=2))
    assert chat.finish_reason == "length" and [r.finish_reason for r in chat.rounds] == ["stop", "length"]


def test_api_calls_do_not_leave_their_sessions_behind(served):
    """Every POST to /gradio_api/call/generate is a Gradio session of its own, and Gradio keeps a copy of
    every component's config per session (up to 10,000): the soak's RSS grew 459 MB in 3,116 requests.
    Sessions that hold no state are dropped once idle; a chat's session (its conversation is state) stays."""
    import datetime

    from tests.test_app_client import chat, client

    demo, url = served
    holder = demo.state_holder
    c = client(url)
    chat(c, "Hi", max_new_tokens=4)
    for _ in range(12):
        event, data = _final(_get(url, _post(url, [[{"question": "Hi"}], 2, 0.0, 1.0, 1.0, None, "chat"])))
        assert event == "complete"
    stateless = [sid for sid, st in holder.session_data.items() if not st.state_data]
    assert len(stateless) >= 12 and any(st.state_data for st in holder.session_data.values())
    old = datetime.datetime.now() - datetime.timedelta(seconds=120)
    for sid in list(holder.time_last_used):
        holder.time_last_used[sid] = old  # as if a few minutes had passed
    _get(url, _post(url, [[{"question": "Hi"}], 2, 0.0, 1.0, 1.0, None, "chat"]))
    left = [sid for sid in holder.session_data if sid in stateless]
    assert left == [], f"{len(left)} idle API sessions are still kept"
    chatbot = chat(c, "And again?", max_new_tokens=4)[0]
    assert len(chatbot) == 4  # the chat's conversation (state) was kept
