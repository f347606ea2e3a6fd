"""One conversation engine (issue 17): a browser tab, the stateless /generate API, the CLI chat and the
eval runner all drive a Session, and a round is checked in one function, Session.prepare_round, before
anything changes. The same bad round fed to each gives the same error, raised inside that function."""
import base64
import csv

import pytest

from tests.test_app import SETTINGS, image_files, msg, tiny_models  # noqa: F401 (a fixture)
from tests.test_chat import tiny_ckpt  # noqa: F401 (a fixture)
from visualchat.session import Session, TooManyImagesError

QUESTION = "What is in these pictures?"


@pytest.fixture
def prepare_round_errors(monkeypatch):
    """Every exception that leaves Session.prepare_round, in order."""
    raised = []
    orig = Session.prepare_round

    def spy(self, *args, **kwargs):
        try:
            return orig(self, *args, **kwargs)
        except Exception as e:
            raised.append(e)
            raise
    monkeypatch.setattr(Session, "prepare_round", spy)
    return raised


def test_the_same_bad_round_fails_the_same_way_on_every_path(tiny_models, tiny_ckpt, tmp_path, capsys,  # noqa: F811
                                                            prepare_round_errors):
    import gradio as gr

    import app
    from visualchat_train.eval import run_conversations
    from visualchat import chat as cli
    from webapp.state import TabState

    chat_vc, ca, mm = tiny_models
    limit = chat_vc.config.max_images
    paths = image_files(tmp_path, limit + 1)  # one image more than the model allows
    expected = f"this conversation would have {limit + 1} images; the model allows at most {limit}"

    # a browser tab (the Chat tab's send handler)
    demo = app.build_demo(chat_vc, compare=(ca, mm))
    tab = TabState()
    views = list(demo.ui.chat.send(msg(QUESTION, paths), tab, *SETTINGS))
    assert expected in views[-1][4] and tab.chat.rounds == []  # shown, and the conversation is unchanged

    # the stateless /generate API, its images inline
    urls = ["data:image/png;base64," + base64.b64encode(open(p, "rb").read()).decode() for p in paths]
    with pytest.raises(gr.Error) as api_error:
        list(demo.ui.api_generate([{"question": QUESTION, "images": urls}]))
    assert api_error.value.message == expected

    # the CLI chat's one-shot question
    argv = ["--checkpoint", tiny_ckpt, "--device", "cpu", "--ask", QUESTION]
    for p in paths:
        argv += ["--image", p]
    assert cli.main(argv) == 2
    assert f"error: {expected}" in capsys.readouterr().err

    # the eval runner (visualchat_train/eval.py): the conversation's row records the error
    out_csv = str(tmp_path / "answers.csv")
    counts = run_conversations(chat_vc, {"too-many": [[QUESTION, " ".join(paths)]]}, str(tmp_path), out_csv,
                               progress=False)
    assert counts == {"conversations": 0, "failed": 1}
    with open(out_csv) as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["error"] == f"TooManyImagesError: {expected}"

    # one error per path, each raised inside Session.prepare_round, all alike
    assert len(prepare_round_errors) == 4
    assert {(type(e), str(e)) for e in prepare_round_errors} == {(TooManyImagesError, expected)}
    for e in prepare_round_errors:
        frames, tb = [], e.__traceback__
        while tb is not None:
            frames.append(tb.tb_frame.f_code)
            tb = tb.tb_next
        assert any(code.co_name == "prepare_round" and code.co_filename.endswith("visualchat/session.py")
                   for code in frames)


def test_prepare_round_checks_a_servers_limits_and_names_a_requests_rounds(tiny_models):  # noqa: F811
    """Issue 28: the server's limits are passed to Session.prepare_round, the one check of a round (no
    separate check of the question's length or the generation settings in front of it)."""
    from visualchat.limits import Limits

    vc = tiny_models[0]
    limits = Limits(max_question_chars=10, max_new_tokens=4)
    s = vc.new_session()
    for question, gen, message in [
        ("x" * 11, {}, "the question is 11 characters long; this server accepts at most 10"),
        ("Hi", {"max_new_tokens": 5}, r"max_new_tokens must be a whole number from 1 to 4 \(this server's limit\)"),
        ("   ", {}, "the question is empty"),
        (None, {}, "the question must be text, got null"),
    ]:
        with pytest.raises(ValueError, match=message):
            s.stream(question, limits=limits, **gen)
    assert s.conversation.rounds == []
    s.stream("x" * 11, max_new_tokens=2).close()  # no limits given: the model's bounds only
    "".join(s.stream("Hi", limits=limits))  # the default max_new_tokens (256), within the server's cap
    assert s.last_stats["new_tokens"] <= 4 and s.finish_reason in ("stop", "length")
    with pytest.raises(ValueError, match="the answer must be text or null, got int"):  # a library caller's
        Session.from_history(vc, [{"question": "Hi", "answer": 3}])
    with pytest.raises(ValueError, match="the answer of round 1 must be text or null, got int"):  # a request's
        Session.from_history(vc, [{"question": "Hi", "answer": 3}], limits=limits, numbered=True)
    with pytest.raises(ValueError, match="the answer of round 1 is 41 characters long; this server accepts at most 40"):
        Session.from_history(vc, [{"question": "Hi", "answer": "y" * 41}], limits=limits, numbered=True)
    with pytest.raises(ValueError, match="the question of round 2 is 11 characters long"):
        Session.from_history(vc, [{"question": "Hi", "answer": "ok"}, {"question": "x" * 11}], limits=limits,
                             numbered=True)
    request = Session.from_history(vc, [{"question": "Hi", "answer": "ok"}], limits=limits, numbered=True)
    with pytest.raises(ValueError, match="the question of round 2 is empty"):
        request.stream("", limits=limits)
    assert [r.answer for r in request.conversation.rounds] == ["ok"]
