"""The app served for real (in this process, tiny models) and driven through gradio_client: stateful
chats per client session, the stateless /generate endpoint, isolation, bad input, cancelling, the queue."""
import socket
import threading
import time

import pytest

from tests.test_app import Slow, image_files, tiny_models, write_bad_files  # noqa: F401 (tiny_models: a fixture)

pytest.importorskip("gradio_client")

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(demo, **kw):
    import app

    port = free_port()
    app.launch(demo, host="127.0.0.1", port=port, prevent_thread_lock=True, quiet=True, **kw)
    return f"http://127.0.0.1:{port}/"


@pytest.fixture(scope="module")
def served(tiny_models):  # noqa: F811
    import app

    chat, ca, mm = tiny_models
    demo = app.build_demo(chat, compare=(ca, mm), concurrency=2)
    url = serve(demo)
    yield demo, url
    demo.close()


def client(url):
    from gradio_client import Client

    return Client(url, verbose=False)


def chat(c, text, files=(), max_new_tokens=24, **kw):
    """One Chat-tab message through the /chat endpoint; returns (chatbot, gallery, prompt, textbox, status)."""
    from gradio_client import handle_file

    return c.predict({"text": text, "files": [handle_file(f) for f in files]}, max_new_tokens,
                     kw.get("temperature", 0.0), kw.get("top_p", 1.0), kw.get("repetition_penalty", 1.0),
                     api_name="/chat")


def test_two_rounds_three_images_through_gradio_client(served, tmp_path):
    demo, url = served
    c = client(url)
    ims = image_files(tmp_path, 3)
    chatbot, gallery, prompt, textbox, status = chat(c, "What is in Image 1 and Image 2?", ims[:2])
    assert [g["caption"] for g in gallery] == ["Image 1", "Image 2"]
    chatbot, gallery, prompt, textbox, status = chat(c, "What about Image 3?", ims[2:])
    assert [g["caption"] for g in gallery] == ["Image 1", "Image 2", "Image 3"]
    assert len(chatbot) == 4
    files_per_turn = [[x for x in m["content"] if x.get("type") == "file"] for m in chatbot if m["role"] == "user"]
    assert [len(f) for f in files_per_turn] == [2, 1]
    assert files_per_turn[1][0]["alt_text"] == "Image 3"
    k = demo.serving.chat.config.image_tokens
    assert f"[Image 3: {k} tokens]" in prompt and "tokens/s" in status
    # Undo and Clear are endpoints of the same session
    chatbot, gallery, *_ = c.predict(api_name="/undo")
    assert len(chatbot) == 2 and len(gallery) == 2
    chatbot, gallery, *_ = c.predict(api_name="/clear")
    assert chatbot == [] and gallery == []


def test_generate_endpoint(served, tmp_path):
    from gradio_client import handle_file

    demo, url = served
    c = client(url)
    ims = image_files(tmp_path, 2)
    conv = [{"question": "What is in Image 1?", "images": [handle_file(ims[0])], "answer": "A square."},
            {"question": "Which is brighter, Image 1 or Image 2?", "images": [handle_file(ims[1])]}]
    result = c.predict(conversation=conv, max_new_tokens=12, temperature=0.0, top_p=1.0, repetition_penalty=1.0,
                       api_name="/generate")
    s = demo.serving.chat.new_session()
    s.add_round("What is in Image 1?", [ims[0]], "A square.")
    expected = s.ask("Which is brighter, Image 1 or Image 2?", [ims[1]], max_new_tokens=12)
    assert result == {"answer": expected, "finish_reason": expected.finish_reason}
    job = c.submit(conversation=conv, max_new_tokens=12, api_name="/generate")  # streaming: the answer grows
    assert job.result() == result
    info = c.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert "/generate" in info
    names = [p["parameter_name"] for p in info["/generate"]["parameters"]]
    assert names[:5] == ["conversation", "max_new_tokens", "temperature", "top_p", "repetition_penalty"]
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="question of round 1 is empty"):
        c.predict(conversation=[{"question": " "}], api_name="/generate")


