"""VisualChat web app: multi-round, multi-image chat, a CA vs MMCA comparison, and a stateless API.

    python app.py                      # the embedded default model on http://127.0.0.1:7860
    deepspeed --num_gpus 2 app.py      # DeepSpeed-Inference AutoTP over 2 ranks (torchrun works too)

This file is the entry point: flags, the page's layout and the launch. The Gradio side's pieces are in
the ``webapp`` package beside it: one chat panel over N models and its handlers (``webapp/panel.py``: the
Chat tab is a panel with one model, Compare the same with two), rendering (``webapp/views.py``), a
browser tab's state (``webapp/state.py``), the /generate API's input (``webapp/api.py``) and refusals
(``webapp/refusal.py``: one log line each, nothing internal in the user's message). Loading lives in
visualchat/server.py, ZeroGPU in visualchat/zerogpu.py, DeepSpeed and the multi-rank lockstep in
visualchat/tensor_parallel.py; a tab's conversation and a /generate request's are both a
visualchat.served.ServedConversation, driving a visualchat.session.Session. The handlers are plain
methods (inputs in, output values out), so tests call them without a browser.
"""
from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no phoning home from a fresh or offline machine
try:  # ZeroGPU wants `spaces` imported before torch touches CUDA; elsewhere it is not installed
    import spaces  # noqa: F401  (imported for its side effects)
except ImportError:
    pass

import argparse
import logging
import signal
import sys
import time
from dataclasses import dataclass, field, fields, replace
from typing import Any, Iterator

from visualchat.session import INPUT_ERRORS
from webapp.panel import CHAT, COMPARE, EXAMPLES, EXAMPLES_DIR, Panel  # noqa: F401 (EXAMPLES_DIR: for scripts)
from webapp.state import TabState
from webapp.views import SHAPES_NOTE, esc, status_html, stop_button, trained_on_shapes

log = logging.getLogger("visualchat.app")

HERE = os.path.dirname(os.path.abspath(__file__))

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
/* the galleries: as tall as their images (up to 8 in the Chat tab's three columns fit a 1280x800 window without
   scrolling), each item as high as its picture (an image with its attention map beside it is twice as wide),
   the caption below the picture instead of over its corner */
