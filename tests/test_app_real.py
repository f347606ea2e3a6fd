"""`python app.py` for real: the embedded default model (SmolLM2-135M-Instruct + EfficientNet-Lite0) on
CPU, started as a user starts it, timed until it serves the page, then asked through gradio_client."""
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "assets", "examples")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(args, port, log_path, env=None, timeout=120):
    """Start app.py; return (process, seconds until http://127.0.0.1:port/ answered 200)."""
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port), *args], cwd=ROOT,
                            env={**os.environ, **(env or {})}, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"app.py exited with {proc.returncode}:\n{open(log_path).read()[-4000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
                if r.status == 200:
                    return proc, time.time() - t0
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"app.py did not serve within {timeout} s:\n{open(log_path).read()[-4000:]}")


def stop_app(proc):
    proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(10)


def test_python_app_py_serves_the_default_model(tmp_path):
    from gradio_client import Client, handle_file

    from visualchat.assets import default_lm_dir

    default_lm_dir()  # the one-time conversion (measured separately: the first start) is not what we time here
    port = free_port()
    proc, seconds = start_app([], port, tmp_path / "app.log")
    try:
        print(f"python app.py served http://127.0.0.1:{port}/ after {seconds:.1f} s (cached default LM)")
        assert seconds < 60, f"a later start took {seconds:.1f} s"
        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10).read().decode()
        assert "VisualChat" in page
        c = Client(f"http://127.0.0.1:{port}/", verbose=False)
        answer = c.predict(conversation=[{"question": "What color is the star in Image 1?",
                                          "images": [handle_file(os.path.join(EXAMPLES, "shapes_1.png"))]}],
                           max_new_tokens=8, api_name="/generate")
        # the shipped checkpoint is served: the answer is a colour word (it was trained on such questions)
        answer = answer["answer"]
        assert answer.strip().lower() in {"red", "green", "blue", "yellow", "purple", "orange"}, answer
        hello = c.predict(conversation=[{"question": "Hello! Who are you?"}], max_new_tokens=12,
                          api_name="/generate")["answer"]
        assert len(hello.split()) >= 2 and any(ch.isalpha() for ch in hello), hello  # real text through the app
        chatbot, gallery, prompt, _, status = c.predict(
            {"text": "What word is written in Image 1?", "files": [handle_file(os.path.join(EXAMPLES, "shapes_1.png"))]},
            8, 0.0, 1.0, 1.0, api_name="/chat")
        assert "[Image 1: 49 tokens]" in prompt and chatbot[-1]["role"] == "assistant"
    finally:
        assert stop_app(proc) == 0
    log = (tmp_path / "app.log").read_text()
    assert "DeepSpeed-Inference" in log and "kernel injection off" in log


def test_sigterm_stops_the_app_cleanly(tmp_path):
    """docker stop / a Space restart send SIGTERM: the app closes and exits 0 (a bare SIGTERM would kill it
    with -15); SIGINT works the same even where the shell started the app with SIGINT ignored."""
    port = free_port()
    proc, _ = start_app(["--no-compare"], port, tmp_path / "app.log")
    proc.send_signal(signal.SIGTERM)
    try:
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
