"""Tests of the distilled text-only chat data (visualchat_train/data/chat.py) and the file the recipes mix in."""
import json
import os

import pytest

from visualchat_train.data import chat as C

SHIPPED = os.path.join(os.path.dirname(__file__), "..", "visualchat_train", "data", "chat_smollm2.jsonl")


def test_prompts_are_distinct_and_deterministic():
    p = C.prompts(300)
    assert len(set(p)) == 300 and p == C.prompts(300) and C.prompts(40) == p[:40] and C.prompts()[:300] == p
    assert not set(C.HELDOUT) & set(C.prompts())  # the benchmark's prompts are in no training file
    assert p[:len(C._GREETINGS)] == list(C._GREETINGS)  # greetings first: they matter most in a demo
    assert C.prompts(50, seed=1) != p[:50] and not set(C.prompts(50, seed=1)) & set(C._GREETINGS)
    with pytest.raises(ValueError, match="templates make"):
        C.prompts(10 ** 6)


def test_whole_sentences():
    assert C.whole_sentences("Hello there. I am a bot and I") == "Hello there."
    assert C.whole_sentences("Yes! Sure? and then") == "Yes! Sure?"
    assert C.whole_sentences("no sentence ends here") == ""


def test_loops():
    assert C.loops("1. **1.1.1.1.1.1.1.1.1.1.1.1.1")
    assert C.loops("The answer is: Paris\n\nThe answer is: Paris\n\nThe answer is: Paris")
    assert not C.loops("Hello there! How can I assist you today?")


def test_distill_drops_unfinished_answers(tiny_tokenizer):
    from tests.conftest import tiny_llama

    tok = tiny_tokenizer
    with pytest.raises(ValueError, match="chat template"):
        C.distill(tiny_llama(tok), tok, ["Hi!"], progress=False)
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant: "
    try:
        lm = tiny_llama(tok)
        lm.generation_config.eos_token_id = tok.eos_token_id
        out = C.distill(lm, tok, ["Hi!", "What color is the sky?", "Hello there"], max_new_tokens=4, batch_size=2,
                        progress=False)
    finally:
        tok.chat_template = None
    assert [q for q, _ in out] == ["Hi!", "What color is the sky?", "Hello there"]
    for _, a in out:  # whatever a random tiny LM said must come back clean, or not at all
        assert a is None or (a.strip() == a and a and not C.loops(a))


def test_distill_on_the_default_lm_batches_like_one_by_one():
    import torch

    from visualchat.model import load_lm

    lm, tok = load_lm("default", torch.float32)
    qs = ["Hi!", "What color is the sky?", "Hello! Who are you?"]
    batched = C.distill(lm, tok, qs, max_new_tokens=48, batch_size=3, progress=False)
    single = C.distill(lm, tok, qs, max_new_tokens=48, batch_size=1, progress=False)
    assert batched == single  # left padding changes nothing
    answers = [a for _, a in batched if a]
    assert answers, batched
    assert all("<|im_" not in a and "###" not in a for a in answers)


def test_shipped_chat_file_loads():
    from visualchat_train.data import load_dataset

    st = {}
    convs = load_dataset("jsonl", SHIPPED, stats=st)
    assert len(convs) >= 200 and st["skipped"] == 0
    assert all(len(c.rounds) == 1 and not c.images and c.rounds[0].answer for c in convs)
    qs = [c.rounds[0].question for c in convs]
    assert len(set(qs)) == len(qs) and "Hello! Who are you?" in qs
    with open(SHIPPED, encoding="utf-8") as f:
        assert all(not C.loops(json.loads(line)["rounds"][0]["answer"]) for line in f)
