import pytest

from visualchat.template import IGNORE_INDEX, Conversation, Round, Template


@pytest.fixture
def tpl(tiny_tokenizer):
    return Template(tiny_tokenizer, image_tokens=3)


def conv():
    return Conversation(rounds=[
        Round("What is in Image 1?", images=["a", "b"], answer="A circle."),
        Round("And now?", images=[], answer="Still a circle."),
        Round("Compare Image 3 with Image 1.", images=["c"]),
    ])


def decode(tok, ids):
    return tok.decode(ids)


def test_layout_numbers_images_across_rounds(tpl, tiny_tokenizer):
    r = tpl.render(conv())
    text_ids = [t for t, im in zip(r.input_ids, r.is_image) if not im]
    text = decode(tiny_tokenizer, text_ids)
    assert text.startswith("<s>You are a powerful vision-language assistant.\n\n### Image 1:\n")
    # Image 3 arrives in round 3 and is numbered across the conversation
    assert text.index("### Image 1:") < text.index("### Image 2:") < text.index("### Question:\nWhat is")
    assert text.index("### Question:\nAnd now?") < text.index("### Image 3:") < text.index("Compare Image 3")
    assert text.endswith("### Question:\nCompare Image 3 with Image 1.\n\n### Answer:\n")
    assert "A circle.</s>\n\n" in text


def test_image_slots_are_runs_of_k(tpl):
    r = tpl.render(conv())
    assert sum(r.is_image) == 3 * 3
    runs, cur = [], 0
    for im in r.is_image + [False]:
        if im:
            cur += 1
        elif cur:
            runs.append(cur)
            cur = 0
    assert runs == [3, 3, 3]
    assert all(t == tpl.image_token_id for t, im in zip(r.input_ids, r.is_image) if im)


def test_labels_cover_answers_with_eos_only(tpl, tiny_tokenizer):
    c = conv()
    c.rounds[-1].answer = "Yes."
    r = tpl.render(c)
    labelled = [t for t in r.labels if t != IGNORE_INDEX]
    assert decode(tiny_tokenizer, labelled) == "A circle.</s>Still a circle.</s>Yes.</s>"
    for t, lab, im in zip(r.input_ids, r.labels, r.is_image):
        assert lab == IGNORE_INDEX or (lab == t and not im)
    # answer_starts point at the first answer token
    for s in r.answer_starts:
        assert r.labels[s] != IGNORE_INDEX and r.labels[s - 1] == IGNORE_INDEX


def test_incremental_render_equals_full(tpl):
    c = conv()
    full = tpl.render(c)
    inc = tpl.render_system(c.system)
    first = 1
    for rnd in c.rounds:
        inc.extend(tpl.render_round(rnd, first))
        first += len(rnd.images)
    assert inc.input_ids == full.input_ids and inc.labels == full.labels and inc.is_image == full.is_image
    assert inc.round_starts == full.round_starts and len(full.round_starts) == 3


def test_markers_are_not_special_tokens(tpl, tiny_tokenizer):
    ids = tiny_tokenizer("### Image 1:", add_special_tokens=False)["input_ids"]
    assert not set(ids) & set(tiny_tokenizer.all_special_ids)


def test_open_round_only_last(tpl):
    c = conv()
    c.rounds[0].answer = None
    with pytest.raises(ValueError, match="round 1 has no answer"):
        tpl.render(c)


def test_render_text_placeholders(tpl):
    text = tpl.render_text(conv())
    assert "### Image 3:\n[Image 3: 3 tokens]\n### Question:\nCompare" in text
    assert text.startswith("You are a powerful vision-language assistant.\n\n### Image 1:\n[Image 1: 3 tokens]")
