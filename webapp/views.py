"""Rendering a tab's conversations into Gradio component values: chat messages with their images, the
gallery, the status line (what the last request did), the "Where it looked" note, the input box and the
Stop button."""
from __future__ import annotations

import html
import time


def esc(text: str) -> str:
    return html.escape(str(text))


def status_html(kind: str, text: str) -> str:
    """The status line under the chat: kind error | warn | info, or "" for nothing."""
    return f'<div class="vc-{kind}">{text}</div>' if text else ""


GENERATING = "*(generating…)*"


def chat_messages(chat) -> list[dict]:
    """A served conversation as Chatbot messages: each user turn shows the images it brought (captioned with the
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
        if r.finish_reason in FINISH_NOTES:
            answer += f"\n\n*({FINISH_NOTES[r.finish_reason]})*"
        msgs.append({"role": "assistant", "content": answer})
    return msgs


#: The note under an answer that did not end by itself (finish reason ``stop``: no note; a refused request
#: adds no round, its reason is in the status line).
FINISH_NOTES = {
    "length": "cut off at the token limit: raise Max new tokens in Generation settings for longer answers",
    "stopped": "stopped before the end",
    "timeout": "stopped at this server's time limit per answer",
}


def gallery_items(chat) -> list[tuple[str, str]]:
    return [(p, f"Image {i}") for i, p in enumerate(chat.image_paths, 1)]


def stats_text(chat, short: bool = False) -> str:
    """The last answer's timing: tokens, seconds, tokens/s, time to first token (``short``: the last two)."""
    s = chat.last_stats or {}
    if not s.get("new_tokens"):
        return ""
    speed = f"{s.get('tokens_per_s', 0):.1f} tokens/s · first token after {s.get('ttft_s', 0):.2f} s"
    if short:
        return speed
    return (f"{s['new_tokens']} tokens in {s.get('total_s', 0):.1f} s · {speed} · "
            f"{s.get('prefill_tokens', 0)} prompt tokens computed")


def outcome_html(chat, regenerate: bool = True) -> str:
    """What the last request of this chat did, for the status line. ``regenerate``: the tab has a
    Regenerate button to point to (the Compare tab does not)."""
    if chat.status == "stopped":  # chat.error says why when the server stopped it (its time limit per answer)
        return status_html("warn", "Stopped" + (f": {esc(chat.error)}" if chat.error else "") + ". The partial answer is kept; "
                                   + ("Regenerate to try again." if regenerate else "ask again to try again."))
    if chat.status == "failed":
        return status_html("error", f"<b>The model failed while answering</b>: {esc(chat.error)}. What it had "
                                    "written so far is kept, and the app keeps serving.")
    if chat.status == "rejected":
        return status_html("error", f"<b>Not sent</b>: {esc(chat.error)}. The conversation is unchanged.")
    if chat.status == "done":
        if regenerate and greedy_regenerate(chat):
            return status_html("warn", f"{esc(stats_text(chat))}<br>{SAME_ANSWER_NOTE}")
        return status_html("info", esc(stats_text(chat)))
    return ""


#: Sampling's temperature for "Sample a different answer" when the slider is at 0.
SAMPLE_TEMPERATURE = 0.7
SAME_ANSWER_NOTE = ("<b>Same answer:</b> at temperature 0 the model always picks its most likely next word, so "
                    "Regenerate gives this same answer every time. Press <b>Sample a different answer</b> to draw "
                    f"one at temperature {SAMPLE_TEMPERATURE:g}, or raise Temperature in Generation settings.")


def greedy_regenerate(chat) -> bool:
    """Whether the chat's last answer was a Regenerate at temperature 0 (which repeats the answer)."""
    kind, gen = chat.last_request
    return kind == "regenerate" and not gen.get("temperature")


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


def layer_choice(layer) -> int | None:
    """The layer dropdown's value: None (mean of all layers) or a 0-based layer."""
    return None if layer in (None, "", -1, "-1") else int(layer)


def looked_note(named_maps: list, layer: int | None) -> str:
    """The line under a gallery that shows attention maps: what is averaged, and per model what the
    share means (CA: part of one softmax over all tokens; MMCA: a softmax of its own)."""
    m0 = named_maps[0][1]
    rows, cols = m0.grid
    which = f"the mean of all {m0.n_layers} layers" if layer is None else f"layer {layer + 1} of {m0.n_layers}"
    text = (f"<b>Where it looked</b>: the last answer's attention over each image's {m0.image_tokens} tokens "
            f"({rows}×{cols}), averaged over the answer's tokens, all heads and {which}, drawn beside each image; "
            "brighter = more. Outlined on both: the fewest cells that hold half of it. "
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


class Throttle:
    """True at most every ``every`` seconds (and on the first call): limits UI updates while streaming."""

    def __init__(self, every: float = 0.08):
        self.every, self.last = every, 0.0

    def __call__(self) -> bool:
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            return True
        return False



def input_box(busy: bool, clear: bool = False, value: dict | None = None):
    """The input box while an answer is generated (a stop button instead of send, as in most chat
    apps; cleared when the message was taken) or idle again (``value``: what to put in it)."""
    import gradio as gr

    kw = {"value": dict(EMPTY_MESSAGE)} if clear else {"value": value} if value is not None else {}
    return gr.MultimodalTextbox(submit_btn=not busy, stop_btn=busy, **kw)


def stop_button(busy: bool):
    """Stop is enabled and red only while an answer runs."""
    import gradio as gr

    return gr.Button(interactive=busy, variant="stop" if busy else "secondary")
