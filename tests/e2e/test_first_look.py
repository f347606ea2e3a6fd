"""Issue 27 in a real headless Chromium (Debian's `chromium` through Playwright's executable_path; no
browser is downloaded): what a newcomer sees. The model line and its collapsed Details, the note under an
answer cut at the token cap, Undo putting the question and its image back in the box, the API snippet
naming the port the page came from, and the attention maps at 1280x800: eight images in the gallery
without scrolling, each in its own colours beside its map, captions outside the pictures (a screenshot
goes to test-artifacts/e2e/; assets/screenshots/chat-where-it-looked.png is the same view of the shipped
default, taken by bench/screenshot_maps.py); and Regenerate at temperature 0 offering to sample."""
import os
import time

import pytest

from tests.e2e.test_browser import (ARTIFACTS, EXAMPLES, attach_and_send, bot_texts, chromium_page, set_max_tokens,
                                    wait_for)
from tests.e2e.test_browser import pytestmark  # noqa: F401 (skipped without Debian's chromium)
from tests.test_app import build_tiny_models
from tests.test_app_client import serve

SCREENSHOT = os.path.join(ARTIFACTS, "9-chat-where-it-looked-1280x800.png")


@pytest.fixture(scope="module")
def served(tiny_tokenizer, tiny_clip_dir):
    import app
    from visualchat_train.eval import eval_info, score_shapes

    chat, ca, mm = build_tiny_models(tiny_tokenizer, tiny_clip_dir)
    # the chat model records a score, as `python -m visualchat_train.eval --write_info` writes it into a checkpoint
    chat.config.info = {"eval": eval_info(score_shapes(chat, n=2, max_new_tokens=4, progress=False),
                                          "python -m visualchat_train.eval --n 2")}
    demo = app.build_demo(chat, compare=(ca, mm), concurrency=2)
    url = serve(demo)
    yield demo, url
    demo.close()


@pytest.fixture(scope="module")
def page(served):
    yield from chromium_page(1280, 800)  # the window


def fresh(pg, url):
    pg.goto(url)
    pg.wait_for_selector("#message textarea")
    return pg


def test_model_line_and_collapsed_details(page, served):
    demo, url = served
    pg = fresh(page, url)
    score = demo.serving.chat.config.info["eval"]
    line = pg.locator("#vc-model").inner_text()
    assert line.startswith("Loaded:") and f"{100 * score['accuracy']:.0f}%" in line
    assert f"measured on {score['rounds']} test questions" in line
    for jargon in ("K=", "kernel injection", "float32", "fp16", "PyTorch"):
        assert jargon not in line, jargon
    details = pg.locator("#vc-details")
    assert not details.get_by_text("Serving").is_visible()  # collapsed
    details.get_by_text("Details").first.click()
    wait_for(lambda: details.get_by_text("Serving").is_visible())
    text = details.inner_text()
    assert "K=16" in text and demo.serving.backend in text and "python -m visualchat_train.eval --n 2" in text


def ask_fresh(pg, url, question, max_tokens):
    """A fresh page, Max new tokens set, one question answered (no image)."""
    fresh(pg, url)
    set_max_tokens(pg, max_tokens)
    pg.locator("#message textarea").fill(question)
    pg.locator("#message textarea").press("Enter")
    wait_for(lambda: "tokens/s" in pg.locator("#status").inner_text(), timeout=60)
    return pg


def test_a_note_under_an_answer_cut_at_the_cap(page, served):
    demo, url = served
    pg = ask_fresh(page, url, "Tell me a long story.", 4)
    answer = bot_texts(pg)[-1]
    status = pg.locator("#status").inner_text()
    assert "4 tokens in" in status, status  # the cap held
    assert "cut off at the token limit" in answer and "Max new tokens" in answer, answer


