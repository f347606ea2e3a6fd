"""Bounded load test of the app on 127.0.0.1 (issue 20): many concurrent /generate requests mixing
normal, oversized and malformed ones. Every request must end with an answer or a clear refusal (a
message that is not null: the app's own, or Gradio's "Queue is full"), the app must serve normally
afterwards, and its RSS must come back to within --rss-margin-mb of where it started.

    python bench/load_test.py                                   # starts python app.py --no-compare itself
    python bench/load_test.py --requests 30 --concurrency 1 --queue-size 16 --json bench/results/load_test.json
    python bench/load_test.py --url http://127.0.0.1:7860/      # an app already running (no RSS figures)
    python bench/load_test.py --soak 600 --json bench/results/soak.json   # 10 minutes, 4 clients (issue 27)

``--soak SECONDS``: instead of one burst, ``--clients`` clients (4) each send the same mix one request
after another until the time is up; the figures are answered / refused / unclear, latency p50/p95, the
app's RSS at the start, its peak and at the end, and the app's log lines per refused request.

Requests go through Gradio's plain HTTP API (POST /gradio_api/call/generate, then GET its event
stream), as curl would. ``run_load`` is importable (tests/test_load.py runs a short version on tiny
models in the test process).
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)


def _png_bytes(size=(64, 48), rgb=(200, 30, 30)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, rgb).save(buf, format="PNG")
    return buf.getvalue()


def thin_png(width=1, height=39_000_000) -> bytes:
    """The issue's 1 x 39,000,000 1-bit PNG (about 75 KB), built row block by row block."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\x00" * (1 + (width + 7) // 8)
    z, parts, left = zlib.compressobj(9), [], height
    block = row * ((1 << 20) // len(row))
    per = len(block) // len(row)
    while left:
        n = min(left, per)
        parts.append(z.compress(block[: n * len(row)]))
        left -= n
    parts.append(z.flush())
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b""))


