"""The screenshot of "Where it looked" in assets/screenshots/chat-where-it-looked.png (issue 27): the app
with its shipped default (python app.py --no-compare on a free port), Debian's Chromium at 1280x800 (no
browser is downloaded), two rounds of four example images each, the maps on; the same steps as
tests/e2e/test_first_look.py.

    python bench/screenshot_maps.py [--out assets/screenshots/chat-where-it-looked.png]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)


def main(argv=None) -> int:
    from bench.load_test import _free_port, _wait_up
    from tests.e2e.test_browser import chromium_page
    from tests.e2e.test_first_look import show_eight_maps

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(ROOT, "assets", "screenshots", "chat-where-it-looked.png"))
    a = p.parse_args(argv)
    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--no-compare"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_up(url, proc)
        for pg in chromium_page(1280, 800):
            show_eight_maps(pg, url, ("What color is the star in Image 1?", "Which image has more triangles, "
                                      "Image 5 or Image 6?"), max_tokens=16, timeout=300)
            pg.screenshot(path=a.out)
        print("->", a.out)
    finally:
        proc.terminate()
        proc.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
