"""Text-only chat rounds distilled from the base LM, to mix into image training so the model keeps chatting.

Training only on the shapes set teaches the (trainable) embedding rows of the template's markers to
answer every question the way shapes answers look: asked "Hello! Who are you?" with no image, the
previously shipped MMCA model said "The answer is 1". This module writes text-only conversations whose
answers come from the frozen LM itself, prompted with its *own* chat template (for SmolLM2 the
ChatML ``<|im_start|>`` markers), so mixing them into training (data set ``jsonl``) asks the model to
answer text questions in our Figure-3 template the way the base model answers them natively.

- ``prompts(n, seed)``: ``n`` distinct, deterministic everyday prompts (greetings, facts, how-to,
  short writing, colours of things, ...) built from templates and fillers.
- ``distill(lm, tokenizer, prompts, ...)``: the LM's greedy answers under its chat template, batched;
  an answer that goes past ``max_new_tokens`` is cut after its last whole sentence; answers that
  loop (or are empty) are dropped.
- CLI: ``python -m visualchat_train.data.chat --out visualchat_train/data/chat_smollm2.jsonl`` (the default LM, every prompt),
  one conversation a line in the ``jsonl`` format (no images). That file is what the shipped
  recipes mix in; it took 5.6 minutes on one CPU thread (446 prompts, 379 answers kept).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import re
import time

from visualchat.template import DEFAULT_SYSTEM

CHAT_VERSION = 1

_COUNTRIES = ("France", "Germany", "Italy", "Spain", "Japan", "China", "India", "Brazil", "Canada",
              "Mexico", "Egypt", "Kenya", "Australia", "Russia", "Greece", "Portugal", "Norway",
              "Sweden", "Poland", "Turkey", "Argentina", "Peru", "Chile", "Ireland", "Thailand")
_ANIMALS = ("cats", "dogs", "elephants", "dolphins", "owls", "bees", "penguins", "horses", "octopuses",
            "lions", "frogs", "whales", "ants", "parrots", "turtles", "wolves", "rabbits", "sharks",
            "butterflies", "giraffes")
_CONCEPTS = ("photosynthesis", "gravity", "rain", "a rainbow", "electricity", "the internet", "a computer",
             "democracy", "inflation", "a volcano", "the moon's phases", "a vaccine", "friction",
             "an atom", "evolution", "a black hole", "recycling", "the water cycle", "a battery",
             "machine learning")
_TASKS = ("make a cup of tea", "boil an egg", "learn a new language", "save money", "fall asleep faster",
          "plant a tree", "write a good email", "stay focused while studying", "clean a window",
          "start running", "take a good photo", "make new friends", "remember names", "fix a flat bike tire",
          "prepare for a job interview", "keep a plant alive", "cook rice", "tie a tie", "be more patient",
          "organize my desk")
_TOPICS = ("the sea", "autumn", "the moon", "a cat", "rain", "friendship", "a city at night", "mountains",
           "the sun", "a garden", "snow", "coffee", "a river", "the stars", "a red balloon", "spring",
           "an old tree", "the wind", "a lighthouse", "summer")
_FORMS = ("a short poem", "a haiku", "two sentences", "a one-line story", "a short description")
_THINGS = ("the sky", "grass", "a banana", "snow", "a ripe tomato", "an orange", "coal", "milk",
           "a lemon", "a carrot", "chocolate", "the sun", "a strawberry", "a lime", "the ocean", "a crow",
           "a flamingo", "an eggplant", "a pumpkin", "a cloud")
_JOBS = ("a doctor", "a teacher", "a pilot", "a chef", "a farmer", "an engineer", "a nurse", "a painter",
         "a librarian", "a firefighter", "a scientist", "a carpenter", "a lawyer", "a journalist",
         "an astronaut", "a baker")
_HABITS = ("sleep", "drinking water", "exercise", "reading", "walking", "eating vegetables", "meditation",
           "cooking at home", "learning music", "spending time outdoors", "stretching", "journaling",
           "a regular bedtime", "taking breaks", "gardening")
_GREETINGS = ("Hello!", "Hi!", "Hi there.", "Hello! Who are you?", "Good morning!", "Hey, how are you?",
              "What is your name?", "Who are you?", "What can you do?", "Nice to meet you.",
              "Can you help me?", "Hello, what kind of assistant are you?", "Good evening!", "Thanks!",
              "Thank you for your help.", "Goodbye!", "How was your day?", "Are you a robot?",
              "Can you see images?", "What do you know about pictures?")

_TEMPLATES: tuple[tuple[str, tuple], ...] = (
    ("What is the capital of {}?", (_COUNTRIES,)),
    ("Tell me a fun fact about {}.", (_ANIMALS,)),
    ("Explain {} in one sentence.", (_CONCEPTS,)),
    ("What is {}?", (_CONCEPTS,)),
    ("How do I {}?", (_TASKS,)),
    ("Give me one tip to {}.", (_TASKS,)),
    ("Write {} about {}.", (_FORMS, _TOPICS)),
    ("What color is {}?", (_THINGS,)),
    ("What does {} do?", (_JOBS,)),
    ("Where do {} live?", (_ANIMALS,)),
    ("What do {} eat?", (_ANIMALS,)),
    ("Which language do people speak in {}?", (_COUNTRIES,)),
    ("Tell me something interesting about {}.", (_COUNTRIES,)),
    ("What food is {} famous for?", (_COUNTRIES,)),
    ("Describe {} in a few words.", (_TOPICS,)),
    ("Why is {} good for you?", (_HABITS,)),
    ("How can I make {} a habit?", (_HABITS,)),
)


def prompts(n: int | None = None, seed: int = 0) -> list[str]:
    """``n`` distinct prompts in a seeded order: every greeting first (seed 0 only), then templates
    filled from their lists (``n=None``: all of them). Raises ValueError if ``n`` exceeds what the
    templates can make."""
    pool = [t.format(*fill) for t, lists in _TEMPLATES for fill in itertools.product(*lists)]
    rng = random.Random(f"chat-v{CHAT_VERSION}/{seed}")
    rng.shuffle(pool)
    out = list(_GREETINGS) if seed == 0 else []
    out += [p for p in pool if p not in out]
    if n is None:
        return out
    if n > len(out):
        raise ValueError(f"asked for {n} prompts; the templates make {len(out)}")
    return out[:n]


#: Prompts that no training file holds (other fillers, other templates): for measuring how well a
#: trained checkpoint keeps the base model's chat behaviour (``bench/chat_retention.py``).
HELDOUT = (
    "Hey! Who am I talking to?", "Good afternoon!", "Hi, can you tell me what you are?",
    "What is the capital of Austria?", "What is the capital of Vietnam?", "What is the capital of Nigeria?",
    "Tell me a fun fact about koalas.", "Tell me a fun fact about camels.", "Where do polar bears live?",
    "What do squirrels eat?", "Explain thunder in one sentence.", "What is a glacier?", "What is an eclipse?",
    "How do I bake bread?", "How do I change a light bulb?", "Give me one tip to write clearly.",
    "Write a haiku about a forest.", "Write two sentences about the desert.", "What color is a cherry?",
    "What color is a polar bear?", "What does a plumber do?", "What does a dentist do?",
    "Which language do people speak in Brazil and Portugal?", "What food is Vietnam famous for?",
    "Why is laughing good for you?", "What is your favourite color?", "Can you tell me a story?",
    "What should I cook for dinner tonight?", "Recommend a good book.", "How far away is the moon?",
)


def loops(text: str, n: int = 4, times: int = 3) -> bool:
    """True when some ``n``-word sequence occurs ``times`` times or more (a degenerate answer)."""
    words = re.findall(r"\w+|[^\w\s]", text.lower())
    seen: dict[tuple, int] = {}
    for i in range(len(words) - n + 1):
        key = tuple(words[i:i + n])
        seen[key] = seen.get(key, 0) + 1
        if seen[key] >= times:
            return True
    return False


def whole_sentences(text: str) -> str:
    """``text`` up to its last sentence end (. ! ?), or "" if it has none (for a cut-off answer)."""
    m = re.match(r"(?s)(.*[.!?])[^.!?]*$", text)
    return m[1].strip() if m else ""


def distill(lm, tokenizer, questions: list[str], *, system: str = DEFAULT_SYSTEM, max_new_tokens: int = 80,
            batch_size: int = 16, progress: bool = True) -> list[tuple[str, str | None]]:
    """``(question, answer)`` for every question: the LM's greedy answer under its own chat template.
    An answer still going after ``max_new_tokens`` is cut after its last whole sentence; it is None
    when nothing is left, or when it loops."""
    import torch
    from tqdm import tqdm

    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template, so the base model has no native chat format to distill")
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    out: list[tuple[str, str | None]] = []
    bar = tqdm(total=len(questions), desc="distilling chat answers", unit="prompt", disable=not progress)
    for start in range(0, len(questions), batch_size):
        batch = questions[start:start + batch_size]
        ids = [tokenizer.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": q}],
                                             add_generation_prompt=True, tokenize=True) for q in batch]
        ids = [x["input_ids"] if isinstance(x, dict) or hasattr(x, "keys") else x for x in ids]
        width = max(map(len, ids))
        input_ids = torch.tensor([[pad] * (width - len(x)) + list(x) for x in ids])
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
        with torch.no_grad():
            gen = lm.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                              do_sample=False, pad_token_id=pad, eos_token_id=eos)
        for q, row in zip(batch, gen[:, width:].tolist()):
            finished = eos in row
            text = tokenizer.decode(row[:row.index(eos)] if finished else row, skip_special_tokens=True).strip()
            if not finished:
                text = whole_sentences(text)
            out.append((q, text if text and not loops(text) else None))
        bar.update(len(batch))
    bar.close()
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m visualchat_train.data.chat", description=__doc__.split("\n\n")[0])
    p.add_argument("--lm", default="default", help="the base LM whose answers to distill (default: the embedded SmolLM2)")
    p.add_argument("--n", type=int, default=None, help="prompts to answer (default: all the templates make; some answers are dropped)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max_new_tokens", type=int, default=80, help="longer answers are cut after their last whole sentence")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--out", required=True, help="output .jsonl (the jsonl data set's format)")
    args = p.parse_args(argv)

    import torch

    from visualchat.model import load_lm

    t0 = time.time()
    lm, tok = load_lm(args.lm, torch.float32, "cpu")
    pairs = distill(lm, tok, prompts(args.n, args.seed), max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    kept = [(q, a) for q, a in pairs if a is not None]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        for q, a in kept:
            f.write(json.dumps({"system": DEFAULT_SYSTEM, "rounds": [{"question": q, "answer": a}]}) + "\n")
    print(f"wrote {len(kept)} of {len(pairs)} answered prompts to {args.out} in {time.time() - t0:.0f} s "
          f"(dropped {len(pairs) - len(kept)}: empty or looping)")


if __name__ == "__main__":
    main()