def test_undo_puts_the_question_and_its_image_back(page, served):
    demo, url = served
    pg = fresh(page, url)
    attach_and_send(pg, "#message", [os.path.join(EXAMPLES, "shapes_1.png")], "What color is the star in Image 1?")
    wait_for(lambda: "tokens/s" in pg.locator("#status").inner_text(), timeout=60)
    wait_for(lambda: pg.locator("#message img").count() == 0)  # the box was emptied when the message was taken
    pg.locator("#undo").click()
    wait_for(lambda: pg.locator("#chatbot .bot-row").count() == 0)
    wait_for(lambda: pg.locator("#message textarea").input_value() == "What color is the star in Image 1?")
    wait_for(lambda: pg.locator("#message img").count() == 1)  # its image is back too
    assert "back in the input box" in pg.locator("#status").inner_text()
    pg.locator("#message textarea").press("Enter")  # and it can be sent again as it is
    wait_for(lambda: pg.locator("#chatbot .user-row img").count() == 1 and
             "tokens/s" in pg.locator("#status").inner_text(), timeout=60)


def test_the_api_snippet_names_the_port_the_page_came_from(page, served):
    demo, url = served
    pg = fresh(page, url)
    port = url.rstrip("/").rsplit(":", 1)[1]
    assert port != "7860"
    pg.get_by_text("Use it from Python (gradio_client)").click()
    wait_for(lambda: f'Client("http://127.0.0.1:{port}/")' in pg.locator("#api-snippet").inner_text())
    text = pg.locator("#api-snippet").inner_text()
    assert "7860" not in text and "YOUR-APP-ADDRESS" not in text
    assert "Web addresses (https://...) and paths on the server are refused" in text


def show_eight_maps(pg, url, questions=("What is in these images?", "And in these?"), max_tokens=6, timeout=90):
    """Two rounds of four example images each, then "Where it looked" on, the page scrolled to its top."""
    fresh(pg, url)
    set_max_tokens(pg, max_tokens)
    files = [os.path.join(EXAMPLES, f"shapes_{i}.png") for i in (1, 2, 3, 4, 5, 1, 2, 3)]
    for n, (question, some) in enumerate(zip(questions, (files[:4], files[4:])), 1):
        attach_and_send(pg, "#message", some, question)
        wait_for(lambda: pg.locator("#chatbot .bot-row").count() == n and
                 "tokens/s" in pg.locator("#status").inner_text(), timeout=timeout)
    pg.locator("#looked input[type=checkbox]").check()
    wait_for(lambda: len([c for c in pg.locator("#gallery .caption-label").all_inner_texts() if c.endswith("%")]) == 8,
             timeout=timeout)
    time.sleep(1.0)  # the maps load
    pg.evaluate("window.scrollTo(0, 0)")


def test_where_it_looked_at_1280x800_eight_images_readable(page, served):
    demo, url = served
    pg = page
    show_eight_maps(pg, url)
    gallery = pg.locator("#gallery").bounding_box()
    # all eight items lie inside the gallery and the window, none scrolled out of sight
    grid = pg.locator("#gallery .grid-wrap")
    assert grid.evaluate("e => e.scrollHeight <= e.clientHeight + 1"), "the gallery scrolls"
    imgs = pg.locator("#gallery .thumbnail-item img")
    assert imgs.count() == 8
    boxes = [imgs.nth(i).bounding_box() for i in range(8)]
    for b in boxes:
        assert b["y"] >= gallery["y"] and b["y"] + b["height"] <= gallery["y"] + gallery["height"] + 1, (b, gallery)
        assert b["y"] + b["height"] <= 800
        assert b["width"] >= 2 * b["height"] - 4  # the image and its map side by side
    # each caption sits below its picture, not over it
    caps = pg.locator("#gallery .caption-label")
    for i in range(8):
        c = caps.nth(i).bounding_box()
        assert c["y"] >= boxes[i]["y"] + boxes[i]["height"] - 1, (c, boxes[i])
    os.makedirs(os.path.dirname(SCREENSHOT), exist_ok=True)
    pg.screenshot(path=SCREENSHOT)


def test_regenerate_at_temperature_zero_offers_sampling(page, served):
    demo, url = served
    pg = ask_fresh(page, url, "Hello?", 6)
    assert not pg.locator("#sample").is_visible()
    pg.locator("#regenerate").click()
    wait_for(lambda: "Same answer" in pg.locator("#status").inner_text(), timeout=60)
    wait_for(lambda: pg.locator("#sample").is_visible())
    pg.locator("#sample").click()
    wait_for(lambda: "tokens/s" in pg.locator("#status").inner_text() and
             "Same answer" not in pg.locator("#status").inner_text(), timeout=60)
    wait_for(lambda: not pg.locator("#sample").is_visible())
