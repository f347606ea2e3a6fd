"""End to end in a real headless Chromium (Debian's `chromium`, driven by Playwright through
executable_path; no browser is ever downloaded). The app runs in this process on tiny models whose
forwards are slowed down, so that streaming is visible and Stop lands mid-answer. Screenshots go to
test-artifacts/e2e/."""
import os
import shutil
import tempfile
import time

import pytest

from tests.test_app import Slow, build_tiny_models
from tests.test_app_client import serve

CHROMIUM = os.environ.get("VISUALCHAT_CHROMIUM", "/usr/bin/chromium")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARTIFACTS = os.path.join(ROOT, "test-artifacts", "e2e")
EXAMPLES = os.path.join(ROOT, "assets", "examples")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = [
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is missing: install Debian's chromium "
                       "(apt-get install -y chromium) to run the browser test"),
]


@pytest.fixture(scope="module")
def app_url(tiny_tokenizer, tiny_clip_dir):
    import app

    chat, ca, mm = build_tiny_models(tiny_tokenizer, tiny_clip_dir)
    slow = [Slow(vc, delay=0.03) for vc in (chat, ca, mm)]
    for s in slow:
        s.__enter__()
    demo = app.build_demo(chat, compare=(ca, mm), concurrency=2)
    url = serve(demo)
    yield url
    demo.close()
    for s in slow:
        s.__exit__(None, None, None)


