"""The command-line chat, for people without a browser: ``python -m visualchat.chat``.

Type a question; attach images by putting ``/image PATH`` lines first (each adds the next Image i).
Commands: ``/image PATH``, ``/undo``, ``/regen``, ``/prompt``, ``/reset``, ``/quit``.
"""
from __future__ import annotations

import argparse
import sys
import warnings


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m visualchat.chat", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="checkpoint directory (default: the shipped MMCA model)")
    p.add_argument("--lm", default=None, help="override the base LM (HF id or local path)")
    p.add_argument("--vision", default=None, help="override the vision encoder spec")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--lm_weights", default="auto", choices=("auto", "fp16", "bf16", "fp32"),
                   help="CPU: the frozen LM's linear-weight format (visualchat.kernels.lowp). auto, the default, is what "
                        "the app serves: fp16 where the CPU has it (faster, the same answers); fp32 keeps the "
                        "weights as loaded")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--repetition_penalty", type=float, default=1.0)
    p.add_argument("--image", action="append", default=[], help="attach image(s) to the first question")
    p.add_argument("--ask", default=None, help="ask one question (with --image), print the answer and exit")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from .images import ImageError, open_image
    from .model import VisualChat
    from .session import INPUT_ERRORS, TooManyImagesError

    print("loading the model ...", file=sys.stderr)
    vc = VisualChat.from_pretrained(args.checkpoint, lm=args.lm, vision=args.vision, device=args.device,
                                    lm_weights=args.lm_weights)
    print(f"LM weights {vc.lm_weights}" + (f" ({vc.lm_weights_note})" if vc.lm_weights_note else ""), file=sys.stderr)
    session = vc.new_session()
    gen = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
               repetition_penalty=args.repetition_penalty)
    pending = list(args.image)

    def answer(stream, prefix=""):
        """Print the answer after ``prefix``. The prefix waits for the first piece, and warnings raised
        while answering are printed after the answer's line, so neither splits it."""
        shown = False

        def show(text):
            nonlocal shown
            if not shown:
                print(prefix, end="")
                shown = True
            print(text, end="", flush=True)

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            try:
                for piece in stream:
                    show(piece)
            except KeyboardInterrupt:
                stream.close()
                show(" [stopped]")
            finally:
                show("")
                print()
        for w in caught:
            print(f"{w.category.__name__}: {w.message}", file=sys.stderr)

    def attach(path):
        """Open an image for the next question now: a refused file is dropped with the reason."""
        try:
            pending.append(open_image(path))
        except ImageError as e:
            print(f"  error: {e} (not attached; the conversation is unchanged)")
            return
        print(f"  will attach as Image {len(session.images) + len(pending)}")

    if args.ask is not None:
        try:
            answer(session.stream(args.ask, pending, **gen))
        except INPUT_ERRORS as e:  # checked by Session.prepare_round before anything changed
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0

    print("VisualChat. /image PATH attaches an image to your next question; /quit ends.", file=sys.stderr)
    while True:
        try:
            line = input(f"[{len(session.images) + len(pending)} images] you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return 0
        if line.startswith("/image "):
            attach(line[7:].strip())
            continue
        try:
            if line == "/undo":
                print("  removed the last round" if session.undo() else "  nothing to undo")
            elif line == "/regen":
                answer(session.regenerate(**gen), "vc> ")
            elif line == "/prompt":
                print(session.prompt_text())
            elif line == "/reset":
                session.reset()
                pending.clear()
            else:
                stream = session.stream(line, pending, **gen)  # raises on bad input, before printing
                pending = []
                answer(stream, "vc> ")
        except INPUT_ERRORS as e:
            print(f"  error: {e} (the conversation is unchanged)")
            if isinstance(e, (ImageError, TooManyImagesError)) and pending:
                pending.clear()  # a refused attachment is dropped, so the next question works
                print("  the pending images were dropped; attach them again with /image")


if __name__ == "__main__":
    sys.exit(main())
