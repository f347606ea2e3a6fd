"""One chat panel over N models, and its event handlers: the Chat tab is a panel with one model, the
Compare tab the same panel with two (CA and MMCA) answering the same rounds side by side.

A handler takes the component values (and the browser tab's :class:`~webapp.state.TabState`) and
returns, or yields while streaming, the panel's output values: one chatbot per model, the gallery, the
prompt (a one-model panel only), the input box and the status line. Tests call them without a browser."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from visualchat.assets import ASSETS_DIR
from visualchat.session import INPUT_ERRORS

from .refusal import log_refusal
from .views import (SAMPLE_TEMPERATURE, Throttle, chat_messages, esc, gallery_items, greedy_regenerate, input_box,
                    layer_choice, looked_note, outcome_html, split_message, stats_text, status_html)

log = logging.getLogger("visualchat.app")

EXAMPLES_DIR = os.path.join(ASSETS_DIR, "examples")

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


def generation(max_new_tokens, temperature, top_p, repetition_penalty, seed=None) -> dict:
    """The generation settings' slider values as Session keyword arguments."""
    return dict(max_new_tokens=int(max_new_tokens), temperature=float(temperature), top_p=float(top_p),
                repetition_penalty=float(repetition_penalty), seed=None if seed in (None, "") else int(seed))


@dataclass(frozen=True)
class PanelSpec:
    """Which models a panel shows and how it is named."""

    key: str  # the TabState slot: "chat" | "compare"
    models: tuple[str, ...]  # the server's model names, one chatbot each
    labels: tuple[str, ...]  # each model's name in notes and captions ("" for a lone model)


CHAT = PanelSpec("chat", ("chat",), ("",))
COMPARE = PanelSpec("compare", ("ca", "mmca"), ("CA", "MMCA"))


