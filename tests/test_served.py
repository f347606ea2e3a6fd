"""One served conversation (issue 28): a browser tab's chat and a /generate request are both a
``visualchat.served.ServedConversation``, which holds the time limit per answer, the ZeroGPU replay and the
files written for display, once."""
import os

from tests.test_app import SETTINGS, Slow, image_files, last, msg, tiny_models  # noqa: F401 (a fixture)


def test_the_time_limit_and_the_replay_are_the_same_for_a_tab_and_a_request(tiny_models):  # noqa: F811
    from visualchat.served import ServedConversation
    from visualchat.server import Server

    for stateless in (False, True):  # the session's own KV cache, and the ZeroGPU replay
        server = Server.from_models(tiny_models[0], stateless=stateless)
        server.limits.answer_seconds = 0.2
        tab = ServedConversation(server)
        request = ServedConversation.from_history(server, "chat", [{"question": "Hi", "answer": "Hello."}])
        with Slow(tiny_models[0], delay=0.05) as slow:
            for chat in (tab, request):
                before = slow.calls
                answer = "".join(chat.send("Tell me a long story.", max_new_tokens=300))
                assert chat.finish_reason == "timeout" and chat.status == "stopped", (stateless, chat.finish_reason)
                assert slow.calls - before < 40 and chat.conversation.rounds[-1].answer == answer.strip()
        assert [r.question for r in request.conversation.rounds] == ["Hi", "Tell me a long story."]


def test_a_request_writes_no_display_copies_and_a_cleared_tab_leaves_none(tiny_models, tmp_path):  # noqa: F811
    import base64

    import app
    from webapp.state import TabState

    demo = app.build_demo(tiny_models[0])
    tmpdir = demo.serving.tmpdir
    ims = image_files(tmp_path, 2, size=(64, 48))
    data = ["data:image/png;base64," + base64.b64encode(open(p, "rb").read()).decode() for p in ims]
    out = list(demo.ui.api_generate([{"question": "Image 1?", "images": data[:1], "answer": "A picture."},
                                     {"question": "And Image 2?", "images": data[1:]}], max_new_tokens=3))
    assert out[-1]["finish_reason"] == "length" and os.listdir(tmpdir) == []  # /generate shows nothing
    tab = TabState()
    last(demo.ui.chat.send(msg("Which is brighter, Image 1 or Image 2?", ims), tab, *SETTINGS))
    gallery, _ = demo.ui.chat.looked(True, -1, tab)
    files = set(os.listdir(tmpdir))
    assert len(files) == 4 and all(os.path.exists(p) for p, _ in gallery)  # 2 display copies, 2 attention maps
    shown = tab.chat.image_paths
    assert len(shown) == 2 and set(map(os.path.basename, shown)) < files
    demo.ui.chat.undo(tab)  # the undone round's display copies go; its images wait for the input box as copies
    assert not any(os.path.exists(p) for p in shown) and len(os.listdir(tmpdir)) == 4
    demo.ui.chat.clear(tab)
    assert os.listdir(tmpdir) == []
