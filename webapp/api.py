"""The stateless API's input and the web server's request plumbing (Gradio-specific): a ``/generate``
request's shape and its images (uploaded files, data URLs, base64) as data, noticing an answer nobody
reads, dropping Gradio's copy of a finished request, and an ASGI guard on request bodies (their size, and
file entries that are not uploads). The rounds themselves are checked where every round is,
:meth:`visualchat.session.Session.prepare_round`, when the request's conversation is built
(:meth:`visualchat.served.ServedConversation.from_history`)."""
from __future__ import annotations

import base64
import binascii
import os
from typing import Callable

from visualchat.images import ImageError
from visualchat.limits import Limits


class RequestGuard:
    """ASGI middleware that refuses, before the web app parses it, (a) a POST body over ``max_bytes``
    (413): Gradio caps file uploads (``max_file_size``, the /upload route, left alone here) but reads any
    JSON body whole into memory and keeps it while the request waits in the queue; (b) a JSON body with a
    Gradio file entry (``{"path": ..., "meta": {"_type": "gradio.FileData"}}``) that is not a file uploaded
    to this server (400): a server path, ``../``, ``file://`` or a web URL. Gradio refuses those too, but
    prints a 30-45 line traceback per request (anyone could flood the log) and tells the caller the
    server's working directory. Each refusal here logs one line (:func:`webapp.refusal.log_refusal`)."""

    def __init__(self, app, max_bytes: int, upload_dir: str | None = None):
        self.app, self.max_bytes, self.upload_dir = app, max_bytes, upload_dir

    async def _refuse(self, receive, send, status: int, message: str, route: str, knob: str | None = None,
                      more: bool = True) -> None:
        import json

        from .refusal import log_refusal

        while more:  # read the rest without keeping it, so the client gets to read the answer
            msg = await receive()
            more = msg["type"] == "http.request" and msg.get("more_body", False)
        log_refusal(route, message, knob=knob)
        body = json.dumps({"detail": message}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    def _too_large(self, size_text: str) -> str:
        return (f"the request body is {size_text} bytes; this server accepts at most {self.max_bytes:,}. Send "
                "large images with gradio_client.handle_file(...) instead of inline base64")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path", "").rstrip("/").endswith("/upload"):
            return await self.app(scope, receive, send)
        route = scope.get("path", "")
        length = dict(scope.get("headers") or ()).get(b"content-length")
        try:
            n = int(length) if length is not None else None
        except ValueError:
            n = None
        if n is not None and n > self.max_bytes:
            return await self._refuse(receive, send, 413, self._too_large(f"{n:,}"), route, REQUEST_SIZE_KNOB)
        chunks, total = [], 0  # read up to the limit (a chunked body has no length), then replay
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                return
            chunks.append(msg.get("body", b""))
            total += len(chunks[-1])
            if total > self.max_bytes:
                return await self._refuse(receive, send, 413, self._too_large(f"over {self.max_bytes:,}"), route,
                                          REQUEST_SIZE_KNOB, more=bool(msg.get("more_body")))
            if not msg.get("more_body"):
                break
        body = b"".join(chunks)
        del chunks
        bad = foreign_file_entry(body, self.upload_dir)
        if bad:
            return await self._refuse(receive, send, 400, bad, route, more=False)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()
        return await self.app(scope, replay, send)


REQUEST_SIZE_KNOB = "--max-request-size / VISUALCHAT_MAX_REQUEST_SIZE"


def foreign_file_entry(body: bytes, upload_dir: str | None = None) -> str | None:
    """Why a JSON request body is refused for a Gradio file entry that is not an upload to this server,
    or None (no such entry, or not JSON: Gradio answers that). The same rule as Gradio's own check of an
    input file (its path inside the upload folder; a web URL is never fetched), said without the path."""
    if b"gradio.FileData" not in body:
        return None
    import json

    from gradio.utils import abspath, get_upload_folder, is_in_or_equal

    try:
        data = json.loads(body)
    except ValueError:
        return None
    folder = upload_dir or get_upload_folder()
    todo = [data]
    while todo:
        x = todo.pop()
        if isinstance(x, list):
            todo.extend(x)
        elif isinstance(x, dict):
            meta = x.get("meta")
            if isinstance(meta, dict) and meta.get("_type") == "gradio.FileData":
                path = x.get("path")
                if not isinstance(path, str) or path.startswith(("http://", "https://")) or \
                        not is_in_or_equal(abspath(path), folder):
                    return ("a file in this request was not uploaded to this server; upload it first "
                            "(gradio_client.handle_file(path) does) or send the image inline as a "
                            "data:image/png;base64,... string. Web URLs and server paths are not read")
            else:
                todo.extend(x.values())
    return None



# ---------------------------------------------------------------------------------------------------
# API input


FILE_SIZE_KNOB = "--max-file-size / VISUALCHAT_MAX_FILE_SIZE"
#: The media types a ``data:`` URL may declare (the formats visualchat.images opens).
DATA_URL_TYPES = ("image/png", "image/jpeg", "image/jpg", "image/gif", "image/webp", "image/bmp")


def _b64_payload(text: str, field: str, limits: Limits) -> bytes:
    """Decode base64 image data, refusing it by its length before decoding when it is too large."""
    size = len(text) * 3 // 4
    if size > limits.max_image_bytes:
        raise ImageError(f"{field} holds about {size:,} bytes of image data; this server accepts images of up to "
                         f"{limits.max_image_bytes:,} bytes", knob=FILE_SIZE_KNOB)
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageError(f"{field} is not valid base64: {e}") from None


def api_image(item, upload_dir: str | None = None, limits: Limits | None = None, field: str = "image"):
    """One image of a ``/generate`` request: a Gradio file (a dict with a ``path`` inside Gradio's upload
    folder, which is what ``gradio_client.handle_file`` turns into), a ``data:image/...;base64,`` URL or
    a ``base64:`` string. Server paths outside the upload folder are refused; inline data larger than
    ``limits.max_image_bytes`` is refused by its length, before it is decoded."""
    limits = limits or Limits.from_env()
    if isinstance(item, dict) and "path" in item:
        from gradio.utils import get_upload_folder, is_in_or_equal

        if not isinstance(item["path"], str) or not item["path"]:
            raise ImageError(f"{field}: a file's path must be text, got {type(item['path']).__name__}")
        path = item["path"]
        name = item.get("orig_name") if isinstance(item.get("orig_name"), str) else os.path.basename(path)
        if not is_in_or_equal(path, upload_dir or get_upload_folder()):
            raise ImageError(f"{field} ({name!r}) was not uploaded through this server; send it with "
                             "gradio_client.handle_file(...) or inline as a data:image/png;base64,... string "
                             "(web URLs and server paths are not read)")
        try:
            size = os.path.getsize(path)
        except OSError:
            raise ImageError(f"{field} ({name!r}) is not on this server (upload it again)") from None
        if size > limits.max_image_bytes:
            raise ImageError(f"{field} ({name!r}) is {size:,} bytes; this server accepts images of up to "
                             f"{limits.max_image_bytes:,} bytes", knob=FILE_SIZE_KNOB)
        return path
    if isinstance(item, str) and item.startswith("data:"):
        head, sep, payload = item.partition(",")
        parts = head[len("data:"):].split(";")
        mime = parts[0].strip().lower()
        if not sep or "base64" not in [p.strip().lower() for p in parts[1:]]:
            raise ImageError(f"{field}: a data URL must be data:<image type>;base64,<data>")
        if mime not in DATA_URL_TYPES:
            raise ImageError(f"{field}: a data URL's media type must be one of image/png, image/jpeg, image/gif, "
                             f"image/webp or image/bmp, got {mime or 'none'!r}")
        return _b64_payload(payload, field, limits)
    if isinstance(item, str) and item.startswith("base64:"):
        return _b64_payload(item[len("base64:"):], field, limits)
    got = "null" if item is None else ("a dict without 'path'" if isinstance(item, dict) else type(item).__name__)
    raise ImageError(f"{field} must be a file uploaded with gradio_client.handle_file(path), an inline "
                     f"data:image/png;base64,... string or a 'base64:...' string, got {got}")


def parse_api_conversation(conversation, limits: Limits | None = None,
                           upload_dir: str | None = None) -> tuple[list[dict], str, list]:
    """``[{"question": ..., "images": [...], "answer": ...}, ...]`` -> (history, question, images): the
    request's shape (a list of rounds, each an object with known keys; the last one, the round to answer,
    without an answer) and its images as data (:func:`api_image`: inline data is refused by its length
    before it is decoded). Messages name the round and the field. What the rounds say is checked when
    the conversation is built from them (:meth:`visualchat.session.Session.prepare_round`)."""
    limits = limits or Limits.from_env()
    if isinstance(conversation, dict) and "rounds" in conversation:
        conversation = conversation["rounds"]
    if not isinstance(conversation, list) or not conversation:
        raise ValueError("conversation must be a non-empty list of rounds: "
                         '[{"question": "...", "images": [...]}, ...]')
    rounds = []
    for i, r in enumerate(conversation, 1):
        if isinstance(r, str):
            r = {"question": r}
        if not isinstance(r, dict):
            raise ValueError(f"round {i} must be an object with a question (and optionally images, answer), "
                             f"got {type(r).__name__}")
        unknown = set(r) - {"question", "images", "answer"}
        if unknown:
            raise ValueError(f"round {i} has unknown keys {sorted(map(str, unknown))}; use question, images, answer")
        images = r.get("images")
        if images is None:
            images = []
        elif not isinstance(images, list):
            images = [images]
        rounds.append({"question": r.get("question"), "images": images, "answer": r.get("answer")})
    last = rounds.pop()
    if last["answer"] is not None and (not isinstance(last["answer"], str) or last["answer"].strip()):
        raise ValueError("the last round already has an answer; append the round to answer")
    n = 0
    for i, r in enumerate(rounds + [last], 1):
        opened = []
        for x in r["images"]:
            n += 1
            opened.append(api_image(x, upload_dir, limits, field=f"image {n} (round {i})"))
        r["images"] = opened
    return rounds, last["question"], last["images"]


def validate_api_request(server, conversation, model="chat") -> tuple[str, list[dict], str, list]:
    """The model a ``/generate`` request names and its conversation (:func:`parse_api_conversation`), with
    a message naming the field: (model, history, question, images)."""
    if not isinstance(model, str) or model not in server.models:
        got = repr(model) if isinstance(model, str) else ("null" if model is None else type(model).__name__)
        raise ValueError(f"model must be one of {sorted(server.models)}, got {got}"
                         + ("" if server.compare.ready else " (the Compare tab's models are not loaded on this server)"))
    history, question, images = parse_api_conversation(conversation, server.limits)
    return model, history, question, images


def unread_probe(request, seconds: float) -> Callable[[], bool] | None:
    """For a queued Gradio request, a function that is true once the request's session has left its
    output unread for ``seconds`` (a POST to /gradio_api/call/generate whose result is never fetched: its
    messages pile up in the session's queue). None when the request carries no session to watch.

    Gradio itself stops a generator whose reader disconnects (it marks the event dead), but an event
    that was never read stays alive and would hold a worker to the end; this closes that gap. A live
    reader (gradio_client, the browser, a curl GET) drains the queue within milliseconds of each piece."""
    import time

    try:
        session = request.session_hash
        queue = request.request.app.get_blocks()._queue
    except Exception:  # not a queued Gradio request (a test calling the handler directly)
        return None
    if not session:
        return None
    state = {"drained": time.monotonic()}

    def unread() -> bool:
        q = queue.pending_messages_per_session.get(session)
        now = time.monotonic()
        if q is None or q.qsize() <= 1:  # read (or nothing to read): the reader is keeping up
            state["drained"] = now
            return False
        return now - state["drained"] > seconds
    return unread


def forget_request_inputs(request, api_name: str) -> int:
    """Drop the copy of a finished request's inputs that Gradio keeps in its per-session state (the
    component values of the session's config, kept for up to 10,000 sessions): every POST to
    /gradio_api/call/<api_name> is a session of its own, so without this each request's conversation
    (a 50 MB data URL included) stayed in memory after its answer. Returns how many values were dropped."""
    try:
        blocks = request.request.app.get_blocks()
        state = blocks.state_holder.session_data.get(request.session_hash)
        fns = [f for f in blocks.fns.values() if getattr(f, "api_name", None) == api_name]
    except Exception:  # not a queued Gradio request (a test calling the handler directly)
        return 0
    n = 0
    for fn in fns if state is not None else ():
        for block in fn.inputs:
            cfg = state.config_values.get(block._id)
            if isinstance(cfg, dict) and isinstance(cfg.get("props"), dict) and cfg["props"].get("value") is not None:
                cfg["props"]["value"] = None
                n += 1
    return n


def forget_idle_sessions(request, idle_seconds: float = 30.0) -> int:
    """Drop the sessions Gradio keeps that hold no state (no ``gr.State`` value was ever made in them) and
    have not been used for ``idle_seconds``. Every POST to /gradio_api/call/<api_name> is a session of its
    own, and Gradio keeps each session's copy of every component's config (about 240 KB for this page) for
    up to 10,000 sessions: the stateless API grew the server by that much per request (bench/RESULTS.md,
    issue 27's soak: +459 MB in 3,116 requests). Such a session holds nothing Gradio cannot rebuild on
    its next request; a browser tab's conversation (its ``TabState``) is state and stays. Returns how many
    were dropped."""
    import datetime

    try:
        holder = request.request.app.get_blocks().state_holder
    except Exception:  # not a queued Gradio request (a test calling the handler directly)
        return 0
    cutoff = datetime.datetime.now() - datetime.timedelta(seconds=idle_seconds)
    dropped = 0
    with holder.lock:
        for sid in list(holder.session_data):
            used = holder.time_last_used.get(sid)
            if used is not None and used < cutoff and not holder.session_data[sid].state_data:
                del holder.session_data[sid]
                holder.time_last_used.pop(sid, None)
                dropped += 1
    return dropped