class Panel:
    """A panel's handlers over its models' conversations (:class:`~visualchat.served.ServedConversation`).
    Every model answers every round; with several, one token each in turn so that all columns stream."""

    def __init__(self, server, spec: PanelSpec):
        self.server, self.spec = server, spec
        self.single = len(spec.models) == 1

    @property
    def ready(self) -> bool:
        """Whether the server has this panel's models (the Compare pair may be missing)."""
        return all(name in self.server.models for name in self.spec.models)

    def chats(self, tab) -> list:
        return tab.chats(self.server, self.spec.key, self.spec.models)

    # -- output values -------------------------------------------------------------------------
    def view(self, chats, status: str | None = None, textbox: Any = None) -> tuple:
        """(one chatbot per model, gallery, [prompt: one model only], textbox, status)."""
        import gradio as gr

        out = [chat_messages(c) for c in chats] + [gallery_items(chats[-1])]
        if self.single:
            out.append(chats[0].prompt_text())
        return (*out, gr.skip() if textbox is None else textbox, self.status(chats) if status is None else status)

    def status(self, chats) -> str:
        """What the last request did: a lone model's outcome (with its stats); with several, each model's
        outcome, named: its speed when it answered, else what happened (there is no Regenerate button to
        point to)."""
        if self.single:
            return outcome_html(chats[0])
        parts = []
        for label, c in zip(self.spec.labels, chats):
            h = (status_html("info", esc(stats_text(c, short=True))) if c.status == "done" else
                 outcome_html(c, regenerate=False))
            if h:
                parts.append(h.replace(">", f"><b>{label}:</b> ", 1))
        return "".join(parts)

    def missing(self) -> tuple:
        """The output values of a panel whose models are not loaded: the server's note why."""
        import gradio as gr

        note = self.server.compare.note or "This panel's models are not loaded."
        empty = [[] for _ in self.spec.models] + [[]] + ([""] if self.single else [])
        return (*empty, gr.skip(), status_html("error", esc(note)))

    # -- answering -----------------------------------------------------------------------------
    def _answer(self, chats, start: Callable, clear_textbox: bool = True, take_back: bool = False) -> Iterator[tuple]:
        """``start(chat)`` begins each model's answer; all stream together. A refused start (bad input)
        shows why, after taking back (``take_back``: undoing) the rounds that the models before it took."""
        streams = []
        try:
            for c in chats:
                streams.append(start(c))
        except Exception as e:
            for c, s in zip(chats, streams):
                s.close()
                if take_back:
                    c.undo()
            self._rejected(chats, e)
            yield self.view(chats, status=outcome_html(chats[-1]))  # the message stays in the box, to fix and resend
            return
        yield from self._stream(chats, streams, clear_textbox)

    def _stream(self, chats, streams, clear_textbox: bool = True) -> Iterator[tuple]:
        """Yield views while the answers generate (throttled), then the final one. Closing this generator
        (Stop, a cancelled request) closes the streams, which keep their partial answers."""
        view = lambda **kw: self.view(chats, **kw)  # noqa: E731
        throttle = Throttle()
        live = list(streams)
        try:
            yield view(status="", textbox=input_box(True, clear_textbox))
            while live:
                for s in list(live):
                    try:
                        next(s)
                    except StopIteration:
                        live.remove(s)
                    except Exception:  # recorded by its conversation (status failed); the others go on
                        live.remove(s)
                if throttle():
                    yield view(status="")
            yield view(textbox=input_box(False))
        finally:
            for s in streams:
                s.close()

    def _rejected(self, chats, e: Exception) -> None:
        """The request was refused before any model work (bad input, or the chat still busy): one log line."""
        if not isinstance(e, INPUT_ERRORS + (RuntimeError,)):
            log.exception("request failed")
        else:
            log_refusal(f"the {self.spec.key} tab", e)
        for chat in chats:
            chat.refused(e)

    # -- handlers ------------------------------------------------------------------------------
    def send(self, message, tab, max_new_tokens, temperature, top_p, repetition_penalty):
        if not self.ready:
            yield self.missing()
            return
        text, files = split_message(message)
        gen = generation(max_new_tokens, temperature, top_p, repetition_penalty)
        yield from self._answer(self.chats(tab), lambda c: c.send(text, files, **gen), take_back=True)

    def regenerate(self, tab, max_new_tokens, temperature, top_p, repetition_penalty):
        if not self.ready:
            yield self.missing()
            return
        gen = generation(max_new_tokens, temperature, top_p, repetition_penalty)
        yield from self._answer(self.chats(tab), lambda c: c.regenerate(**gen), clear_textbox=False)

    def sample(self, tab, max_new_tokens, temperature, top_p, repetition_penalty):
        """"Sample a different answer": Regenerate with sampling (the Temperature slider's value, or
        SAMPLE_TEMPERATURE when it is at 0, where Regenerate would repeat the answer)."""
        temperature = float(temperature) or SAMPLE_TEMPERATURE
        yield from self.regenerate(tab, max_new_tokens, temperature, top_p, repetition_penalty)

    def sample_offer(self, tab):
        """The "Sample a different answer" button: shown after a Regenerate at temperature 0."""
        import gradio as gr

        return gr.Button(visible=self.ready and greedy_regenerate(self.chats(tab)[0]))

    def run_example(self, index, tab, max_new_tokens, temperature, top_p, repetition_penalty):
        """Clear the panel and play one of EXAMPLES round by round."""
        if not self.ready:
            yield self.missing()
            return
        chats = self.chats(tab)
        for c in chats:
            c.wait_idle(10)
            c.reset()
        gen = generation(max_new_tokens, temperature, top_p, repetition_penalty)
        for question, files in EXAMPLES[int(index)][1]:
            paths = [os.path.join(EXAMPLES_DIR, f) for f in files]
            yield from self._answer(chats, lambda c: c.send(question, paths, **gen), clear_textbox=False,
                                    take_back=True)
            if any(c.status != "done" for c in chats):
                return

    def undo(self, tab):
        if not self.ready:
            return self.missing()
        chats = self.chats(tab)
        for c in chats:
            c.wait_idle(10)
        try:
            removed = [c.undo() for c in chats]
        except RuntimeError as e:
            return self.view(chats, status=status_html("error", esc(e)))
        rnd = removed[-1]
        if rnd is None:
            return self.view(chats, status=status_html("info", "Nothing to undo."))
        note = (f"Removed the last round; its question{' and images are' if rnd.paths else ' is'} back in the "
                "input box, to edit and send again.")
        return self.view(chats, status=status_html("info", note),
                         textbox=input_box(False, value={"text": rnd.question, "files": list(rnd.paths)}))

    def clear(self, tab):
        if not self.ready:
            return self.missing()
        chats = self.chats(tab)
        for c in chats:
            c.wait_idle(10)
            c.reset()
        return self.view(chats, status="", textbox=input_box(False, clear=True))

    def refresh(self, tab):
        """After an answer ends, is stopped or its request is cancelled: show the kept conversation."""
        if not self.ready:
            return self.missing()
        chats = self.chats(tab)
        for c in chats:
            c.wait_idle(10)
        return self.view(chats, textbox=input_box(False))

    def looked(self, on, layer, tab):
        """The "Where it looked" toggle (and layer choice): (gallery, note). On, every gallery image shows
        the last answer's attention map over it (each model's, side by side), captioned with its share;
        computed now, by one extra forward per model. Off: the plain gallery."""
        if not self.ready:
            return [], ""
        chats = self.chats(tab)
        shown = chats[-1]
        if not on:
            return gallery_items(shown), ""
        found, note = self._maps_of(chats)
        if found is None:
            return gallery_items(shown), note
        layer = layer_choice(layer)
        heats = [m.maps(layer) for m in found]
        shares = [m.shares(layer) for m in found]
        entries = []
        for i, p in enumerate(shown.image_paths):
            for j, label in enumerate(self.spec.labels):
                entries.append((p, heats[j][i], f"Image {i + 1} · {label + ' ' if label else ''}{shares[j][i]:.0%}"))
        return self._draw_maps(shown, entries), looked_note(list(zip(self.spec.labels, found)), layer)

    @staticmethod
    def _maps_of(chats) -> tuple[list | None, str]:
        """Each chat's attention maps, or (None, a note saying why there are none)."""
        try:
            return [c.attention_maps() for c in chats], ""
        except ValueError as e:
            return None, status_html("info", f"<b>Where it looked</b>: {esc(e)}.")
        except RuntimeError as e:
            return None, status_html("error", f"<b>Where it looked</b>: {esc(e)}.")

    @staticmethod
    def _draw_maps(owner, entries) -> list[tuple[str, str]]:
        """Gallery items for ``entries`` (source image path, heat map, caption): each image in its own
        colours with its hot cells outlined, its map beside it, saved by ``owner``, the conversation shown
        (replacing its previous ones)."""
        from PIL import Image

        from visualchat.attention_maps import map_beside

        def drawn():
            for src, heat, _ in entries:
                with Image.open(src) as im:
                    yield map_beside(im, heat)
        return list(zip(owner.save_pictures(drawn()), [caption for _, _, caption in entries]))
