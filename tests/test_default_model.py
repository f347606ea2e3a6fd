"""Integration: the embedded default (real SmolLM2-135M-Instruct + real EfficientNet-Lite0) on CPU."""
import os

import pytest
import torch
from PIL import Image

from visualchat.assets import ASSETS_DIR, default_lm_dir

EXAMPLES = os.path.join(ASSETS_DIR, "examples")


@pytest.fixture(scope="module")
def default_vc():
    from visualchat.model import VisualChat

    return VisualChat.from_pretrained(None, device="cpu")


def test_default_lm_is_converted_once_and_cached():
    path = default_lm_dir()
    assert os.path.isfile(os.path.join(path, "config.json"))
    assert default_lm_dir() == path  # second call: straight from the cache


def test_default_loads_and_three_images_produce_tokens(default_vc):
    k = default_vc.config.image_tokens  # the rows one image takes (the words projection: 5 per cell + 2)
    assert k == default_vc.model.image_tokens and default_vc.model.encoder.hidden_size == 1280
    assert default_vc.model.lm.config.model_type == "llama"
    ims = [Image.open(os.path.join(EXAMPLES, f"shapes_{i}.png")) for i in (1, 2, 3)]
    s = default_vc.new_session()
    pieces = list(s.stream("Describe Image 1, Image 2 and Image 3.", images=ims, max_new_tokens=6))
    assert s.last_stats["new_tokens"] >= 1
    assert s.last_stats["prefill_tokens"] > 3 * k
    assert f"### Image 3:\n[Image 3: {k} tokens]" in s.prompt_text()
    assert all(isinstance(p, str) for p in pieces)


def test_default_lm_answers_text_sensibly(default_vc):
    """The converted GGUF weights are the real model: plain text gets a sensible greedy answer."""
    s = default_vc.new_session(system="You are a helpful assistant.")
    lm, tok = default_vc.model.lm, default_vc.tokenizer
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = lm.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])
    assert s.ask("Hi?", max_new_tokens=2) is not None


def test_shipped_checkpoint_answers_about_two_images(default_vc):
    """The shipped MMCA checkpoint (trained by visualchat_train/, see visualchat_train/recipes/) answers correctly about two
    assets/ images: shapes_4 has two triangles, shapes_5 a yellow circle and a green triangle (the
    generator's ground truth, ``visualchat_train.data.shapes.example_samples``). The shipped model is far from
    perfect (README: about 31% exact match on the test split), so this is a question it is measured
    to get right; it must get it right with the images in either order (the circle is in Image 2,
    then in Image 1), which a model answering from the question alone does 1 time in 36."""
    assert default_vc.path and default_vc.path.endswith("shapes-mmca")
    ims = [Image.open(os.path.join(EXAMPLES, f"shapes_{i}.png")) for i in (4, 5)]
    assert default_vc.new_session().ask("What color is the circle in Image 2?", images=ims, max_new_tokens=8) == "yellow"
    assert default_vc.new_session().ask("What color is the circle in Image 1?", images=ims[::-1], max_new_tokens=8) == "yellow"


@pytest.mark.parametrize("name", ["shapes-ca", "shapes-mmca"])
def test_shipped_checkpoints_read_an_objects_colour(default_vc, name):
    """bench/color_readout.py on each shipped checkpoint: with the true image it names a lone
    object's colour far more often than with another scene's image (the control) or by chance (1/6)."""
    from bench.color_readout import one_object_scenes, readout
    from visualchat_train.data.shapes import COLORS
    from visualchat.model import VisualChat

    vc = VisualChat.from_pretrained(os.path.join(ASSETS_DIR, "checkpoints", name), share_with=default_vc)
    r = readout(vc, one_object_scenes(20), list(COLORS))
    assert r["scenes"] == 20 and sum(r["answers"].values()) == 20
    assert r["accuracy"] >= 0.4 and r["accuracy"] > r["control_accuracy"] + 0.2, r


def test_shipped_checkpoint_still_chats_without_images(default_vc):
    """The recipes mix in text-only rounds distilled from the base LM (visualchat_train/data/chat.py), so with no
    image the default still answers like a chat model. Trained on shapes questions alone, the previous
    checkpoint answered "Hello! Who are you?" with "The answer is 1". These prompts are in no
    training file (``HELDOUT``)."""
    from visualchat_train.data.chat import HELDOUT

    for q in ("Hey! Who am I talking to?", "What is the capital of Austria?", "What does a dentist do?"):
        assert q in HELDOUT
        a = default_vc.new_session().ask(q, max_new_tokens=40)
        assert len(a.split()) >= 4 and "answer is" not in a, (q, a)
    assert "Vienna" in default_vc.new_session().ask("What is the capital of Austria?", max_new_tokens=20)


def test_shipped_default_writes_a_story_without_looping(default_vc):
    """Issue 29: asked for a story with no image, the previous default wrote "A, a, a, ..." up to the
    token cap. The shipped default must answer open requests with text that does not repeat one phrase
    back to back (bench/chat_retention.py's check, which the old checkpoint fails)."""
    from bench.chat_retention import OPEN, loops

    for q in OPEN:
        a = default_vc.new_session().ask(q, max_new_tokens=96)
        assert len(a.split()) >= 8 and not loops(a), (q, a)


def example_rounds() -> list[tuple[str, str, list[int]]]:
    """Issue 21's acceptance questions about assets/examples/shapes_4.png and shapes_5.png, one of each kind
    (count, colour, position, cross-image, refer-back), as (question, the generator's answer, example
    images the round brings). Questions and answers come from ``visualchat_train.data.shapes``'s own phrasing and the
    scenes' ground truth (``example_samples``), so they are what the models were trained to answer."""
    from visualchat_train.data.shapes import _unique_by_name, _unique_by_shape, color_qa, count_qa, example_samples, more_qa, where_qa

    a, b = example_samples()[2].scenes  # shapes_4.png, shapes_5.png
    shape = next(s for s in ("triangle", "circle", "square", "star", None) if a.count(s) != b.count(s))
    rounds = [(*count_qa(a, "triangle", 1), [4]),                # single-image count
              (*color_qa(_unique_by_shape(b)[0], 2), [5]),       # colour, the new image
              (*where_qa(_unique_by_name(b)[-1], 2), []),        # position
              (*more_qa([a, b], 0, 1, shape), []),               # cross-image
              (*where_qa(_unique_by_name(a)[0], 1), [])]         # refer-back to Image 1
    return rounds


@pytest.mark.xfail(strict=True, reason="issue 21: the shipped checkpoints score about 30% exact match (README); "
                   "when both answer all five, this fails and the marker must go")
@pytest.mark.parametrize("name", ["shapes-ca", "shapes-mmca"])
def test_shipped_checkpoints_answer_the_five_kinds_of_question(default_vc, name):
    """Issue 21's acceptance: greedy, one conversation, a count, a colour, a position, a cross-image and a
    refer-back question about the example images, each answered exactly."""
    from visualchat_train.eval import normalise
    from visualchat.model import VisualChat

    vc = VisualChat.from_pretrained(os.path.join(ASSETS_DIR, "checkpoints", name), share_with=default_vc)
    session = vc.new_session()
    got = []
    for question, answer, new in example_rounds():
        ims = [Image.open(os.path.join(EXAMPLES, f"shapes_{i}.png")) for i in new]
        got.append((question, answer, session.ask(question, images=ims, max_new_tokens=12)))
    assert all(normalise(a) == normalise(g) for _, a, g in got), got