#gallery, #gallery .grid-wrap, #compare-gallery, #compare-gallery .grid-wrap {height: auto !important; max-height: none !important;}
#gallery .grid-container, #compare-gallery .grid-container {row-gap: 26px; padding-bottom: 24px; grid-auto-rows: min-content !important;}
#gallery .thumbnail-item, #compare-gallery .thumbnail-item {aspect-ratio: auto; height: auto; overflow: visible;}
#gallery .thumbnail-item img, #compare-gallery .thumbnail-item img {width: 100%; height: auto;}
#gallery .caption-label, #compare-gallery .caption-label {top: calc(100% + 3px); bottom: auto; left: 0; right: 0; max-width: none; text-align: center; background: none; box-shadow: none; padding: 0; color: var(--body-text-color);}
"""


# ---------------------------------------------------------------------------------------------------
# Flags and environment variables: each one a field of ServeOptions (what to load and how), Limits (what one
# request may cost) or AppOptions (the web server), with its help text and variable (visualchat.flags)


def _option(default, help: str, *env: str):
    return field(default=default, metadata={"help": help, "env": env})


@dataclass
class AppOptions:
    """The web server's settings (the models' are :class:`visualchat.server.ServeOptions`, the limits of one
    request :class:`visualchat.limits.Limits`)."""

    host: str = _option("127.0.0.1", "address to listen on (0.0.0.0 for all)", "VISUALCHAT_HOST", "GRADIO_SERVER_NAME")
    port: int = _option(7860, "port", "VISUALCHAT_PORT", "GRADIO_SERVER_PORT")
    queue_size: int = _option(16, "requests that may wait for the model; beyond this a request is refused with a "
                              "'queue is full' message", "VISUALCHAT_QUEUE_SIZE")
    concurrency: int = _option(1, "answers generated at the same time (the rest wait in the queue)",
                               "VISUALCHAT_CONCURRENCY")
    max_new_tokens: int = _option(128, "default of the max-new-tokens slider", "VISUALCHAT_MAX_NEW_TOKENS")
    share: bool = _option(False, "also open a public gradio.live link", "VISUALCHAT_SHARE")
    log_level: str = _option("INFO", "logging level", "VISUALCHAT_LOG_LEVEL")


#: (group, options class, its fields that are flags there), in the order --help lists them
FLAGS = (("model", "serve", ("checkpoint", "lm", "vision", "ca_checkpoint", "mmca_checkpoint", "compare",
                             "trust_remote_code")),
         ("runtime", "serve", ("device", "dtype", "quantization", "deepspeed", "tp_allreduce")),
         ("server", "app", ("host", "port", "queue_size", "concurrency", "max_new_tokens")),
         ("server", "limits", ("max_image_bytes",)),
         ("limits per request (checked before any decoding or model work)", "limits",
          ("max_new_tokens", "max_question_chars", "answer_seconds", "unread_seconds", "max_request_bytes",
           "kv_cache_budget")),
         ("server", "app", ("share", "log_level")))


def parse_args(argv=None) -> argparse.Namespace:
    from visualchat.flags import add_flags, from_env
    from visualchat.limits import Limits
    from visualchat.server import ServeOptions

    # the flags' defaults: the fields' environment variables; the limits' read by Limits.from_env, their one reader
    defaults = {"serve": from_env(ServeOptions), "app": from_env(AppOptions), "limits": Limits.from_env()}
    env_only = ", ".join(f"{f.metadata['env']} ({f.metadata['help']}, default {f.default})"
                         for f in fields(Limits) if "flags" not in f.metadata)
    p = argparse.ArgumentParser(
        prog="python app.py",
        description="VisualChat web app (Gradio): chat about several images over several rounds, compare a "
                    "CA-trained with an MMCA-trained model, and a stateless /generate API. Every flag can also "
                    "be set by the environment variable in brackets (handy on Hugging Face Spaces).",
        epilog=f"Also read from the environment: {env_only}, "
               "VISUALCHAT_CACHE (where the converted default LM is cached, default ~/.cache/visualchat), "
               "VISUALCHAT_GPU_DURATION (ZeroGPU seconds per call, default 120). Multi-rank: start with "
               "`deepspeed --num_gpus N app.py` or `torchrun --nproc_per_node N app.py`; rank 0 serves the UI.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    groups = {}
    for title, options, names in FLAGS:
        if title not in groups:
            groups[title] = p.add_argument_group(title)
        add_flags(groups[title], defaults[options], names)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    return p.parse_args(argv)


def serve_options(args: argparse.Namespace):
    """The :class:`visualchat.server.ServeOptions` the flags give, its limits included (those without a flag
    from the environment)."""
    from visualchat.flags import values
    from visualchat.limits import Limits
    from visualchat.server import ServeOptions

    return ServeOptions(**values(args, ServeOptions), limits=replace(Limits.from_env(), **values(args, Limits)))


# ---------------------------------------------------------------------------------------------------
# Event handlers: one Panel per tab (webapp/panel.py), the Stop button, the stateless API


class ChatUI:
    """The app's event handlers: ``ui.chat`` (the Chat tab, a panel with one model) and ``ui.compare``
    (the Compare tab, the same panel with two) hold the chat handlers (send, regenerate, run_example,
    undo, clear, refresh, looked); here are the Stop button's and the stateless ``/generate`` API's."""

    def __init__(self, server, max_new_tokens: int = 128):
        self.server = server
        self.max_new_tokens = max_new_tokens
        self.chat = Panel(server, CHAT)
        self.compare = Panel(server, COMPARE)

    def stop_busy(self):
        return stop_button(True)

    def stop_idle(self):
        return stop_button(False)

    def api_generate(self, conversation: list[dict], max_new_tokens: int = 128, temperature: float = 0.0,
                     top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int | None = None,
                     model: str = "chat", request: "gr.Request" = None) -> Iterator[dict]:
        """Answer the last round of a whole conversation; nothing is kept between calls.

        conversation: a list of rounds, each {"question": str, "images": [...], "answer": str}. Images are
        files uploaded to this server (gradio_client.handle_file(path) uploads a local file), or the image
        itself inline as a "data:image/png;base64,..." string (also image/jpeg, gif, webp, bmp) or a
        "base64:..." string; web URLs and server paths are refused. Every round but the last may carry the
        answer it got. Images are numbered Image 1..N across the rounds. model: "chat" (the Chat tab's
        model), "ca" or "mmca" (the Compare tab's). Returns {"answer": str, "finish_reason": str}: why the
        answer ended, "stop" (the model ended it), "length" (it reached max_new_tokens), "timeout" (the
        server's time limit per answer; the answer so far is kept) or "stopped" (cancelled); a streaming
        client sees the answer grow with finish_reason null until the end. A request the server refuses
        (checked against its limits before any model work) is an error titled "Refused"."""
        import gradio as gr

        from visualchat.served import AbandonedError, ServedConversation
        from webapp.api import forget_idle_sessions, forget_request_inputs, unread_probe, validate_api_request
        from webapp.refusal import log_refusal

        try:
            model, history, question, images = validate_api_request(self.server, conversation, model)
            chat = ServedConversation.from_history(self.server, model, history,
                                                   unread=unread_probe(request, self.server.limits.unread_seconds))
            stream = chat.send(question, images, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                               repetition_penalty=repetition_penalty, seed=seed)
        except INPUT_ERRORS as e:  # checked by Session.prepare_round (the rounds) and webapp.api (the request)
            log_refusal("/generate", e)
            raise gr.Error(str(e), title="Refused", print_exception=False) from None
        finally:
            forget_request_inputs(request, "generate")  # Gradio's session copy of the request (it can be MBs)
            forget_idle_sessions(request)  # earlier API calls' sessions (each call is a session of its own)
            del conversation
        text = ""
        try:
            for piece in stream:
                text += piece
                yield {"answer": text, "finish_reason": None}
        except AbandonedError as e:  # logged by the conversation
            raise gr.Error(f"{e} (nothing was read for {self.server.limits.unread_seconds:g} s)",
                           print_exception=False) from None
        except Exception:  # logged by the conversation
            raise gr.Error("the model failed while answering; the server keeps serving, so try again",
                           print_exception=False) from None
        finally:
            stream.close()  # a cancelled request ends "stopped"
        yield {"answer": text.strip(), "finish_reason": chat.finish_reason}


# ---------------------------------------------------------------------------------------------------
# Layout: the header, the Chat tab, the Compare tab (built apart), wired to their panel the same way


@dataclass
class PanelView:
    """One panel's components. The Chat tab has a prompt, Regenerate and Undo; Compare has none of them."""

    chatbots: list
    gallery: Any
    textbox: Any
    status: Any
    stop: Any
    clear: Any
    examples: Any
    looked: Any
    layer: Any
    looked_note: Any
    prompt: Any = None
    regenerate: Any = None
    undo: Any = None
    sample: Any = None  # "Sample a different answer", offered after a Regenerate at temperature 0

    @property
    def outputs(self) -> list:
        """The components a handler of the panel returns, in :meth:`webapp.panel.Panel.view`'s order."""
        return [*self.chatbots, self.gallery, *([self.prompt] if self.prompt is not None else []), self.textbox,
                self.status]


#: The API names of each panel's events (the Chat tab's are unprefixed).
API_NAMES = {"chat": {"send": "chat", "regenerate": "regenerate", "example": "example", "undo": "undo",
                      "clear": "clear"},
             "compare": {"send": "compare", "example": "compare_example", "clear": "compare_clear"}}


def _names(vc) -> tuple[str, str, str]:
    """(language model, vision encoder, checkpoint) of a loaded model, as the page names them."""
    lm = vc.config.lm
    lm = "SmolLM2-135M-Instruct" if lm in ("default", None) else os.path.basename(str(lm).rstrip("/"))
    vision = vc.config.vision.split(":", 1)[0] if ":" in vc.config.vision else vc.config.vision
    vision = {"default": "efficientnet-lite0"}.get(vision, vision)
    ckpt = vc.path
    ckpt = os.path.relpath(ckpt, HERE) if ckpt and ckpt.startswith(HERE) else (ckpt or "none")
    return lm, vision, ckpt


def _model_line(server) -> str:
    """One plain sentence: what is loaded, what it is good at, and how often it is right (the score its
    checkpoint records: ``info.eval``, written by ``python -m visualchat_train.eval --write_info``)."""
    vc = server.chat
    lm, vision, _ = _names(vc)
    what = f"a small language model ({esc(lm)}) that sees images through {esc(vision)}"
    if vc.untrained:
        return (f"**Loaded:** {what}, with no trained image connection: it ignores the images. Its accuracy has "
                "not been measured.")
    score = (vc.config.info or {}).get("eval")
    if trained_on_shapes(vc):
        what += ", trained only on pictures of coloured shapes"
    if isinstance(score, dict) and score.get("task") == "shapes" and score.get("accuracy") is not None:
        right = (f"; it answers **{100 * score['accuracy']:.0f}%** of questions about such pictures exactly right "
                 f"(measured on {score['rounds']} test questions)")
    else:
        right = ". Its accuracy has not been measured"
    return f"**Loaded:** {what}{right}."


def _details(server) -> str:
    """The collapsed Details panel: checkpoint, attention, image tokens, serving backend, training, score."""
    vc = server.chat
    c, info = vc.config, vc.config.info or {}
    lm, vision, ckpt = _names(vc)
    rows = [f"- **Checkpoint** `{esc(ckpt)}`: language model {esc(lm)}, vision encoder {esc(vision)}",
            f"- **Attention** {'MMCA (multi-modal causal attention)' if c.attention == 'mmca' else esc(c.attention)}; "
            f"each image becomes K={c.image_tokens} tokens; up to {c.max_images} images per conversation",
            f"- **Serving** {esc(server.backend)}"]
    if info.get("steps"):
        rows.append(f"- **Training** {info['steps']} steps on {info.get('train_samples', '?')} samples of "
                    f"{esc(', '.join(map(str, info.get('datasets') or [])))}" +
                    (f", {info['wall_time_s'] / 60:.0f} min" if info.get("wall_time_s") else "") +
                    (f" (`{esc(info['command'])}`)" if info.get("command") else ""))
    score = info.get("eval")
    if isinstance(score, dict) and score.get("accuracy") is not None:
        cats = ", ".join(f"{esc(k)} {100 * v:.0f}%" for k, v in (score.get("by_category") or {}).items())
        rows.append(f"- **Measured** {esc(score.get('metric', 'accuracy'))} {100 * score['accuracy']:.1f}% on "
                    f"{score.get('rounds')} rounds of {score.get('conversations')} test conversations"
                    + (f" ({cats})" if cats else "") + f", {esc(score.get('date', ''))}: `{esc(score.get('command', ''))}`")
    elif not vc.untrained:
        rows.append("- **Measured** nothing recorded in this checkpoint; "
                    "`python -m visualchat_train.eval --checkpoint DIR --write_info` scores it and records the result")
    return "\n".join(rows)


def _layer_choices(vc) -> list[tuple[str, int]]:
    n = getattr(vc.model.lm.config, "num_hidden_layers", None) or 0
    return [("all (mean)", -1)] + [(f"layer {i + 1}", i) for i in range(int(n))]


def _server_for(model, compare, compare_missing, stateless):
    """``model`` if it is a loaded Server, else a Server around the given VisualChats."""
    from visualchat.server import Server

    if isinstance(model, Server):
        return model
    kw = {} if compare is not None or compare_missing is None else {"compare_missing": compare_missing}
    server = Server.from_models(model, compare=compare, stateless=stateless, **kw)
    if compare is None and compare_missing is None:
        server.compare.note = ("The Compare tab needs a CA-trained and an MMCA-trained checkpoint; none were "
                               "given to this app.")
    return server


def _header(server) -> None:
    import gradio as gr

    with gr.Column(elem_id="vc-header"):
        gr.Markdown("# VisualChat\nAsk about several images over several rounds. The model sees every image as "
                    "**Image 1 … Image N**, numbered in the order they arrive, and reads them with multi-modal "
                    "causal attention (MMCA), as in [DeepSpeed-VisualChat](https://arxiv.org/abs/2309.14327).")
        gr.Markdown(_model_line(server), elem_id="vc-model")
        if trained_on_shapes(server.chat):
            gr.HTML(status_html("info", SHAPES_NOTE), elem_classes="vc-status", elem_id="vc-knows")
        if server.chat.untrained:
            gr.HTML(status_html("warn", "<b>Untrained projection</b>: no trained checkpoint was found "
                                        "(<code>assets/checkpoints/shapes-mmca</code> is missing), so answers come "
                                        "from the language model alone and ignore the images."),
                    elem_classes="vc-status", elem_id="vc-untrained")
        with gr.Accordion("Details", open=False, elem_id="vc-details"):
            gr.Markdown(_details(server))


def _chat_tab(server, max_new_tokens: int, below: int) -> tuple[PanelView, list]:
    """The Chat tab's components, and the generation settings' sliders (which Compare shares)."""
    import gradio as gr

    shapes = trained_on_shapes(server.chat)
    with gr.Row(equal_height=False):
        with gr.Column(scale=3, min_width=420):
            chatbot = gr.Chatbot(label="Conversation", height=f"calc(100vh - {below}px)", min_height=260,
                                 elem_id="chatbot", buttons=["copy"], feedback_options=None,
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
                stop_btn = gr.Button("Stop", variant="secondary", size="sm", elem_id="stop", interactive=False)
                regen_btn = gr.Button("Regenerate", size="sm", elem_id="regenerate")
                sample_btn = gr.Button("Sample a different answer", size="sm", elem_id="sample", visible=False)
                undo_btn = gr.Button("Undo", size="sm", elem_id="undo")
                clear_btn = gr.Button("Clear", size="sm", elem_id="clear")
        with gr.Column(scale=2, min_width=300):
            gallery = gr.Gallery(label="Images in this conversation (as the model numbers them)", columns=3,
                                 object_fit="contain", fit_columns=False, elem_id="gallery",
                                 buttons=["fullscreen"], interactive=False)
            with gr.Row(equal_height=True):
                looked = gr.Checkbox(label="Where it looked", value=False, elem_id="looked", scale=1,
                                     info="beside every image, the map of the last answer's attention; "
                                          "its hot cells outlined on the image")
                layer = gr.Dropdown(choices=_layer_choices(server.chat), value=-1, label="Layers",
                                    elem_id="looked-layer", scale=1, min_width=120)
            looked_note_ = gr.HTML("", elem_classes="vc-status", elem_id="looked-note")
            examples = gr.Dataset(label=("Examples on shapes scenes like those the model learned (click one "
                                         "to play the whole conversation)" if shapes else
                                         "Examples (click one to play the whole conversation)"),
                                  components=[gr.Textbox(visible=False)], samples=[[t] for t, _ in EXAMPLES],
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
    view = PanelView([chatbot], gallery, textbox, status, stop_btn, clear_btn, examples, looked, layer,
                     looked_note_, prompt=prompt, regenerate=regen_btn, undo=undo_btn, sample=sample_btn)
    return view, [max_tokens, temperature, top_p, rep]


def _compare_tab(server, below: int) -> PanelView:
    """The Compare tab's components: the CA and MMCA chatbots side by side, one input box."""
    import gradio as gr

    cinfo = server.compare
    ready = cinfo.ready
    if ready:
        gr.Markdown("The same conversation goes to a model trained with plain **causal attention (CA)** "
                    "and one trained with **multi-modal causal attention (MMCA)**. Both share the frozen "
                    "vision encoder and language model in memory; only the projection, the embedding and "
                    "the attention mode differ. Type once; each answers in its own column.")
    else:
        gr.HTML(status_html("warn", "<b>This comparison is not available yet.</b> " + esc(cinfo.note)),
                elem_classes="vc-status", elem_id="compare-missing")
    with gr.Row(equal_height=True):
        ca_label = f"CA · {os.path.basename(cinfo.ca_path or '') or 'causal attention'}"
        mm_label = f"MMCA · {os.path.basename(cinfo.mmca_path or '') or 'multi-modal causal attention'}"
        chat_ca = gr.Chatbot(label=ca_label, height=f"calc(100vh - {below + 60}px)",
                             min_height=240, elem_id="chat-ca", feedback_options=None)
        chat_mm = gr.Chatbot(label=mm_label, height=f"calc(100vh - {below + 60}px)",
                             min_height=240, elem_id="chat-mmca", feedback_options=None)
    status = gr.HTML("", elem_classes="vc-status", elem_id="compare-status")
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            textbox = gr.MultimodalTextbox(
                placeholder="One question for both models (attach images with the paperclip)" if ready else
                "Unavailable: see the note above", file_count="multiple",
                sources=["upload"], show_label=False, interactive=ready, elem_id="compare-message")
            with gr.Row():
                stop_btn = gr.Button("Stop", variant="secondary", size="sm", elem_id="compare-stop",
                                     interactive=False)
                clear_btn = gr.Button("Clear", size="sm", elem_id="compare-clear")
            examples = gr.Dataset(label="Examples", components=[gr.Textbox(visible=False)],
                                  samples=[[t] for t, _ in EXAMPLES], type="index", layout="table",
                                  elem_id="compare-examples")
        with gr.Column(scale=2):
            gallery = gr.Gallery(label="Images in this conversation", columns=2,
                                 fit_columns=False, object_fit="contain", interactive=False,
                                 elem_id="compare-gallery")
            with gr.Row(equal_height=True):
                looked = gr.Checkbox(label="Where it looked", value=False, elem_id="compare-looked",
                                     scale=1, interactive=ready,
                                     info="both models' attention maps side by side: CA, then MMCA")
                choices = _layer_choices(cinfo.mmca) if ready else [("all (mean)", -1)]
                layer = gr.Dropdown(choices=choices, value=-1, label="Layers",
                                    elem_id="compare-looked-layer", scale=1, min_width=120)
            looked_note_ = gr.HTML("", elem_classes="vc-status", elem_id="compare-looked-note")
    return PanelView([chat_ca, chat_mm], gallery, textbox, status, stop_btn, clear_btn, examples, looked, layer,
                     looked_note_)


def _wire(ui: ChatUI, panel: Panel, v: PanelView, tab, settings: list, queue_kw: dict) -> None:
    """The same events for every panel: Stop turns on (enabled, red) first, then the answer runs; after it
    the kept conversation is shown, Stop turns off and the attention maps follow. Stop, Undo and Clear
    (and the chatbots' trash icons) cancel a running answer."""
    api = API_NAMES[panel.spec.key]
    outs = v.outputs
    busy = dict(fn=ui.stop_busy, inputs=None, outputs=[v.stop], api_visibility="private", queue=False,
                show_progress="hidden")
    answer = dict(outputs=outs, api_visibility="undocumented", show_progress="hidden", **queue_kw)
    events = [v.textbox.submit(**busy).then(panel.send, [v.textbox, tab, *settings], api_name=api["send"], **answer)]
    if v.regenerate is not None:
        events.append(v.regenerate.click(**busy).then(panel.regenerate, [tab, *settings],
                                                      api_name=api["regenerate"], **answer))
    if v.sample is not None:
        events.append(v.sample.click(**busy).then(panel.sample, [tab, *settings],
                                                  **{**answer, "api_visibility": "private"}))
    events.append(v.examples.click(**busy).then(panel.run_example, [v.examples, tab, *settings],
                                                api_name=api["example"], **answer))
    v.textbox.stop(None, None, None, cancels=events, api_visibility="private")
    looked_io = dict(fn=panel.looked, inputs=[v.looked, v.layer, tab], outputs=[v.gallery, v.looked_note],
                     api_visibility="private", show_progress="hidden", **queue_kw)
    quick = dict(api_visibility="private", queue=False, show_progress="hidden")
    for evt in events:
        after = (evt.then(panel.refresh, [tab], outs, **quick)
                 .then(ui.stop_idle, None, [v.stop], **quick))
        if v.sample is not None:
            after = after.then(panel.sample_offer, [tab], [v.sample], **quick)
        after.then(**looked_io)
    v.stop.click(None, None, None, cancels=events, api_visibility="private")
    if v.undo is not None:
        v.undo.click(panel.undo, [tab], outs, api_name=api["undo"], api_visibility="undocumented", cancels=events,
                     queue=False, show_progress="hidden").then(**looked_io)
    # the chatbots' trash icons do what Clear does: gallery, prompt and model state too
    for trigger, name in ((v.clear.click, api["clear"]), *((c.clear, None) for c in v.chatbots)):
        trigger(panel.clear, [tab], outs, api_name=name, api_visibility="undocumented" if name else "private",
                cancels=events, queue=False, show_progress="hidden").then(**looked_io)
    v.looked.change(**looked_io)
    v.layer.change(**looked_io)


def build_demo(model, compare: tuple | None = None, *, max_new_tokens: int = 128, concurrency: int = 1,
               compare_missing: list[str] | None = None, stateless: bool | None = None):
    """The Gradio app. ``model`` is a loaded ``visualchat.server.Server`` or a ``VisualChat`` (then ``compare``
    may give the (CA, MMCA) pair). The handlers are at ``demo.ui`` (a ChatUI)."""
    import gradio as gr

    server = _server_for(model, compare, compare_missing, stateless)
    ui = ChatUI(server, max_new_tokens)
    # the chat fills the window height, leaving room for the header, the input box and the buttons
    below = 370 + (55 if server.chat.untrained else 0)
    queue_kw = dict(concurrency_id="model", concurrency_limit=max(1, int(concurrency)))
    with gr.Blocks(title="VisualChat", fill_width=True) as demo:
        tab = gr.State(TabState(), delete_callback=lambda s: s.close())
        _header(server)
        with gr.Tabs():
            with gr.Tab("Chat", id="chat"):
                chat_view, settings = _chat_tab(server, max_new_tokens, below)
                _wire(ui, ui.chat, chat_view, tab, settings, queue_kw)
            with gr.Tab("Compare CA vs MMCA", id="compare"):
                _wire(ui, ui.compare, _compare_tab(server, below), tab, settings, queue_kw)
        # the request (for noticing an answer nobody reads) is injected by Gradio from this type hint
        ChatUI.api_generate.__annotations__["request"] = gr.Request
        gr.api(ui.api_generate, api_name="generate", **queue_kw)
        with gr.Accordion("Use it from Python (gradio_client)", open=False, elem_id="api-help"):
            help_md = gr.Markdown(api_help(), elem_id="api-snippet")
        page_url = gr.Textbox(visible=False)
        # the browser says where the page came from (a proxy or a non-default port included)
        demo.load(api_help, [page_url], [help_md], js="() => window.location.origin + window.location.pathname",
                  api_visibility="private", queue=False, show_progress="hidden")

    demo.ui = ui
    demo.serving = server  # (demo.server is the web server once launched)
    return demo


def api_help(url: str = "") -> str:
    """The "Use it from Python" help, its snippet pointing at ``url``: the address the page was loaded from
    (the browser sends it when the page loads), else a placeholder."""
    url = url or "http://YOUR-APP-ADDRESS/"
    url = url if url.endswith("/") else url + "/"
    return f"""
The stateless endpoint `/generate` takes a whole conversation and returns the answer to its last round:

```python
from gradio_client import Client, handle_file

client = Client("{url}")
result = client.predict(
    conversation=[
        {{"question": "How many squares are in Image 1?", "images": [handle_file("shapes_4.png")],
         "answer": "There are 2 squares."}},                  # earlier rounds may carry their answers
        {{"question": "Which image has more triangles, Image 1 or Image 2?",
         "images": [handle_file("shapes_5.png")]}},          # this one becomes Image 2
    ],
    max_new_tokens=64, temperature=0.0, top_p=1.0, repetition_penalty=1.0,
    api_name="/generate")
print(result["answer"], result["finish_reason"])
```

**Images** are accepted in these forms only: a local file sent with `handle_file("path")` (it is uploaded
to this server first), or the image itself inline as a string, `"data:image/png;base64,<base64 data>"`
(also `image/jpeg`, `image/gif`, `image/webp`, `image/bmp`) or `"base64:<base64 data>"`. Web addresses
(`https://...`) and paths on the server are refused: download the image and send it as a file.

**finish_reason** says why the answer ended: `stop` (the model ended it), `length` (it reached
`max_new_tokens`), `timeout` (the server's time limit per answer; the answer so far is kept) or `stopped`
(cancelled). A refused request (an image or question over this server's limits, a bad field) is an error
titled "Refused" that says what to change. `model="ca"` or `"mmca"` asks the Compare tab's models.
"""


def launch(demo, host: str = "127.0.0.1", port: int = 7860, queue_size: int = 16, max_file_size="25mb",
           share: bool = False, **kw):
    """Queue (bounded: a full queue refuses with a message) and serve."""
    demo.queue(max_size=queue_size, default_concurrency_limit=1)
    # show_error: errors Gradio raises before a handler runs (a file path it refuses to take) reach the
    # client as their message instead of {"error": null}; the handlers turn their own errors into gr.Error
    kw.setdefault("show_error", True)
    serving = getattr(demo, "serving", None)
    if serving is not None:  # refuse an oversized API body, or a file entry that is no upload, before Gradio reads it
        from starlette.middleware import Middleware

        from webapp.api import RequestGuard

        app_kwargs = dict(kw.pop("app_kwargs", None) or {})
        app_kwargs["middleware"] = [*app_kwargs.get("middleware", []),
                                    Middleware(RequestGuard, max_bytes=serving.limits.max_request_bytes)]
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
    from visualchat.server import Server

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
