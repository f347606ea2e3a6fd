"""VisualChat web app: multi-round, multi-image chat, a CA vs MMCA comparison, and a stateless API.

    python app.py                      # the embedded default model on http://127.0.0.1:7860
    deepspeed --num_gpus 2 app.py      # DeepSpeed-Inference AutoTP over 2 ranks (torchrun works too)

This file is the UI and its entry point; its Gradio-specific helpers are in the ``webapp`` package
beside it. Loading and ZeroGPU live in visualchat/serving.py, DeepSpeed and the multi-rank lockstep in
visualchat/tensor_parallel.py, a tab's conversation in visualchat/chat_session.py. The event handlers
are plain methods of ``ChatUI`` (inputs in, output values out), so tests call them without a browser.
"""
from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no phoning home from a fresh or offline machine
try:  # ZeroGPU wants `spaces` imported before torch touches CUDA; elsewhere it is not installed
    import spaces  # noqa: F401  (imported for its side effects)
except ImportError:
    pass

import argparse
import html
import logging
import signal
import sys
import time
import uuid
import weakref
from typing import Any, Iterator

log = logging.getLogger("visualchat.app")

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLES_DIR = os.path.join(HERE, "assets", "examples")

#: Ready-made conversations on the shapes scenes in assets/examples (what the default model is trained on):
#: (title, [(question, [image files brought by that round]), ...]).
EXAMPLES = [
    ("Star colour, then the word (1 image, 2 rounds)",
     [("What color is the star in Image 1?", ["shapes_1.png"]), ("What word is written in Image 1?", [])]),
    ("Spot the difference (2 images)",
     [("What is different between Image 1 and Image 2?", ["shapes_2.png", "shapes_3.png"])]),
    ("Count, add a second image, compare (3 rounds)",
     [("How many squares are in Image 1?", ["shapes_4.png"]), ("Describe Image 2.", ["shapes_5.png"]),
      ("Which image has more triangles, Image 1 or Image 2?", [])]),
]

CSS = """
#vc-header {gap: 2px;}
#vc-header h1 {margin: 0; font-size: 1.35rem;}
#vc-header p {margin: 0; opacity: .85; font-size: .92em;}
#vc-model p {font-size: .85em; opacity: .75;}
.vc-status {min-height: 0;}
.vc-status .vc-error {background: #fdecea; color: #7a1c12; border: 1px solid #f5c2bc; border-radius: 8px; padding: 8px 12px;}
.vc-status .vc-warn {background: #fff8e1; color: #6b4e00; border: 1px solid #ffe08a; border-radius: 8px; padding: 8px 12px;}
.vc-status .vc-info {color: #555; font-size: .9em; padding: 2px 4px;}
.dark .vc-status .vc-error {background: #4a1d18; color: #ffd9d3; border-color: #7a1c12;}
.dark .vc-status .vc-warn {background: #453600; color: #ffe9a8; border-color: #6b4e00;}
.dark .vc-status .vc-info {color: #bbb;}
#chatbot .image-container img, #chat-ca .image-container img, #chat-mmca .image-container img {max-height: 150px; width: auto;}
#chatbot .message.component, #chat-ca .message.component, #chat-mmca .message.component {max-width: 240px;}
#gallery .grid-container, #compare-gallery .grid-container {padding-top: 34px !important;}
"""


# ---------------------------------------------------------------------------------------------------
# Flags and environment variables


def _env(name: str, default: Any = None, *alts: str) -> Any:
    for n in (name, *alts):
        v = os.environ.get(n)
        if v not in (None, ""):
            return v
    return default


def _env_bool(name: str, default: bool = False) -> bool:
    v = os.environ.get(name)
    return default if v in (None, "") else v.strip().lower() in ("1", "true", "yes", "on")