def data_url(raw: bytes, mime="image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


def cases(image_path: str | None = None) -> list[tuple[str, list]]:
    """One of each request kind: (kind, the /generate arguments [conversation, max_new_tokens, temperature,
    top_p, repetition_penalty, seed, model]), normal, oversized and malformed."""
    img = data_url(open(image_path, "rb").read()) if image_path else data_url(_png_bytes())
    thin = data_url(thin_png())
    ok = lambda conv, mnt=12: [conv, mnt, 0.0, 1.0, 1.0, None, "chat"]  # noqa: E731
    return [
        ("normal", ok([{"question": "What is in Image 1?", "images": [img]}])),
        ("oversized: thin 1x39M PNG", ok([{"question": "What is in Image 1?", "images": [thin]}])),
        ("oversized: max_new_tokens 10**9", ok([{"question": "Hi"}], 10 ** 9)),
        ("normal", ok([{"question": "How many shapes are in Image 1?", "images": [img]}])),
        ("oversized: 10,000-character question", ok([{"question": "why " * 2500}])),
        ("malformed: answer int", ok([{"question": "Hi", "answer": 3}, {"question": "And?"}])),
        ("normal", ok([{"question": "Hello!"}])),
        ("malformed: max_new_tokens null", ok([{"question": "Hi"}], None)),
        ("malformed: model list", [[{"question": "Hi"}], 8, 0.0, 1.0, 1.0, None, ["chat"]]),
        ("malformed: seed 2**70", [[{"question": "Hi"}], 8, 0.0, 1.0, 1.0, 2 ** 70, "chat"]),
        ("malformed: data:text/html PNG", ok([{"question": "Hi", "images": [img.replace("image/png", "text/html")]}])),
        ("malformed: lone surrogate", ok([{"question": "Hi \ud800"}])),
        ("malformed: path not uploaded", ok([{"question": "Hi", "images": [
            {"path": "/etc/hostname", "meta": {"_type": "gradio.FileData"}}]}])),
        ("malformed: relative path file entry", ok([{"question": "Hi", "images": [
            {"path": "x.png", "meta": {"_type": "gradio.FileData"}}]}])),
        ("malformed: URL file entry", ok([{"question": "Hi", "images": [
            {"path": "http://127.0.0.1:9/x.png", "meta": {"_type": "gradio.FileData"}}]}])),
        ("normal", ok([{"question": "What color is the shape in Image 1?", "images": [img]}, ])),
    ]


def big_case(big_mb: int) -> tuple[str, list]:
    """An inline image over --max-file-size (issue 20's 50 MB)."""
    big = "data:image/png;base64," + "A" * (big_mb * 1_000_000 * 4 // 3)
    return f"oversized: {big_mb} MB data URL", [[{"question": "Hi", "images": [big]}], 12, 0.0, 1.0, 1.0, None, "chat"]


def request_mix(n: int, image_path: str | None = None, big_mb: int = 50) -> list[tuple[str, list]]:
    """``n`` (kind, data) pairs cycling through :func:`cases`; the third is :func:`big_case` (``big_mb`` > 0)."""
    kinds = cases(image_path)
    out = [kinds[i % len(kinds)] for i in range(n)]
    if big_mb and n >= 3:
        out[2] = big_case(big_mb)
    return out


def _body(data) -> bytes:
    # a lone surrogate cannot be UTF-8: escape it as JSON does (\\ud800), as a client's JSON encoder would
    return json.dumps({"data": data}, ensure_ascii=True).encode()


def one_request(url: str, kind: str, data, timeout: float = 600) -> dict:
    """POST then read the event stream; returns {kind, outcome: answered|refused|unclear, message, seconds}."""
    t0 = time.monotonic()
    res = {"kind": kind}
    try:
        req = urllib.request.Request(url + "gradio_api/call/generate", data=_body(data),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            event_id = json.loads(r.read())["event_id"]
        with urllib.request.urlopen(f"{url}gradio_api/call/generate/{event_id}", timeout=timeout) as r:
            text = r.read().decode()
        event, payload = None, None
        for block in text.strip().split("\n\n"):
            lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
            if lines.get("event") in ("complete", "error"):
                event, payload = lines["event"], json.loads(lines.get("data", "null"))
        if event == "complete" and isinstance(payload, list) and isinstance(payload[0], dict) and \
                isinstance(payload[0].get("answer"), str):
            res.update(outcome="answered", message=payload[0]["answer"][:80],
                       finish_reason=payload[0].get("finish_reason"))
        elif event == "error" and payload not in (None, {"error": None}) and str(payload).strip():
            res.update(outcome="refused", message=str(payload)[:300])
        else:
            res.update(outcome="unclear", message=text[-300:])
    except urllib.error.HTTPError as e:
        body = e.read().decode(errors="replace")
        try:
            detail = json.loads(body).get("detail")
        except ValueError:
            detail = None
        res.update(outcome="refused" if detail else "unclear", message=f"HTTP {e.code}: {detail or body[:200]}")
    except Exception as e:  # a timeout, a dropped connection: not a clear answer
        res.update(outcome="unclear", message=f"{type(e).__name__}: {e}")
    res["seconds"] = time.monotonic() - t0
    return res


def run_load(url: str, n: int = 30, image_path: str | None = None, big_mb: int = 50, timeout: float = 600,
             rss: "RssSampler | None" = None) -> dict:
    """Fire ``n`` mixed requests at once (one thread each); returns the per-request results and a summary."""
    mix = request_mix(n, image_path, big_mb)
    results: list[dict | None] = [None] * n
    barrier = threading.Barrier(n)

    def worker(i):
        kind, data = mix[i]
        barrier.wait()
        results[i] = one_request(url, kind, data, timeout)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(n)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 60)
    wall = time.monotonic() - t0
    done = [r if r is not None else {"kind": mix[i][0], "outcome": "unclear", "message": "no result"}
            for i, r in enumerate(results)]
    return {"summary": _summary(done, wall, timeout), "results": done}


def _summary(done: list[dict], wall: float, timeout: float) -> dict:
    secs = sorted(r.get("seconds", timeout) for r in done)
    pct = lambda q: secs[min(len(secs) - 1, int(round(q * (len(secs) - 1))))]  # noqa: E731
    return {"requests": len(done), "answered": sum(r["outcome"] == "answered" for r in done),
            "refused": sum(r["outcome"] == "refused" for r in done),
            "unclear": sum(r["outcome"] == "unclear" for r in done),
            "queue_full": sum("Queue is full" in r.get("message", "") for r in done),
            "p50_s": round(pct(0.5), 2), "p95_s": round(pct(0.95), 2), "wall_s": round(wall, 1),
            "finish_reasons": dict(Counter(r["finish_reason"] for r in done if r.get("finish_reason"))),
            "by_kind": {k: dict(Counter(r["outcome"] for r in done if r["kind"] == k))
                        for k in sorted({r["kind"] for r in done})}}


def run_soak(url: str, seconds: float, clients: int = 4, image_path: str | None = None, big_mb: int = 50,
             timeout: float = 600) -> dict:
    """``clients`` threads, each sending the mix of :func:`request_mix` (each from its own place in it) one
    request after another until ``seconds`` have passed; returns the results and a summary."""
    mix = cases(image_path) + ([big_case(big_mb)] if big_mb else [])
    results: list[dict] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client(i):
        j = i * (len(mix) // clients)
        while time.monotonic() < deadline:
            kind, data = mix[j % len(mix)]
            r = one_request(url, kind, data, timeout)
            with lock:
                results.append(r)
            j += 1

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + timeout + 60)
    return {"summary": _summary(results, time.monotonic() - t0, timeout), "results": results}


class RssSampler:
    """Samples a process's resident set size (VmRSS) every ``every`` seconds in a thread; ``timeline``
    keeps one sample every ``keep_every`` seconds: (seconds since the start, bytes)."""

    def __init__(self, pid: int, every: float = 0.1, keep_every: float = 60.0):
        self.pid, self.every, self.peak, self._stop = pid, every, 0, threading.Event()
        self.keep_every, self.timeline = keep_every, []
        self._t = threading.Thread(target=self._run, daemon=True)

    def now(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def _run(self):
        t0 = time.monotonic()
        while not self._stop.is_set():
            try:
                rss = self.now()
            except OSError:
                return
            self.peak = max(self.peak, rss)
            t = time.monotonic() - t0
            if not self.timeline or t - self.timeline[-1][0] >= self.keep_every:
                self.timeline.append((round(t), rss))
            self._stop.wait(self.every)

    def __enter__(self):
        self.peak = self.now()
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def examples(results: list[dict]) -> list[dict]:
    """A soak's results to keep: the first of each kind and outcome, and every unclear one."""
    seen, out = set(), []
    for r in results:
        key = (r["kind"], r["outcome"])
        if key not in seen or r["outcome"] == "unclear":
            seen.add(key)
            out.append(r)
    return out


def _lines(path: str) -> int:
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_up(url: str, proc, timeout: float = 600) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"the app exited with {proc.returncode} before serving")
        try:
            urllib.request.urlopen(url + "gradio_api/info", timeout=5).read()
            return
        except Exception:
            time.sleep(1)
    raise TimeoutError(f"the app did not serve {url} within {timeout} s")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=30)
    p.add_argument("--concurrency", type=int, default=1, help="the app's --concurrency")
    p.add_argument("--queue-size", type=int, default=16, help="the app's --queue-size")
    p.add_argument("--big-mb", type=int, default=50, help="size of the one oversized data URL (0: none)")
    p.add_argument("--url", default=None, help="test an app already running here instead of starting one")
    p.add_argument("--app-args", default="--no-compare", help="extra arguments for python app.py")
    p.add_argument("--rss-margin-mb", type=float, default=300)
    p.add_argument("--settle", type=float, default=5.0, help="seconds to wait before the 'after' RSS")
    p.add_argument("--json", default=None, help="write the figures here")
    p.add_argument("--soak", type=float, default=None, metavar="SECONDS",
                   help="instead of one burst of --requests: --clients clients send the mix for this long")
    p.add_argument("--clients", type=int, default=4, help="--soak: clients sending at the same time")
    a = p.parse_args(argv)
    image = os.path.join(ROOT, "assets", "examples", "shapes_1.png")
    proc = None
    url = a.url
    if url is None:
        port = _free_port()
        url = f"http://127.0.0.1:{port}/"
        cmd = [sys.executable, "app.py", "--port", str(port), "--concurrency", str(a.concurrency),
               "--queue-size", str(a.queue_size), *a.app_args.split()]
        print("starting:", " ".join(cmd), flush=True)
        app_log = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"load_test_app_{port}.log")
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(app_log, "w"))
    try:
        if proc is not None:
            _wait_up(url, proc)
        warm = one_request(url, "warm-up", request_mix(1, image, 0)[0][1])
        print("warm-up:", warm, flush=True)
        sampler = RssSampler(proc.pid) if proc is not None else None
        before = sampler.now() if sampler else None
        if sampler:
            sampler.__enter__()
        log_before = _lines(app_log) if proc is not None else None
        try:
            out = run_soak(url, a.soak, a.clients, image, a.big_mb) if a.soak else run_load(url, a.requests, image, a.big_mb)
        finally:
            if sampler:
                sampler.__exit__()
        log_lines = _lines(app_log) - log_before if proc is not None else None
        after_check = one_request(url, "after", request_mix(1, image, 0)[0][1])
        big = None
        if a.big_mb:  # in the burst it may meet a full queue; alone it must meet the size limit
            big = one_request(url, f"alone: {a.big_mb} MB data URL", request_mix(3, image, a.big_mb)[2][1])
            print("alone:", big, flush=True)
        time.sleep(a.settle)
        after = sampler.now() if sampler else None
        s = out["summary"]
        s["served_after"] = after_check["outcome"] == "answered"
        if log_lines is not None:  # every line the app wrote while the requests ran (refusals: one each)
            s["app_log_lines"] = log_lines
            s["app_log_lines_per_refusal"] = round(log_lines / max(1, s["refused"]), 2)
        if big is not None:
            s["big_data_url_alone"] = f"{big['outcome']} in {big['seconds']:.1f} s: {big.get('message', '')[:160]}"
        if sampler:
            s.update(rss_before_mb=round(before / 2 ** 20), rss_peak_mb=round(sampler.peak / 2 ** 20),
                     rss_after_mb=round(after / 2 ** 20),
                     rss_timeline_mb=[(t, round(b / 2 ** 20)) for t, b in sampler.timeline])
        for r in out["results"] if not a.soak else []:
            print(f"{r['outcome']:9s} {r.get('seconds', 0):7.2f} s  {r['kind']:38s} {r.get('message', '')[:110]!r}")
        print(json.dumps(s, indent=1))
        ok = (s["unclear"] == 0 and s["served_after"] and (big is None or big["outcome"] == "refused")
              and (after is None or after - before <= a.rss_margin_mb * 2 ** 20))
        if a.json:
            from bench.common import write_json

            results = out["results"] if not a.soak else examples(out["results"])
            write_json(a.json, {"summary": s, "results": results, "command": " ".join(sys.argv),
                                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "ok": ok})
        print("OK" if ok else "FAILED", flush=True)
        return 0 if ok else 1
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    sys.exit(main())
