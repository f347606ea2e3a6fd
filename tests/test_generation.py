"""The sampling step on its own: greedy, repetition penalty, top-p and a seeded draw."""
import torch

from visualchat.generation import GenerationConfig, next_token


def test_greedy_takes_the_argmax_and_leaves_the_logits_alone():
    logits = torch.tensor([0.1, 2.0, 1.9, -3.0])
    before = logits.clone()
    assert next_token(logits, [], GenerationConfig()) == 1
    assert next_token(logits, [1], GenerationConfig()) == 1  # no penalty: earlier tokens do not matter
    assert torch.equal(logits, before)


def test_the_repetition_penalty_moves_greedy_off_a_repeated_token_without_touching_the_input():
    logits = torch.tensor([0.1, 2.0, 1.9, -3.0])
    before = logits.clone()
    assert next_token(logits, [1], GenerationConfig(repetition_penalty=1.2)) == 2  # 2.0 / 1.2 < 1.9
    assert next_token(logits, [3], GenerationConfig(repetition_penalty=1.2)) == 1
    assert torch.equal(logits, before)


def test_top_p_keeps_only_the_head_and_a_seed_repeats_the_draw():
    logits = torch.tensor([5.0, 4.9, -10.0, -10.0])
    cfg = GenerationConfig(temperature=1.0, top_p=0.5, seed=0)
    draws = {next_token(logits, [], cfg, torch.Generator().manual_seed(s)) for s in range(20)}
    assert draws == {0}  # token 0 alone holds more than half the mass
    wide = GenerationConfig(temperature=1.0, top_p=1.0)
    a = [next_token(logits, [], wide, torch.Generator().manual_seed(s)) for s in range(20)]
    b = [next_token(logits, [], wide, torch.Generator().manual_seed(s)) for s in range(20)]
    assert a == b and set(a) <= {0, 1} and len(set(a)) == 2