def parse_args(argv=None) -> argparse.Namespace:
    from visualchat.serving import Limits

    limits = Limits()  # the per-request limits' defaults are written once, in visualchat.serving.Limits
    p = argparse.ArgumentParser(
        prog="python app.py",
        description="VisualChat web app (Gradio): chat about several images over several rounds, compare a "
                    "CA-trained with an MMCA-trained model, and a stateless /generate API. Every flag can also "
                    "be set by the environment variable in brackets (handy on Hugging Face Spaces).",
        epilog="Also read from the environment: VISUALCHAT_MAX_PIXELS (largest image accepted, default 40000000), "
               "VISUALCHAT_MAX_SIDE (longest image side, default 16384), VISUALCHAT_MAX_ASPECT (longest to shortest "
               "side, default 64), "
               "VISUALCHAT_CACHE (where the converted default LM is cached, default ~/.cache/visualchat), "
               "VISUALCHAT_GPU_DURATION (ZeroGPU seconds per call, default 120). Multi-rank: start with "
               "`deepspeed --num_gpus N app.py` or `torchrun --nproc_per_node N app.py`; rank 0 serves the UI.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m = p.add_argument_group("model")
    m.add_argument("--checkpoint", default=_env("VISUALCHAT_CHECKPOINT"), metavar="DIR",
                   help="checkpoint directory for the Chat tab; default: the shipped assets/checkpoints/shapes-mmca, "
                        "else an untrained projection [VISUALCHAT_CHECKPOINT]")
    m.add_argument("--lm", default=_env("VISUALCHAT_LM"), metavar="ID_OR_PATH",
                   help="base LM (HF id or local path) instead of the one the checkpoint names; default: the embedded "
                        "SmolLM2-135M-Instruct [VISUALCHAT_LM]")
    m.add_argument("--vision", default=_env("VISUALCHAT_VISION"), metavar="SPEC",
                   help="vision encoder spec (efficientnet-lite0, clip:PATH, qwen-vl:DIR) instead of the "
                        "checkpoint's [VISUALCHAT_VISION]")
    m.add_argument("--ca-checkpoint", default=_env("VISUALCHAT_CA_CHECKPOINT"), metavar="DIR",
                   help="CA-trained checkpoint for the Compare tab; default: assets/checkpoints/shapes-ca "
                        "[VISUALCHAT_CA_CHECKPOINT]")
    m.add_argument("--mmca-checkpoint", default=_env("VISUALCHAT_MMCA_CHECKPOINT"), metavar="DIR",
                   help="MMCA-trained checkpoint for the Compare tab; default: assets/checkpoints/shapes-mmca "
                        "[VISUALCHAT_MMCA_CHECKPOINT]")
    m.add_argument("--no-compare", dest="compare", action="store_false", default=_env_bool("VISUALCHAT_COMPARE", True),
                   help="do not load the Compare tab's models [VISUALCHAT_COMPARE=0] (Compare tab on: %(default)s)")
    m.add_argument("--trust-remote-code", action="store_true", default=_env_bool("VISUALCHAT_TRUST_REMOTE_CODE"),
                   help="allow custom modeling code from the LM's repository [VISUALCHAT_TRUST_REMOTE_CODE=1]")
    r = p.add_argument_group("runtime")
    r.add_argument("--device", default=_env("VISUALCHAT_DEVICE"),
                   help="cpu, cuda or cuda:N; default: cuda if available (cuda:LOCAL_RANK per rank), else cpu "
                        "[VISUALCHAT_DEVICE]")
    r.add_argument("--dtype", default=_env("VISUALCHAT_DTYPE", "auto"),
                   choices=["auto", "float32", "bfloat16", "float16"],
                   help="GPU: the model's dtype (auto: bfloat16); one CPU rank: the LM's weight format (auto: float16 where supported, fastest with the same answers) [VISUALCHAT_DTYPE]")
    r.add_argument("--load-in", "--quantization", dest="load_in", default=_env("VISUALCHAT_LOAD_IN", "none"),
                   choices=["none", "4bit", "8bit"],
                   help="load the LM in 4 or 8 bit with bitsandbytes (GPU; DeepSpeed-Inference is then not used) "
                        "[VISUALCHAT_LOAD_IN]")
    r.add_argument("--deepspeed", default=_env("VISUALCHAT_DEEPSPEED", "auto"), choices=["auto", "on", "off"],
                   help="wrap the LM with DeepSpeed-Inference (kernel injection off; AutoTP over the launcher's "
                        "ranks). auto: if DeepSpeed loads, else plain PyTorch (logged) [VISUALCHAT_DEEPSPEED]")
    r.add_argument("--tp-allreduce", default=_env("VISUALCHAT_TP_ALLREDUCE", "gloo"), choices=["gloo", "shm"],
                   help="how AutoTP all-reduces across ranks: gloo = torch.distributed on the process group (safe "
                        "under any launcher); shm = DeepSpeed's shared-memory CPU kernel (faster, one machine; its "
                        "first JIT build takes over a minute) [VISUALCHAT_TP_ALLREDUCE]")
    r.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    s = p.add_argument_group("server")
    s.add_argument("--host", default=_env("VISUALCHAT_HOST", "127.0.0.1", "GRADIO_SERVER_NAME"),
                   help="address to listen on (0.0.0.0 for all) [VISUALCHAT_HOST or GRADIO_SERVER_NAME]")
    s.add_argument("--port", type=int, default=int(_env("VISUALCHAT_PORT", 7860, "GRADIO_SERVER_PORT")),
                   help="port [VISUALCHAT_PORT or GRADIO_SERVER_PORT]")
    s.add_argument("--queue-size", type=int, default=int(_env("VISUALCHAT_QUEUE_SIZE", 16)),
                   help="requests that may wait for the model; beyond this a request is refused with a 'queue is "
                        "full' message [VISUALCHAT_QUEUE_SIZE]")
    s.add_argument("--concurrency", type=int, default=int(_env("VISUALCHAT_CONCURRENCY", 1)),
                   help="answers generated at the same time (the rest wait in the queue) [VISUALCHAT_CONCURRENCY]")
    s.add_argument("--max-new-tokens", type=int, default=int(_env("VISUALCHAT_MAX_NEW_TOKENS", 128)),
                   help="default of the max-new-tokens slider [VISUALCHAT_MAX_NEW_TOKENS]")
    s.add_argument("--max-file-size", default=_env("VISUALCHAT_MAX_FILE_SIZE", "25mb"),
                   help="largest upload Gradio accepts, and the largest data:/base64 image /generate decodes "
                        "(refused by its length first) [VISUALCHAT_MAX_FILE_SIZE]")
    lim = p.add_argument_group("limits per request (checked before any decoding or model work)")
    lim.add_argument("--max-new-tokens-limit", type=int, default=int(_env("VISUALCHAT_MAX_NEW_TOKENS_LIMIT", limits.max_new_tokens)),
                     help="largest max_new_tokens a request may ask for; more is refused with a message "
                          "[VISUALCHAT_MAX_NEW_TOKENS_LIMIT]")
    lim.add_argument("--max-question-chars", type=int, default=int(_env("VISUALCHAT_MAX_QUESTION_CHARS", limits.max_question_chars)),
                     help="longest question, in characters (an API round's earlier answer: 4x this) "
                          "[VISUALCHAT_MAX_QUESTION_CHARS]")
    lim.add_argument("--answer-seconds", type=float, default=float(_env("VISUALCHAT_ANSWER_SECONDS", limits.answer_seconds)),
                     help="wall-clock limit per answer, checked between tokens: the answer so far is kept "
                          "[VISUALCHAT_ANSWER_SECONDS]")
    lim.add_argument("--unread-seconds", type=float, default=float(_env("VISUALCHAT_UNREAD_SECONDS", limits.unread_seconds)),
                     help="an API answer whose output nobody reads for this long (a POST to "
                          "/gradio_api/call/generate never fetched) is stopped [VISUALCHAT_UNREAD_SECONDS]")
    lim.add_argument("--max-request-size", default=_env("VISUALCHAT_MAX_REQUEST_SIZE", "64mb"),
                     help="largest API request body (inline base64 images included) read at all; larger ones get "
                          "HTTP 413 before they are parsed [VISUALCHAT_MAX_REQUEST_SIZE]")
    lim.add_argument("--kv-cache-budget", default=_env("VISUALCHAT_KV_CACHE_BUDGET", "2gb"),
                     help="all tabs' KV caches together; beyond it the least recently used tabs drop theirs and "
                          "rebuild it on their next round [VISUALCHAT_KV_CACHE_BUDGET]")
    s.add_argument("--share", action="store_true", default=_env_bool("VISUALCHAT_SHARE"),
                   help="also open a public gradio.live link [VISUALCHAT_SHARE=1]")
    s.add_argument("--log-level", default=_env("VISUALCHAT_LOG_LEVEL", "INFO"),
                   help="logging level [VISUALCHAT_LOG_LEVEL]")
    return p.parse_args(argv)


def serve_options(args: argparse.Namespace):
    from visualchat.serving import ServeOptions

    return ServeOptions(checkpoint=args.checkpoint, lm=args.lm, vision=args.vision, compare=args.compare,
                        ca_checkpoint=args.ca_checkpoint, mmca_checkpoint=args.mmca_checkpoint, device=args.device,
                        dtype=args.dtype, quantization=None if args.load_in == "none" else args.load_in,
                        deepspeed=args.deepspeed, tp_allreduce=args.tp_allreduce,
                        trust_remote_code=args.trust_remote_code, limits=limits_from_args(args))


def limits_from_args(args: argparse.Namespace):
    from visualchat.serving import Limits, parse_size

    return Limits(max_new_tokens=args.max_new_tokens_limit, max_question_chars=args.max_question_chars,
                  max_image_bytes=parse_size(args.max_file_size, "--max-file-size"),
                  answer_seconds=args.answer_seconds, unread_seconds=args.unread_seconds,
                  kv_cache_budget=parse_size(args.kv_cache_budget, "--kv-cache-budget"),
                  max_request_bytes=parse_size(args.max_request_size, "--max-request-size"))


# ---------------------------------------------------------------------------------------------------
# Rendering the state into component values


def _esc(text: str) -> str:
    return html.escape(str(text))


def status_html(kind: str, text: str) -> str:
    """The status line under the chat: kind error | warn | info, or "" for nothing."""
    return f'<div class="vc-{kind}">{text}</div>' if text else ""


GENERATING = "*(generating…)*"


def chat_messages(chat) -> list[dict]:
    """A ChatSession as Chatbot messages: each user turn shows the images it brought (captioned with the
    numbers the model sees) above its question."""
    msgs = []
    for r in chat.rounds:
        content: list = [{"path": p, "alt_text": f"Image {r.first_image + i}"} for i, p in enumerate(r.paths)]
        if r.paths:
            names = ", ".join(f"Image {r.first_image + i}" for i in range(len(r.paths)))
            content.append(f"*({names} attached)*\n\n{r.question}")
        else:
            content.append(r.question)
        msgs.append({"role": "user", "content": content})
        answer = r.answer if r.answer else (GENERATING if r.answer is None else "*(no answer)*")
        msgs.append({"role": "assistant", "content": answer})
    return msgs


def gallery_items(chat) -> list[tuple[str, str]]:
    return [(p, f"Image {i}") for i, p in enumerate(chat.image_paths, 1)]


def stats_text(chat) -> str:
    s = chat.last_stats or {}
    if not s.get("new_tokens"):
        return ""
    return (f"{s['new_tokens']} tokens in {s.get('total_s', 0):.1f} s · {s.get('tokens_per_s', 0):.1f} tokens/s · "
            f"first token after {s.get('ttft_s', 0):.2f} s · {s.get('prefill_tokens', 0)} prompt tokens computed")


def outcome_html(chat, regenerate: bool = True) -> str:
    """What the last request of this chat did, for the status line. ``regenerate``: the tab has a
    Regenerate button to point to (the Compare tab does not)."""
    if chat.status == "stopped":  # chat.error says why when the server stopped it (its time limit per answer)
        return status_html("warn", "Stopped" + (f": {_esc(chat.error)}" if chat.error else "") + ". The partial answer is kept; "
                                   + ("Regenerate to try again." if regenerate else "ask again to try again."))
    if chat.status == "failed":
        return status_html("error", f"<b>The model failed while answering</b>: {_esc(chat.error)}. What it had "
                                    "written so far is kept, and the app keeps serving.")
    if chat.status == "rejected":
        return status_html("error", f"<b>Not sent</b>: {_esc(chat.error)}. The conversation is unchanged.")
    if chat.status == "done":
        return status_html("info", _esc(stats_text(chat)))
    return ""


def trained_on_shapes(vc) -> bool:
    """Whether a model was trained on the synthetic shapes world only (its checkpoint's recorded data sets)."""
    datasets = (getattr(vc.config, "info", None) or {}).get("datasets") or []
    return any(str(d).startswith("shapes") for d in datasets) and all(
        str(d).startswith("shapes") or d in ("jsonl", "chat") for d in datasets)


SHAPES_NOTE = ("<b>What this model knows:</b> the default checkpoint was trained only on a synthetic world of "
               "coloured shapes (circles, squares, triangles and stars in a 3×3 layout, sometimes a word), so ask "
               "about such scenes: colours, counts, positions, what differs between images. Photos come back as "
               "lists of shapes. For real pictures, train or load a real checkpoint (README: <i>Train your own</i>; "
               "<code>python app.py --checkpoint DIR</code>).")


def _layer_choice(layer) -> int | None:
    """The layer dropdown's value: None (mean of all layers) or a 0-based layer."""
    return None if layer in (None, "", -1, "-1") else int(layer)


def looked_note(named_maps: list, layer: int | None) -> str:
    """The line under a gallery that shows attention maps: what is averaged, and per model what the
    share means (CA: part of one softmax over all tokens; MMCA: a softmax of its own)."""
    m0 = named_maps[0][1]
    rows, cols = m0.grid
    which = f"the mean of all {m0.n_layers} layers" if layer is None else f"layer {layer + 1} of {m0.n_layers}"
    text = (f"<b>Where it looked</b>: the last answer's attention over each image's {m0.image_tokens} tokens "
            f"({rows}×{cols}), averaged over the answer's tokens, all heads and {which}; brighter = more. "
            "Captions: each image's share of the attention the answer paid to images.")
    for name, m in named_maps:
        who = f"{name}" if name else "This model"
        if m.mode == "causal":
            text += (f" {who} uses causal attention: {m.image_share(layer):.0%} of its attention went to image "
                     "tokens at all (the rest to text); the maps show that part, renormalised per image.")
        else:
            text += f" {who} uses MMCA: each answer token's attention over the image tokens is a softmax of its own."
    if not m0.square:
        text += (f" K={m0.image_tokens} is not a square number: its tokens are drawn {rows}×{cols} in order, "
                 "which may not match where they come from in the image.")
    return status_html("info", text)


def split_message(message) -> tuple[str, list]:
    """A MultimodalTextbox value (dict with text and files) or a plain string -> (text, files)."""
    if message is None:
        return "", []
    if isinstance(message, str):
        return message, []
    text = message.get("text") or ""
    files = []
    for f in message.get("files") or []:
        files.append(f.get("path") if isinstance(f, dict) else f)
    return text, files


EMPTY_MESSAGE = {"text": "", "files": []}


class _Throttle:
    """True at most every ``every`` seconds (and on the first call): limits UI updates while streaming."""

    def __init__(self, every: float = 0.08):
        self.every, self.last = every, 0.0

    def __call__(self) -> bool:
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            return True
        return False


# ---------------------------------------------------------------------------------------------------
# Event handlers


class ChatUI:
    """The app's event handlers. Each takes the component values (and the tab's ``TabState``) and
    returns, or yields while streaming, the output values."""

    def __init__(self, server, max_new_tokens: int = 128):
        self.server = server
        self.max_new_tokens = max_new_tokens
        self._overlays = weakref.WeakKeyDictionary()  # chat session -> its attention-map image files

    @staticmethod
    def stop_button(busy: bool):
        """Stop is enabled and red only while an answer runs."""
        import gradio as gr

        return gr.Button(interactive=busy, variant="stop" if busy else "secondary")

    def stop_busy(self):
        return self.stop_button(True)

    def stop_idle(self):
        return self.stop_button(False)

    def _draw_maps(self, owner, entries) -> list[tuple[str, str]]:
        """Gallery items for ``entries`` (source image path, heat map, caption): each image with its map
        drawn over it, written to the server's temp folder (replacing ``owner``'s previous ones)."""
        from PIL import Image

        from visualchat.attention_maps import overlay
        from visualchat.chat_session import _remove

        for p in self._overlays.pop(owner, []):
            _remove(p)
        items, paths = [], []
        for src, heat, caption in entries:
            with Image.open(src) as im:
                drawn = overlay(im, heat)
            path = os.path.join(self.server.tmpdir, f"looked-{uuid.uuid4().hex}.png")
            drawn.save(path, format="PNG", compress_level=1)
            paths.append(path)
            items.append((path, caption))
        self._overlays[owner] = paths
        return items

    @staticmethod
    def _maps_of(chats) -> tuple[list | None, str]:
        """Each chat's attention maps, or (None, a note saying why there are none)."""
        try:
            return [c.attention_maps() for c in chats], ""
        except ValueError as e:
            return None, status_html("info", f"<b>Where it looked</b>: {_esc(e)}.")
        except RuntimeError as e:
            return None, status_html("error", f"<b>Where it looked</b>: {_esc(e)}.")

    # -- helpers -------------------------------------------------------------------------------
    @staticmethod
    def gen(max_new_tokens, temperature, top_p, repetition_penalty, seed=None) -> dict:
        return dict(max_new_tokens=int(max_new_tokens), temperature=float(temperature), top_p=float(top_p),
                    repetition_penalty=float(repetition_penalty), seed=None if seed in (None, "") else int(seed))

    @staticmethod
    def input_box(busy: bool, clear: bool = False):
        """The input box while an answer is generated (a stop button instead of send, as in most chat
        apps; cleared when the message was taken) or idle again."""
        import gradio as gr

        kw = {"value": dict(EMPTY_MESSAGE)} if clear else {}
        return gr.MultimodalTextbox(submit_btn=not busy, stop_btn=busy, **kw)

    def chat_view(self, chat, status: str | None = None, textbox: Any = None) -> tuple:
        """(chatbot, gallery, prompt, textbox, status) for the Chat tab."""
        import gradio as gr

        return (chat_messages(chat), gallery_items(chat), chat.prompt_text(),
                gr.skip() if textbox is None else textbox, outcome_html(chat) if status is None else status)

    def _stream(self, chat, stream: Iterator[str], view, clear_textbox: bool = True) -> Iterator[tuple]:
        """Yield views while ``stream`` generates (throttled), then the final one. Closing this generator
        (Stop, a cancelled request) closes the stream, which keeps the partial answer."""
        throttle = _Throttle()
        try:
            yield view(status="", textbox=self.input_box(True, clear_textbox))
            try:
                for _ in stream:
                    if throttle():
                        yield view(status="")
            except Exception:  # logged by ChatSession; the status line says what happened
                pass
            yield view(textbox=self.input_box(False))
        finally:
            stream.close()

    # -- Chat tab ------------------------------------------------------------------------------
    def send(self, message, tab, max_new_tokens, temperature, top_p, repetition_penalty):
        chat = tab.get_chat(self.server)
        text, files = split_message(message)
        view = lambda **kw: self.chat_view(chat, **kw)  # noqa: E731
        try:
            stream = chat.send(text, files, **self.gen(max_new_tokens, temperature, top_p, repetition_penalty))
        except Exception as e:
            yield view(status=self._rejected(chat, e))  # the message stays in the box, to fix and resend
            return
        yield from self._stream(chat, stream, view)

    def regenerate(self, tab, max_new_tokens, temperature, top_p, repetition_penalty):
        chat = tab.get_chat(self.server)
        view = lambda **kw: self.chat_view(chat, **kw)  # noqa: E731
        try:
            stream = chat.regenerate(**self.gen(max_new_tokens, temperature, top_p, repetition_penalty))
        except Exception as e:
            yield view(status=self._rejected(chat, e))
            return
        yield from self._stream(chat, stream, view, clear_textbox=False)

    def undo(self, tab):
        chat = tab.get_chat(self.server)
        chat.wait_idle(10)
        try:
            rnd = chat.undo()
        except RuntimeError as e:
            return self.chat_view(chat, status=status_html("error", _esc(e)))
        note = (f"Removed the last round (“{_esc(rnd.question[:80])}”)." if rnd else "Nothing to undo.")
        return self.chat_view(chat, status=status_html("info", note))

    def clear(self, tab):
        chat = tab.get_chat(self.server)
        chat.wait_idle(10)
        chat.reset()
        return self.chat_view(chat, status="", textbox=self.input_box(False, clear=True))

    def refresh(self, tab):
        """After an answer ends, is stopped or its request is cancelled: show the kept conversation."""
        chat = tab.get_chat(self.server)
        chat.wait_idle(10)
        return self.chat_view(chat, textbox=self.input_box(False))

    def looked(self, on, layer, tab):
        """The "Where it looked" toggle (and layer choice) of the Chat tab: (gallery, note). On, every gallery
        image shows the last answer's attention map over it, captioned with its share; computed now, by one
        extra forward. Off: the plain gallery."""
        chat = tab.get_chat(self.server)
        if not on:
            return gallery_items(chat), ""
        found, note = self._maps_of([chat])
        if found is None:
            return gallery_items(chat), note
        maps, layer = found[0], _layer_choice(layer)
        heat, shares = maps.maps(layer), maps.shares(layer)
        entries = [(p, heat[i], f"Image {i + 1} · {shares[i]:.0%}")
                   for i, p in enumerate(chat.image_paths)]
        return self._draw_maps(chat, entries), looked_note([("", maps)], layer)

    def run_example(self, index, tab, max_new_tokens, temperature, top_p, repetition_penalty):
        """Clear the chat and play one of EXAMPLES round by round."""
        chat = tab.get_chat(self.server)
        chat.wait_idle(10)
        chat.reset()
        view = lambda **kw: self.chat_view(chat, **kw)  # noqa: E731
        gen = self.gen(max_new_tokens, temperature, top_p, repetition_penalty)
        for question, files in EXAMPLES[int(index)][1]:
            try:
                stream = chat.send(question, [os.path.join(EXAMPLES_DIR, f) for f in files], **gen)
            except Exception as e:
                yield view(status=self._rejected(chat, e))
                return
            yield from self._stream(chat, stream, view, clear_textbox=False)
            if chat.status != "done":
                return

    @staticmethod
    def _rejected(chat, e: Exception) -> str:
        from visualchat.session import INPUT_ERRORS

        if not isinstance(e, INPUT_ERRORS + (RuntimeError,)):
            log.exception("request failed")
        chat.status, chat.error = "rejected", str(e)
        return outcome_html(chat)

    # -- Compare tab ---------------------------------------------------------------------------
    def compare_view(self, pair, status: str | None = None, textbox: Any = None) -> tuple:
        """(CA chatbot, MMCA chatbot, gallery, textbox, status) for the Compare tab."""
        import gradio as gr

        ca, mm = pair
        if status is None:
            parts = []
            for name, c in (("CA", ca), ("MMCA", mm)):
                h = outcome_html(c, regenerate=False)
                if h and c.status != "done":
                    parts.append(h.replace(">", f"><b>{name}:</b> ", 1))
            status = "".join(parts)
        return (chat_messages(ca), chat_messages(mm), gallery_items(mm), gr.skip() if textbox is None else textbox,
                status)

    def _compare_missing(self) -> tuple:
        import gradio as gr

        note = self.server.compare.note or "The Compare tab is off."
        return ([], [], [], gr.skip(), status_html("error", _esc(note)))

    def _stream_pair(self, pair, streams, clear_textbox=True) -> Iterator[tuple]:
        """Both models answer the same round; one token each in turn, so both columns stream."""
        view = lambda **kw: self.compare_view(pair, **kw)  # noqa: E731
        throttle = _Throttle()
        live = list(streams)
        try:
            yield view(status="", textbox=self.input_box(True, clear_textbox))
            while live:
                for s in list(live):
                    try:
                        next(s)
                    except StopIteration:
                        live.remove(s)
                    except Exception:  # recorded by its ChatSession (status failed); the other goes on
                        live.remove(s)
                if throttle():
                    yield view(status="")
            yield view(textbox=self.input_box(False))
        finally:
            for s in streams:
                s.close()

    def compare_send(self, message, tab, max_new_tokens, temperature, top_p, repetition_penalty):
        if not self.server.compare.ready:
            yield self._compare_missing()
            return
        pair = tab.get_compare(self.server)
        text, files = split_message(message)
        gen = self.gen(max_new_tokens, temperature, top_p, repetition_penalty)
        streams = []
        try:
            for c in pair:
                streams.append(c.send(text, files, **gen))
        except Exception as e:
            if streams:  # the first accepted it, the second did not: take the first back
                streams[0].close()
                pair[0].undo()
            for c in pair:
                self._rejected(c, e)
            yield self.compare_view(pair, status=outcome_html(pair[1], regenerate=False))
            return
        yield from self._stream_pair(pair, streams)

    def compare_example(self, index, tab, max_new_tokens, temperature, top_p, repetition_penalty):
        if not self.server.compare.ready:
            yield self._compare_missing()
            return
        pair = tab.get_compare(self.server)
        for c in pair:
            c.wait_idle(10)
            c.reset()
        gen = self.gen(max_new_tokens, temperature, top_p, repetition_penalty)
        for question, files in EXAMPLES[int(index)][1]:
            paths = [os.path.join(EXAMPLES_DIR, f) for f in files]
            streams = [c.send(question, paths, **gen) for c in pair]
            yield from self._stream_pair(pair, streams, clear_textbox=False)
            if any(c.status != "done" for c in pair):
                return

    def compare_clear(self, tab):
        if not self.server.compare.ready:
            return self._compare_missing()
        pair = tab.get_compare(self.server)
        for c in pair:
            c.wait_idle(10)
            c.reset()
        return self.compare_view(pair, status="", textbox=self.input_box(False, clear=True))

    def compare_refresh(self, tab):
        if not self.server.compare.ready:
            return self._compare_missing()
        pair = tab.get_compare(self.server)
        for c in pair:
            c.wait_idle(10)
        return self.compare_view(pair, textbox=self.input_box(False))

    def compare_looked(self, on, layer, tab):
        """The Compare tab's "Where it looked": both models' maps of every image side by side, CA then
        MMCA. (gallery, note)."""
        if not self.server.compare.ready:
            return [], ""
        ca, mm = tab.get_compare(self.server)
        if not on:
            return gallery_items(mm), ""
        found, note = self._maps_of([ca, mm])
        if found is None:
            return gallery_items(mm), note
        layer = _layer_choice(layer)
        entries = []
        heats = [m.maps(layer) for m in found]
        shares = [m.shares(layer) for m in found]
        for i, p in enumerate(mm.image_paths):
            for j, name in enumerate(("CA", "MMCA")):
                entries.append((p, heats[j][i], f"Image {i + 1} · {name} {shares[j][i]:.0%}"))
        return self._draw_maps(mm, entries), looked_note(list(zip(("CA", "MMCA"), found)), layer)

    # -- the stateless API ---------------------------------------------------------------------
    def api_generate(self, conversation: list[dict], max_new_tokens: int = 128, temperature: float = 0.0,
                     top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int | None = None,
                     model: str = "chat", request: "gr.Request" = None) -> Iterator[str]:
        """Answer the last round of a whole conversation; nothing is kept between calls.

        conversation: a list of rounds, each {"question": str, "images": [...], "answer": str}. Images are
        files (gradio_client.handle_file(path)), data:image/...;base64, URLs or "base64:..." strings; every
        round but the last may carry the answer it got. Images are numbered Image 1..N across the rounds.
        model: "chat" (the Chat tab's model), "ca" or "mmca" (the Compare tab's). Returns the answer (a
        streaming client sees it grow). Every field is checked against the server's limits first."""
        import gradio as gr

        from visualchat.serving import AbandonedError, bounded
        from visualchat.session import INPUT_ERRORS
        from webapp.api import forget_request_inputs, unread_probe, validate_api_request

        limits = self.server.limits
        try:
            model, history, question, images, gen = validate_api_request(
                self.server, conversation, max_new_tokens, temperature, top_p, repetition_penalty, seed, model)
            stream = self.server.stream(model, history, question, images, gen)
        except INPUT_ERRORS as e:
            raise gr.Error(str(e), print_exception=False) from None
        finally:
            forget_request_inputs(request, "generate")  # Gradio's session copy of the request (it can be MBs)
            del conversation
        stream = bounded(stream, limits.answer_seconds, unread_probe(request, limits.unread_seconds))
        text = ""
        try:
            for piece in stream:
                text += piece
                yield text
        except AbandonedError as e:
            log.warning("/generate: %s (nothing read for %g s)", e, limits.unread_seconds)
            raise gr.Error(f"{e} (nothing was read for {limits.unread_seconds:g} s)", print_exception=False) from None
        except INPUT_ERRORS as e:
            raise gr.Error(str(e), print_exception=False) from None
        except Exception as e:
            log.exception("/generate failed")
            raise gr.Error(f"the model failed while answering: {type(e).__name__}: {e}") from None
        finally:
            stream.close()
        yield text.strip()


# ---------------------------------------------------------------------------------------------------
# Layout


def _model_line(server) -> str:
    vc = server.chat
    lm = vc.config.lm
    lm = "SmolLM2-135M-Instruct (embedded)" if lm in ("default", None) else os.path.basename(str(lm).rstrip("/"))
    vision = vc.config.vision.split(":", 1)[0] if ":" in vc.config.vision else vc.config.vision
    ckpt = vc.path
    ckpt = os.path.relpath(ckpt, HERE) if ckpt and ckpt.startswith(HERE) else (ckpt or "none")
    return (f"**Model** {_esc(lm)} + {_esc(vision)} · **checkpoint** `{_esc(ckpt)}` ({vc.config.attention.upper()}, "
            f"K={vc.config.image_tokens} tokens per image, up to {vc.config.max_images} images) · "
            f"**serving** {_esc(server.backend)}")


def _layer_choices(vc) -> list[tuple[str, int]]:
    n = getattr(vc.model.lm.config, "num_hidden_layers", None) or 0
    return [("all (mean)", -1)] + [(f"layer {i + 1}", i) for i in range(int(n))]


def build_demo(model, compare: tuple | None = None, *, max_new_tokens: int = 128, concurrency: int = 1,
               compare_missing: list[str] | None = None, stateless: bool | None = None):
    """The Gradio app. ``model`` is a loaded ``serving.Server`` or a ``VisualChat`` (then ``compare``
    may give the (CA, MMCA) pair). The handlers are at ``demo.ui`` (a ChatUI)."""
    import gradio as gr

    from visualchat.serving import Server
    from webapp.state import TabState

    if isinstance(model, Server):
        server = model
    else:
        kw = {} if compare is not None or compare_missing is None else {"compare_missing": compare_missing}
        server = Server.from_models(model, compare=compare, stateless=stateless, **kw)
        if compare is None and compare_missing is None:
            server.compare.note = ("The Compare tab needs a CA-trained and an MMCA-trained checkpoint; none were "
                                   "given to this app.")
    ui = ChatUI(server, max_new_tokens)
    # the chat fills the window height, leaving room for the header, the input box and the buttons
    below = 370 + (55 if server.chat.untrained else 0)
    queue_kw = dict(concurrency_id="model", concurrency_limit=max(1, int(concurrency)))
    example_samples = [[t] for t, _ in EXAMPLES]
    layer_choices = _layer_choices(server.chat)
    compare_layer_choices = _layer_choices(server.compare.mmca) if server.compare.ready else [("all (mean)", -1)]

    with gr.Blocks(title="VisualChat", fill_width=True) as demo:
        tab = gr.State(TabState(), delete_callback=lambda s: s.close())
        with gr.Column(elem_id="vc-header"):
            gr.Markdown("# VisualChat\nAsk about several images over several rounds. The model sees every image as "
                        "**Image 1 … Image N**, numbered in the order they arrive, and reads them with multi-modal "
                        "causal attention (MMCA), as in [DeepSpeed-VisualChat](https://arxiv.org/abs/2309.14327).")
            gr.Markdown(_model_line(server), elem_id="vc-model")
            shapes = trained_on_shapes(server.chat)
            if shapes:
                gr.HTML(status_html("info", SHAPES_NOTE), elem_classes="vc-status", elem_id="vc-knows")
            if server.chat.untrained:
                gr.HTML(status_html("warn", "<b>Untrained projection</b>: no trained checkpoint was found "
                                            "(<code>assets/checkpoints/shapes-mmca</code> is missing), so answers come "
                                            "from the language model alone and ignore the images."),
                        elem_classes="vc-status", elem_id="vc-untrained")

        with gr.Tabs():
            # ---------------------------------------------------------------- Chat
            with gr.Tab("Chat", id="chat"):
                with gr.Row(equal_height=False):
                    with gr.Column(scale=3, min_width=420):
                        chatbot = gr.Chatbot(label="Conversation", height=f"calc(100vh - {below}px)", min_height=260,
                                             elem_id="chatbot",
                                             buttons=["copy"], feedback_options=None,
                                             placeholder=("Click an example on the right, or attach a shapes picture "
                                                          "(like those in assets/examples) with the paperclip and ask "
                                                          "about its colours, counts or positions as Image 1, Image 2, "
                                                          "… Later rounds can bring more images." if shapes else
                                                          "Attach images with the paperclip (or drop them on the box "
                                                          "below), ask about them as Image 1, Image 2, … and press "
                                                          "Enter. Later rounds can bring more images."))
                        status = gr.HTML("", elem_classes="vc-status", elem_id="status")
                        textbox = gr.MultimodalTextbox(
                            placeholder=("e.g. “What color is the star in Image 1?” (attach shapes pictures with the "
                                         "paperclip)" if shapes else
                                         "Ask about Image 1, Image 2, … (attach images with the paperclip)"),
                            file_count="multiple", sources=["upload"], show_label=False,
                            submit_btn=True, elem_id="message", max_plain_text_length=4000)
                        with gr.Row():
                            stop_btn = gr.Button("Stop", variant="secondary", size="sm", elem_id="stop",
                                                 interactive=False)
                            regen_btn = gr.Button("Regenerate", size="sm", elem_id="regenerate")
                            undo_btn = gr.Button("Undo", size="sm", elem_id="undo")
                            clear_btn = gr.Button("Clear", size="sm", elem_id="clear")
                    with gr.Column(scale=2, min_width=300):
                        gallery = gr.Gallery(label="Images in this conversation (as the model numbers them)", columns=4,
                                             height=240, object_fit="contain", fit_columns=False, elem_id="gallery",
                                             buttons=["fullscreen"], interactive=False)
                        with gr.Row(equal_height=True):
                            looked = gr.Checkbox(label="Where it looked", value=False, elem_id="looked", scale=1,
                                                 info="overlay the last answer's attention on every image")
                            layer = gr.Dropdown(choices=layer_choices, value=-1, label="Layers", elem_id="looked-layer",
                                                scale=1, min_width=120)
                        looked_status = gr.HTML("", elem_classes="vc-status", elem_id="looked-note")
                        examples = gr.Dataset(label=("Examples on shapes scenes like those the model learned (click one "
                                                     "to play the whole conversation)" if shapes else
                                                     "Examples (click one to play the whole conversation)"),
                                              components=[gr.Textbox(visible=False)], samples=example_samples,
                                              type="index", layout="table", elem_id="examples")
                        with gr.Accordion("Generation settings", open=False):
                            max_tokens = gr.Slider(1, 1024, value=max_new_tokens, step=1, label="Max new tokens",
                                                   elem_id="max-new-tokens")
                            temperature = gr.Slider(0, 2, value=0, step=0.05, label="Temperature (0 = greedy)")
                            top_p = gr.Slider(0.05, 1, value=1, step=0.05, label="Top-p")
                            rep = gr.Slider(1, 2, value=1, step=0.05, label="Repetition penalty (1 = off)")
                        with gr.Accordion("Prompt as the model sees it", open=False, elem_id="prompt-panel"):
                            prompt = gr.Textbox(show_label=False, lines=10, max_lines=24, interactive=False,
                                                buttons=["copy"], elem_id="prompt",
                                                placeholder="The Figure-3 prompt appears here; each image is "
                                                            "[Image i: K tokens].")
                settings = [max_tokens, temperature, top_p, rep]
                outs = [chatbot, gallery, prompt, textbox, status]
                # Stop turns on (enabled, red) first, then the answer runs; it turns off after the answer ends
                busy = dict(fn=ui.stop_busy, inputs=None, outputs=[stop_btn], api_visibility="private", queue=False,
                            show_progress="hidden")
                send_evt = textbox.submit(**busy).then(ui.send, [textbox, tab, *settings], outs, api_name="chat",
                                                       api_visibility="undocumented", show_progress="hidden",
                                                       **queue_kw)
                regen_evt = regen_btn.click(**busy).then(ui.regenerate, [tab, *settings], outs, api_name="regenerate",
                                                         api_visibility="undocumented", show_progress="hidden",
                                                         **queue_kw)
                ex_evt = examples.click(**busy).then(ui.run_example, [examples, tab, *settings], outs,
                                                     api_name="example", api_visibility="undocumented",
                                                     show_progress="hidden", **queue_kw)
                model_events = [send_evt, regen_evt, ex_evt]
                textbox.stop(None, None, None, cancels=model_events, api_visibility="private")
                looked_io = dict(fn=ui.looked, inputs=[looked, layer, tab], outputs=[gallery, looked_status],
                                 api_visibility="private", show_progress="hidden", **queue_kw)
                for evt in model_events:
                    (evt.then(ui.refresh, [tab], outs, api_visibility="private", queue=False, show_progress="hidden")
                     .then(ui.stop_idle, None, [stop_btn], api_visibility="private", queue=False,
                           show_progress="hidden")
                     .then(**looked_io))
                stop_btn.click(None, None, None, cancels=model_events, api_visibility="private")
                undo_btn.click(ui.undo, [tab], outs, api_name="undo", api_visibility="undocumented",
                               cancels=model_events, queue=False, show_progress="hidden").then(**looked_io)
                for clear_trigger, name in ((clear_btn.click, "clear"), (chatbot.clear, None)):
                    # the chat panel's trash icon does what Clear does: gallery, prompt and model state too
                    clear_trigger(ui.clear, [tab], outs, api_name=name, api_visibility="undocumented" if name else
                                  "private", cancels=model_events, queue=False,
                                  show_progress="hidden").then(**looked_io)
                looked.change(**looked_io)
                layer.change(**looked_io)

            # ---------------------------------------------------------------- Compare
            with gr.Tab("Compare CA vs MMCA", id="compare"):
                cinfo = server.compare
                if cinfo.ready:
                    gr.Markdown("The same conversation goes to a model trained with plain **causal attention (CA)** "
                                "and one trained with **multi-modal causal attention (MMCA)**. Both share the frozen "
                                "vision encoder and language model in memory; only the projection, the embedding and "
                                "the attention mode differ. Type once; each answers in its own column.")
                else:
                    gr.HTML(status_html("warn", "<b>This comparison is not available yet.</b> " + _esc(cinfo.note)),
                            elem_classes="vc-status", elem_id="compare-missing")
                ready = cinfo.ready
                with gr.Row(equal_height=True):
                    ca_label = f"CA · {os.path.basename(cinfo.ca_path or '') or 'causal attention'}"
                    mm_label = f"MMCA · {os.path.basename(cinfo.mmca_path or '') or 'multi-modal causal attention'}"
                    chat_ca = gr.Chatbot(label=ca_label, height=f"calc(100vh - {below + 60}px)",
                                         min_height=240, elem_id="chat-ca", feedback_options=None)
                    chat_mm = gr.Chatbot(label=mm_label, height=f"calc(100vh - {below + 60}px)",
                                         min_height=240, elem_id="chat-mmca", feedback_options=None)
                cstatus = gr.HTML("", elem_classes="vc-status", elem_id="compare-status")
                with gr.Row(equal_height=False):
                    with gr.Column(scale=3):
                        ctextbox = gr.MultimodalTextbox(
                            placeholder="One question for both models (attach images with the paperclip)" if ready else
                            "Unavailable: see the note above", file_count="multiple",
                            sources=["upload"], show_label=False, interactive=ready, elem_id="compare-message")
                        with gr.Row():
                            cstop = gr.Button("Stop", variant="secondary", size="sm", elem_id="compare-stop",
                                              interactive=False)
                            cclear = gr.Button("Clear", size="sm", elem_id="compare-clear")
                        cexamples = gr.Dataset(label="Examples", components=[gr.Textbox(visible=False)],
                                               samples=example_samples, type="index", layout="table",
                                               elem_id="compare-examples")
                    with gr.Column(scale=2):
                        cgallery = gr.Gallery(label="Images in this conversation", columns=2, height=420,
                                              fit_columns=False, object_fit="contain", interactive=False,
                                              elem_id="compare-gallery")
                        with gr.Row(equal_height=True):
                            clooked = gr.Checkbox(label="Where it looked", value=False, elem_id="compare-looked",
                                                  scale=1, interactive=ready,
                                                  info="both models' attention maps side by side: CA, then MMCA")
                            clayer = gr.Dropdown(choices=compare_layer_choices, value=-1, label="Layers",
                                                 elem_id="compare-looked-layer", scale=1, min_width=120)
                        clooked_status = gr.HTML("", elem_classes="vc-status", elem_id="compare-looked-note")
                couts = [chat_ca, chat_mm, cgallery, ctextbox, cstatus]
                cbusy = dict(busy, outputs=[cstop])
                c_evt = ctextbox.submit(**cbusy).then(ui.compare_send, [ctextbox, tab, *settings], couts,
                                                      api_name="compare", api_visibility="undocumented",
                                                      show_progress="hidden", **queue_kw)
                cex_evt = cexamples.click(**cbusy).then(ui.compare_example, [cexamples, tab, *settings], couts,
                                                        api_name="compare_example", api_visibility="undocumented",
                                                        show_progress="hidden", **queue_kw)
                ctextbox.stop(None, None, None, cancels=[c_evt, cex_evt], api_visibility="private")
                clooked_io = dict(fn=ui.compare_looked, inputs=[clooked, clayer, tab],
                                  outputs=[cgallery, clooked_status], api_visibility="private",
                                  show_progress="hidden", **queue_kw)
                for evt in (c_evt, cex_evt):
                    (evt.then(ui.compare_refresh, [tab], couts, api_visibility="private", queue=False,
                              show_progress="hidden")
                     .then(ui.stop_idle, None, [cstop], api_visibility="private", queue=False, show_progress="hidden")
                     .then(**clooked_io))
                cstop.click(None, None, None, cancels=[c_evt, cex_evt], api_visibility="private")
                for clear_trigger, name in ((cclear.click, "compare_clear"), (chat_ca.clear, None), (chat_mm.clear, None)):
                    clear_trigger(ui.compare_clear, [tab], couts, api_name=name,
                                  api_visibility="undocumented" if name else "private", cancels=[c_evt, cex_evt],
                                  queue=False, show_progress="hidden").then(**clooked_io)
                clooked.change(**clooked_io)
                clayer.change(**clooked_io)

        # the request (for noticing an answer nobody reads) is injected by Gradio from this type hint
        ChatUI.api_generate.__annotations__["request"] = gr.Request
        gr.api(ui.api_generate, api_name="generate", **queue_kw)
        with gr.Accordion("Use it from Python (gradio_client)", open=False):
            gr.Markdown(API_HELP)

    demo.ui = ui
    demo.serving = server  # (demo.server is the web server once launched)
    return demo


API_HELP = """
The stateless endpoint `/generate` takes a whole conversation and returns the answer to its last round:

```python
from gradio_client import Client, handle_file

client = Client("http://127.0.0.1:7860/")
answer = client.predict(
    conversation=[
        {"question": "How many squares are in Image 1?", "images": [handle_file("shapes_4.png")],
         "answer": "There are 2 squares."},                  # earlier rounds may carry their answers
        {"question": "Which image has more triangles, Image 1 or Image 2?",
         "images": [handle_file("shapes_5.png")]},          # this one becomes Image 2
    ],
    max_new_tokens=64, temperature=0.0, top_p=1.0, repetition_penalty=1.0,
    api_name="/generate")
```

Images may also be `data:image/png;base64,...` URLs. `model="ca"` or `"mmca"` asks the Compare tab's models.
"""


def launch(demo, host: str = "127.0.0.1", port: int = 7860, queue_size: int = 16, max_file_size="25mb",
           share: bool = False, **kw):
    """Queue (bounded: a full queue refuses with a message) and serve."""
    demo.queue(max_size=queue_size, default_concurrency_limit=1)
    # show_error: errors Gradio raises before a handler runs (a file path it refuses to take) reach the
    # client as their message instead of {"error": null}; the handlers turn their own errors into gr.Error
    kw.setdefault("show_error", True)
    serving = getattr(demo, "serving", None)
    if serving is not None:  # refuse an oversized API body before Gradio reads it into memory
        from starlette.middleware import Middleware

        from webapp.api import RequestSizeLimit

        app_kwargs = dict(kw.pop("app_kwargs", None) or {})
        app_kwargs["middleware"] = [*app_kwargs.get("middleware", []),
                                    Middleware(RequestSizeLimit, max_bytes=serving.limits.max_request_bytes)]
        kw["app_kwargs"] = app_kwargs
    return demo.launch(server_name=host, server_port=port, css=CSS, max_file_size=max_file_size, share=share,
                       footer_links=["api", "gradio", "settings"], **kw)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    # SIGINT (Ctrl-C, kill -INT) and SIGTERM (docker stop, Spaces restarts) both shut down cleanly, also
    # when the app was started in the background of a script, where SIGINT arrives ignored
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    args = parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    t0 = time.time()
    from visualchat.serving import Server

    server = Server.load(serve_options(args))
    log.info("models loaded in %.1f s; serving with %s", time.time() - t0, server.backend)
    if server.rank != 0:
        try:
            server.follow()  # until rank 0 stops
        except KeyboardInterrupt:  # Ctrl-C reaches every rank of the launcher
            pass
        return 0
    demo = build_demo(server, max_new_tokens=args.max_new_tokens, concurrency=args.concurrency)
    log.info("starting the web server on http://%s:%d", args.host, args.port)
    try:
        launch(demo, host=args.host, port=args.port, queue_size=args.queue_size, max_file_size=args.max_file_size,
               share=args.share, prevent_thread_lock=True)
        while demo.is_running:
            time.sleep(0.1)
    except KeyboardInterrupt:
        pass
    finally:
        # our own Ctrl-C handling: Blocks.close() ends the queue and the clients' heartbeat streams before it
        # stops the HTTP server, so the process exits at once even with browsers or clients connected
        # (gradio's own handler stops only the server, which then waits seconds for those streams)
        demo.close(verbose=False)
        if server.lockstep is not None:
            server.lockstep.stop()  # let the other ranks return
    return 0


if __name__ == "__main__":
    sys.exit(main())