def test_two_concurrent_sessions_stay_isolated(served, tmp_path):
    demo, url = served
    alice, bob = client(url), client(url)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a_ims, b_ims = image_files(tmp_path / "a", 1), image_files(tmp_path / "b", 2, size=(30, 40))
    results = {}

    def run(name, c, text, files):
        results[name] = chat(c, text, files, max_new_tokens=40)

    with Slow(demo.serving.chat, delay=0.005):  # long enough that the two requests overlap
        threads = [threading.Thread(target=run, args=("alice", alice, "Alice asks about Image 1", a_ims)),
                   threading.Thread(target=run, args=("bob", bob, "Bob asks about Image 1 and Image 2", b_ims))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    a_chat, a_gallery, a_prompt, *_ = results["alice"]
    b_chat, b_gallery, b_prompt, *_ = results["bob"]
    assert len(a_gallery) == 1 and len(b_gallery) == 2
    assert "Bob" not in a_prompt and "Alice" not in b_prompt
    assert len(a_chat) == 2 and len(b_chat) == 2
    a_chat, a_gallery, a_prompt, *_ = chat(alice, "Alice again")
    assert len(a_chat) == 4 and len(a_gallery) == 1 and "Bob" not in a_prompt
    assert set(g["image"] for g in a_gallery).isdisjoint(g["image"] for g in b_gallery)


@pytest.mark.parametrize("case", ["text", "corrupt", "bomb", "too_many", "empty", "context"])
def test_bad_input_through_the_client(served, tmp_path, case):
    demo, url = served
    c = client(url)
    ims = image_files(tmp_path, 9)
    chat(c, "What is in Image 1?", ims[:1])
    bad = write_bad_files(tmp_path)
    args = {"text": ("And this?", [bad["text"]]), "corrupt": ("And this?", [bad["corrupt"]]),
            "bomb": ("And this?", [bad["bomb"]]), "too_many": ("All?", ims[1:]), "empty": ("", []),
            "context": ("why " * 600, [])}[case]
    expect = {"text": "not an image", "corrupt": "corrupt or truncated", "bomb": "decompression bomb",
              "too_many": "at most 8", "empty": "empty", "context": "context window"}[case]
    chatbot, gallery, prompt, textbox, status = chat(c, *args)
    assert expect in status and "unchanged" in status
    assert len(chatbot) == 2 and len(gallery) == 1
    chatbot, gallery, *_ = chat(c, "Still there?")  # the app keeps serving this session
    assert len(chatbot) == 4


def test_exception_during_generation_through_the_client(served):
    demo, url = served
    c = client(url)
    with Slow(demo.serving.chat, fail_after=4):
        chatbot, gallery, prompt, textbox, status = chat(c, "Tell me a story.", max_new_tokens=40)
    assert "failed while answering" in status and "keeps serving" in status
    chatbot, *_ = chat(c, "Are you back?")
    assert len(chatbot) == 4


def test_cancelled_mid_stream_keeps_the_conversation(served, tmp_path):
    demo, url = served
    c = client(url)
    chat(c, "What is in Image 1?", image_files(tmp_path, 1))
    with Slow(demo.serving.chat, delay=0.02):
        job = c.submit({"text": "Tell me everything.", "files": []}, 400, 0.0, 1.0, 1.0, api_name="/chat")
        t0 = time.time()
        while len(job.outputs()) < 3 and time.time() - t0 < 60:
            time.sleep(0.05)
        assert len(job.outputs()) >= 3, "no streamed output arrived"
        job.cancel()
        time.sleep(1.0)
    chatbot, gallery, prompt, *_ = chat(c, "Shorter, please.")
    assert len(chatbot) == 6 and len(gallery) == 1  # the cancelled round is kept with its partial answer
    assert "Tell me everything." in prompt


def test_full_queue_gets_a_clear_message(tiny_models):  # noqa: F811
    import app
    from gradio_client.utils import QueueError

    chat_vc = tiny_models[0]
    demo = app.build_demo(chat_vc)
    url = serve(demo, queue_size=1)
    try:
        c1, c2, c3 = client(url), client(url), client(url)
        with Slow(chat_vc, delay=0.02):
            running = c1.submit({"text": "long", "files": []}, 200, 0.0, 1.0, 1.0, api_name="/chat")
            t0 = time.time()
            while not running.outputs() and time.time() - t0 < 30:
                time.sleep(0.05)
            waiting = c2.submit({"text": "waits", "files": []}, 5, 0.0, 1.0, 1.0, api_name="/chat")
            time.sleep(0.5)
            with pytest.raises(QueueError, match="Queue is full"):
                c3.predict({"text": "refused", "files": []}, 5, 0.0, 1.0, 1.0, api_name="/chat")
            running.cancel()
            assert waiting.result(timeout=60)[0][-1]["role"] == "assistant"
    finally:
        demo.close()