def chromium_page(width: int, height: int):
    """A page of Debian's Chromium (driven by Playwright, nothing downloaded) in a fresh profile, at
    ``width`` x ``height``; a generator for a fixture to yield from."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (never `playwright install`)")
    profile = tempfile.mkdtemp(prefix="vc-chromium-")
    with sync_api.sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True, args=ARGS,
                                                   viewport={"width": width, "height": height})
        pg = ctx.new_page()
        pg.set_default_timeout(30_000)
        yield pg
        ctx.close()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def page(app_url):
    os.makedirs(ARTIFACTS, exist_ok=True)
    for pg in chromium_page(1366, 768):
        pg.goto(app_url)
        pg.wait_for_selector("#message textarea")
        yield pg


def shot(pg, name):
    pg.screenshot(path=os.path.join(ARTIFACTS, name))


def bot_texts(pg, chatbot="#chatbot"):
    rows = pg.locator(f"{chatbot} .bot-row")
    return [rows.nth(i).inner_text().strip() for i in range(rows.count())]


def wait_for(cond, timeout=30.0, every=0.05):
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = cond()
        if v:
            return v
        time.sleep(every)
    raise AssertionError("timed out")


def set_max_tokens(pg, n: int, close: bool = True):
    """Max new tokens set to ``n`` in the Generation settings, and seen to hold: the slider under the
    number box moves only once the component's value changed (typing alone raced the next click on a
    slow CI machine, and the answer ran past the intended cap)."""
    pg.get_by_text("Generation settings", exact=True).click()
    box = pg.locator("#max-new-tokens input[type=number]")
    slider = pg.locator("#max-new-tokens input[type=range]")
    for _ in range(3):
        box.fill(str(n))
        box.press("Tab")  # blur commits the value
        try:
            wait_for(lambda: slider.input_value() == str(n) and box.input_value() == str(n), timeout=5)
            break
        except AssertionError:
            continue
    else:
        raise AssertionError(f"Max new tokens did not take {n}: box {box.input_value()}, slider {slider.input_value()}")
    if close:
        pg.get_by_text("Generation settings", exact=True).click()


def attach_and_send(pg, box, files, text):
    pg.locator(f"{box} input[type=file]").set_input_files(files)
    wait_for(lambda: pg.locator(f"{box} img").count() >= len(files))  # the upload previews are shown
    pg.locator(f"{box} textarea").fill(text)
    pg.locator(f"{box} textarea").press("Enter")


def test_chat_upload_two_images_stream_stop_and_compare(page):
    pg = page
    shot(pg, "0-start.png")
    # 1. two images and a question; the answer streams in
    attach_and_send(pg, "#message", [os.path.join(EXAMPLES, "shapes_2.png"), os.path.join(EXAMPLES, "shapes_3.png")],
                    "What is different between Image 1 and Image 2?")
    lengths = []

    def grows():
        t = bot_texts(pg)
        if t and t[-1] not in ("", "(generating…)"):
            lengths.append(len(t[-1]))
        return len(set(lengths)) >= 3  # several different lengths seen: text arrived piece by piece

    wait_for(grows)
    shot(pg, "1-streaming.png")
    wait_for(lambda: "tokens/s" in pg.locator("#status").inner_text(), timeout=60)
    captions = pg.locator("#gallery").inner_text()
    assert "Image 1" in captions and "Image 2" in captions
    assert pg.locator("#chatbot .user-row img").count() == 2  # the images beside the round that brought them
    shot(pg, "2-answered.png")

    # 2. a long answer, stopped half-way: the partial answer stays
    set_max_tokens(pg, 300)
    pg.locator("#message textarea").fill("Tell me a long story about Image 2.")
    pg.locator("#message textarea").press("Enter")
    wait_for(lambda: len(bot_texts(pg)) == 2 and len(bot_texts(pg)[-1]) > 20)
    pg.locator("#stop").click()
    wait_for(lambda: "Stopped" in pg.locator("#status").inner_text(), timeout=30)
    kept = bot_texts(pg)[-1]
    time.sleep(1.0)
    assert bot_texts(pg)[-1] == kept and len(kept) > 20  # nothing more arrives; the partial answer stays
    shot(pg, "3-stopped.png")
    pg.get_by_text("Prompt as the model sees it").click()
    wait_for(lambda: "[Image 2: 16 tokens]" in pg.locator("#prompt textarea").input_value())
    shot(pg, "4-prompt.png")

    # 3. the Compare tab: one question, two answers
    pg.get_by_role("tab", name="Compare CA vs MMCA").click()
    pg.wait_for_selector("#compare-message textarea")
    attach_and_send(pg, "#compare-message", [os.path.join(EXAMPLES, "shapes_1.png")], "What color is the star in Image 1?")
    wait_for(lambda: all(bot_texts(pg, c) and bot_texts(pg, c)[-1] not in ("", "(generating…)") for c in ("#chat-ca", "#chat-mmca")),
             timeout=60)
    shot(pg, "5-compare-streaming.png")
    wait_for(lambda: len(pg.locator("#compare-status").inner_text().strip()) == 0 and
             pg.locator("#chat-ca .bot-row").count() == 1 and pg.locator("#chat-mmca .bot-row").count() == 1, timeout=60)
    time.sleep(4.5)  # both finish (128 tokens each at 30 ms a forward, interleaved)
    ca, mm = bot_texts(pg, "#chat-ca")[-1], bot_texts(pg, "#chat-mmca")[-1]
    assert ca and mm and ca != mm
    shot(pg, "6-compare.png")


def classes(pg, sel):
    return (pg.locator(sel).get_attribute("class") or "").split()


def gallery_captions(pg, gallery):
    return pg.locator(f"{gallery} .caption-label").all_inner_texts()


def test_stop_trash_icon_and_where_it_looked_in_the_chat_tab(page, app_url):
    pg = page
    pg.goto(app_url)
    pg.wait_for_selector("#message textarea")
    # idle: Stop is neither enabled nor red
    assert pg.locator("#stop").is_disabled() and "stop" not in classes(pg, "#stop")
    attach_and_send(pg, "#message", [os.path.join(EXAMPLES, "shapes_2.png"), os.path.join(EXAMPLES, "shapes_3.png")],
                    "What is different between Image 1 and Image 2?")
    wait_for(lambda: pg.locator("#stop").is_enabled() and "stop" in classes(pg, "#stop"))  # while answering
    wait_for(lambda: "tokens/s" in pg.locator("#status").inner_text(), timeout=60)
    wait_for(lambda: pg.locator("#stop").is_disabled() and "stop" not in classes(pg, "#stop"))  # idle again
    # where it looked: every gallery image gets its map and its share
    pg.locator("#looked input[type=checkbox]").check()
    wait_for(lambda: len([c for c in gallery_captions(pg, "#gallery") if c.endswith("%")]) == 2, timeout=60)
    assert "Where it looked" in pg.locator("#looked-note").inner_text()
    shares = [int(c.split(" · ")[1].split("%")[0]) for c in gallery_captions(pg, "#gallery")]
    assert abs(sum(shares) - 100) <= 1
    time.sleep(0.5)  # the overlays load
    shot(pg, "7-chat-where-it-looked.png")
    # the chat panel's trash icon clears like Clear: the gallery and the prompt too, and nothing comes back
    pg.locator("#chatbot button[aria-label='Clear']").click()
    wait_for(lambda: pg.locator("#gallery img").count() == 0 and pg.locator("#chatbot .bot-row").count() == 0)
    pg.get_by_text("Prompt as the model sees it").click()
    wait_for(lambda: "### Question" not in pg.locator("#prompt textarea").input_value())
    pg.locator("#message textarea").fill("Hello?")
    pg.locator("#message textarea").press("Enter")
    wait_for(lambda: "tokens/s" in pg.locator("#status").inner_text(), timeout=60)
    assert pg.locator("#chatbot .user-row").count() == 1 and pg.locator("#gallery img").count() == 0
    assert "What is different" not in pg.locator("#prompt textarea").input_value()


def test_compare_stop_note_trash_icon_and_both_maps(page, app_url):
    pg = page
    pg.goto(app_url)
    pg.wait_for_selector("#message textarea")
    set_max_tokens(pg, 300, close=False)  # long answers (the settings serve both tabs), to stop one
    pg.get_by_role("tab", name="Compare CA vs MMCA").click()
    pg.wait_for_selector("#compare-message textarea")
    assert pg.locator("#compare-stop").is_disabled() and "stop" not in classes(pg, "#compare-stop")
    attach_and_send(pg, "#compare-message", [os.path.join(EXAMPLES, "shapes_1.png")], "Describe Image 1 at length.")
    wait_for(lambda: pg.locator("#compare-stop").is_enabled() and "stop" in classes(pg, "#compare-stop"))
    wait_for(lambda: all(bot_texts(pg, c) and len(bot_texts(pg, c)[-1]) > 5 for c in ("#chat-ca", "#chat-mmca")))
    pg.locator("#compare-stop").click()
    wait_for(lambda: "Stopped" in pg.locator("#compare-status").inner_text(), timeout=30)
    note = pg.locator("#compare-status").inner_text()
    assert "Regenerate" not in note and "partial answer is kept" in note  # this tab has no Regenerate
    wait_for(lambda: pg.locator("#compare-stop").is_disabled())
    # a second round with a second image, answered in full; then both models' maps side by side
    attach_and_send(pg, "#compare-message", [os.path.join(EXAMPLES, "shapes_4.png")],
                    "Which image has more squares, Image 1 or Image 2?")
    wait_for(lambda: pg.locator("#chat-ca .bot-row").count() == 2 and pg.locator("#compare-stop").is_disabled(),
             timeout=90)
    pg.locator("#compare-looked input[type=checkbox]").check()
    wait_for(lambda: [c.rsplit(" ", 1)[0] for c in gallery_captions(pg, "#compare-gallery")] ==
             ["Image 1 · CA", "Image 1 · MMCA", "Image 2 · CA", "Image 2 · MMCA"], timeout=60)
    note = pg.locator("#compare-looked-note").inner_text()
    assert "went to image tokens at all" in note and "MMCA uses MMCA" in note
    time.sleep(0.5)
    shot(pg, "8-compare-where-it-looked.png")
    # a column's trash icon clears the comparison (both columns and the gallery)
    pg.locator("#chat-ca button[aria-label='Clear']").click()
    wait_for(lambda: pg.locator("#chat-ca .bot-row").count() == 0 and pg.locator("#chat-mmca .bot-row").count() == 0
             and pg.locator("#compare-gallery img").count() == 0)
