"""Session.prepare_round, the one check of a round (issue 17): what it checks, in which order, and that
it changes nothing; a session built from a history runs no model until its first forward."""
import pytest

from tests.conftest import color_image
from visualchat.images import ImageError
from visualchat.session import ContextWindowError, Session, TooManyImagesError


def test_prepare_round_checks_in_order_and_changes_nothing(tiny_vc):
    s = tiny_vc.new_session()
    s.ask("Hi?", images=[color_image((1, 2, 3))], max_new_tokens=3)
    before = (s.prompt_text(), len(s.images), len(s._answer_ids), s._cache_keys[:])
    # question first, then the generation settings, then the images, their count, the context window
    with pytest.raises(ValueError, match="the question is empty"):
        s.prepare_round("  ", [b"not an image"], temperature=-1)
    with pytest.raises(ValueError, match="temperature"):
        s.prepare_round("Ok?", [b"not an image"], temperature=-1)
    with pytest.raises(ImageError, match="not an image"):
        s.prepare_round("Ok?", [b"not an image"] + [color_image((0, 0, 0))] * 9)
    with pytest.raises(TooManyImagesError, match="would have 9 images"):
        s.prepare_round("Ok?", [color_image((0, 0, 0))] * 8)
    with pytest.raises(ContextWindowError, match="context window is 512"):
        s.prepare_round("word " * 600)
    p = s.prepare_round("  Next?  ", [color_image((4, 5, 6))], max_new_tokens=2)
    assert (s.prompt_text(), len(s.images), len(s._answer_ids), s._cache_keys) == before  # nothing changed
    assert p.round.question == "Next?" and p.config.max_new_tokens == 2
    # what it rendered is exactly what the model is fed once the round is added
    s.generate(p).close()
    assert s._render().input_ids == p.rendered.input_ids


def test_a_prepared_round_is_refused_once_the_conversation_moved_on(tiny_vc):
    s = tiny_vc.new_session()
    p = s.prepare_round("First?")
    s.ask("Another?", max_new_tokens=2)
    with pytest.raises(RuntimeError, match="changed after this round was prepared"):
        s.generate(p)
    assert [r.question for r in s.conversation.rounds] == ["Another?"]


def test_from_history_checks_every_round_and_runs_no_model(tiny_vc, monkeypatch):
    calls = []
    orig = tiny_vc.model.encode_images
    monkeypatch.setattr(tiny_vc.model, "encode_images", lambda ims: calls.append(len(ims)) or orig(ims))
    history = [{"question": "What is in Image 1?", "images": [color_image((9, 9, 9))], "answer": "A square."},
               {"question": "And Image 2?", "images": [color_image((90, 9, 9))], "answer": "A circle."}]
    s = Session.from_history(tiny_vc, history)
    s.prepare_round("Which is darker?")
    assert calls == [] and s._cache is None  # checking a conversation costs no model time (ZeroGPU)
    with pytest.raises(ValueError, match="the question is empty"):
        Session.from_history(tiny_vc, history + [{"question": " ", "answer": "x"}])
    answer = s.ask("Which is darker?", max_new_tokens=3)
    assert calls == [2]  # both images encoded once, at the first forward
    fresh = tiny_vc.new_session()
    for r in history:
        fresh.add_round(r["question"], r["images"], r["answer"])
    assert fresh.ask("Which is darker?", max_new_tokens=3) == answer
