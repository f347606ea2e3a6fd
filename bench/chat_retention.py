"""Does a checkpoint still chat like its base LM when there is no image?

    python bench/chat_retention.py --checkpoint assets/checkpoints/shapes-mmca assets/checkpoints/shapes-ca

Training on image questions moves the embedding rows of the template's markers, which can teach the
model to answer *every* question like the training data. This measures that on the prompts of
``visualchat_train.data.chat.HELDOUT`` (in no training file): the base LM answers each one under its own chat
template (the teacher), and every model is scored by the mean per-token negative log-likelihood of
those answers in our Figure-3 template with no image (lower = closer to the base model's own
chatting). "base" is the untrained embedding (the frozen LM itself, in our template). It also prints
each model's greedy answer to a few prompts, and checks every greedy answer to the held-out prompts
and to a few open requests (a story, a greeting) for degenerate repetition (:func:`loops`: one short
phrase repeated back to back, as in "A, a, a, a, ..."), against the base LM under its own chat
template on the same prompts.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import write_json  # noqa: E402

SHOWN = ("Hello! Who are you?", "What is the capital of Austria?", "Write a haiku about a forest.",
         "What color is a cherry?")
#: Open requests whose long answers show a loop if the model has one.
OPEN = ("Tell me a long story about a dragon.", "Hi there!", "Explain how rain forms.")


def loops(text: str, max_n: int = 4, repeats: int = 4) -> bool:
    """True when ``text`` repeats one phrase of at most ``max_n`` words ``repeats`` times back to back
    ("A, a, a, a", "HHHH" counts as one word repeated by characters), ignoring case and punctuation."""
    import re

    words = re.findall(r"\w+", text.lower())
    if any(re.search(r"(\w{1,3})\1{%d,}" % (3 * repeats - 1), w) for w in words):  # "HHHHHHHHHHHH"
        return True
    for n in range(1, max_n + 1):
        for i in range(len(words) - n * repeats + 1):
            gram = words[i:i + n]
            if all(words[i + k * n:i + (k + 1) * n] == gram for k in range(1, repeats)):
                return True
    return False


@torch.no_grad()
def teacher_nll(vc, pairs: list[tuple[str, str]]) -> float:
    """Mean negative log-likelihood per answer token (and EOS) of ``pairs`` under ``vc``, no images."""
    from visualchat.template import Conversation, Round

    total, count = 0.0, 0
    for q, a in pairs:
        r = vc.template.render(Conversation([Round(q, [], a)]))
        ids = torch.tensor([r.input_ids], device=vc.device)
        out = vc.model(ids, torch.zeros_like(ids, dtype=torch.bool), labels=torch.tensor([r.labels], device=vc.device))
        loss, n = out.loss, out.n_tokens
        total += float(loss) * n
        count += n
    return total / max(count, 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", nargs="+", default=["assets/checkpoints/shapes-mmca", "assets/checkpoints/shapes-ca"])
    ap.add_argument("--max_new_tokens", type=int, default=96, help="teacher answers longer than this are cut after their last whole sentence")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    a = ap.parse_args(argv)

    from visualchat_train.data.chat import HELDOUT, distill
    from visualchat.model import VisualChat, load_lm

    first = VisualChat.from_pretrained(a.checkpoint[0], device="cpu")
    teacher, tok = load_lm(first.config.lm, torch.float32, "cpu")
    pairs = [(q, t) for q, t in distill(teacher, tok, list(HELDOUT), max_new_tokens=a.max_new_tokens) if t]
    # the base LM itself in our template (a checkpoint with LoRA folds its adapters into its own copy)
    base = VisualChat.from_components(teacher, tok, first.model.encoder, lm_spec=first.config.lm)
    models = {"base (untrained embedding)": base, a.checkpoint[0]: first}
    for ck in a.checkpoint[1:]:
        models[ck] = VisualChat.from_pretrained(ck, device="cpu", share_with=first)
    results = {"prompts": len(HELDOUT), "teacher_answers": len(pairs), "models": {}}
    prompts = list(HELDOUT) + list(OPEN)
    base_loops = [q for q in prompts if loops(_native_answer(teacher, tok, q, a.max_new_tokens))]
    results["base_lm_native_template_loops"] = base_loops
    print(f"the base LM under its own chat template loops on {len(base_loops)} of {len(prompts)} prompts: {base_loops}")
    print(f"{len(pairs)} of {len(HELDOUT)} held-out prompts have a finished teacher answer\n")
    print("| model | NLL of the base model's own answers (per token) | " + " | ".join(f"\"{q}\"" for q in SHOWN)
          + " |\n|---|---|" + "---|" * len(SHOWN))
    for name, vc in models.items():
        nll = teacher_nll(vc, pairs)
        answers = {q: vc.new_session().ask(q, max_new_tokens=40) for q in SHOWN}
        looping = [q for q in prompts if loops(vc.new_session().ask(q, max_new_tokens=a.max_new_tokens))]
        results["models"][name] = {"teacher_nll": nll, "answers": answers, "loops": looping}
        print(f"{name}: loops on {len(looping)} of {len(prompts)} prompts {looping}")
        cells = " | ".join(answers[q].replace("\n", " ").replace("|", "/")[:120] for q in SHOWN)
        print(f"| {name} | {nll:.3f} | {cells} |", flush=True)
    write_json(a.out, results)
    return 0


@torch.no_grad()
def _native_answer(lm, tok, question: str, max_new_tokens: int) -> str:
    """The base LM's greedy answer under its own chat template (no image, no checkpoint)."""
    ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    out = lm.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


if __name__ == "__main__":
    raise SystemExit(main())
