"""visualchat.images on hostile files: limits checked on the header before decoding (pixels, each side,
aspect ratio), only the formats a chat needs, bounded decoding, and the app's own words."""
import io
import os
import struct
import subprocess
import sys
import textwrap
import zlib

import pytest
from PIL import Image

from visualchat import images
from visualchat.images import ImageError, open_image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_1bit_png(path, width: int, height: int) -> int:
    """A valid all-black 1-bit greyscale PNG of any size, written row by row (never in memory)."""
    row = b"\x00" + b"\x00" * ((width + 7) // 8)  # filter byte + packed bits
    z = zlib.compressobj(9)
    parts = []
    block = row * max(1, (1 << 20) // len(row))
    rows_per_block = len(block) // len(row)
    left = height
    while left:
        n = min(left, rows_per_block)
        parts.append(z.compress(block[: n * len(row)]))
        left -= n
    parts.append(z.flush())
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)))
        f.write(_chunk(b"IDAT", b"".join(parts)))
        f.write(_chunk(b"IEND", b""))
    return os.path.getsize(path)


PEAK_SCRIPT = textwrap.dedent("""
    import resource, sys, time
    from visualchat.images import ImageError, open_image
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.time()
    try:
        open_image(sys.argv[1])
        outcome = "opened"
    except ImageError as e:
        outcome = "refused: " + str(e)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((after - before) // 1024, round(time.time() - t0, 2), outcome, sep="\\t")
""")


def test_thin_image_is_refused_on_its_header_with_flat_peak_memory(tmp_path):
    """The issue's 1 x 39,000,000 1-bit PNG (75 KB): under the pixel limit, but decoding it took GBs.
    Measured in a fresh process by its peak RSS (ru_maxrss), not by time."""
    path = tmp_path / "thin.png"
    size = write_1bit_png(path, 1, 39_000_000)
    assert size < 200_000
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("VISUALCHAT_MAX_SIDE", None)
    env.pop("VISUALCHAT_MAX_ASPECT", None)
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(path)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    grew_mb, seconds, outcome = out.stdout.strip().split("\t", 2)
    assert outcome.startswith("refused: thin.png is 1x39000000 pixels"), outcome
    assert "16,384 pixels on a side" in outcome and "VISUALCHAT_MAX_SIDE" not in outcome  # the operator's knob
    assert int(grew_mb) < 50, f"opening the thin PNG raised the peak RSS by {grew_mb} MB"


def test_side_and_aspect_limits(tmp_path):
    wide = tmp_path / "banner.png"
    Image.new("RGB", (2000, 10)).save(wide)
    with pytest.raises(ImageError, match=r"banner.png is 2000x10 pixels, 200 times as long as it is wide; .*64:1"):
        open_image(str(wide))
    ok = tmp_path / "panorama.png"
    Image.new("RGB", (1280, 40)).save(ok)  # 32:1 is fine
    assert open_image(str(ok)).size == (1280, 40)
    tall = tmp_path / "tall.png"
    write_1bit_png(tall, 300, 20_000)  # 6 M pixels, aspect 67 and a side over 16,384
    with pytest.raises(ImageError, match="16,384 pixels on a side"):
        open_image(str(tall))


def test_pillow_bomb_error_is_said_in_the_apps_words(tmp_path):
    """Over twice Pillow's own MAX_IMAGE_PIXELS, Image.open itself raises; the user sees our limit."""
    huge = tmp_path / "huge.png"
    write_1bit_png(huge, 15_000, 15_000)  # 225 M pixels
    with pytest.raises(ImageError) as e:
        open_image(str(huge))
    msg = str(e.value)
    assert "huge.png has 225,000,000 pixels; this app accepts images of up to 40,000,000 pixels" in msg
    assert "DOS attack" not in msg and "exceeds limit" not in msg
    mid = tmp_path / "mid.png"
    write_1bit_png(mid, 10_000, 10_000)  # 100 M: Pillow only warns; our limit speaks
    with pytest.raises(ImageError) as e:
        open_image(str(mid))
    assert "mid.png is 10000x10000 = 100,000,000 pixels; this app accepts images of up to 40,000,000" in str(e.value)
    assert "DOS attack" not in str(e.value)


EPS = b"""%!PS-Adobe-3.0 EPSF-3.0
%%BoundingBox: 0 0 10 10
%%EndComments
newpath 0 0 moveto 10 10 lineto stroke
showpage
%%EOF
"""


def test_only_chat_formats_are_opened_eps_never_reaches_ghostscript(tmp_path, monkeypatch):
    from PIL import EpsImagePlugin

    calls = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: calls.append(a) or (_ for _ in ()).throw(
        OSError("Ghostscript was run")))
    eps = tmp_path / "drawing.eps"
    eps.write_bytes(EPS)
    with pytest.raises(ImageError, match=r"drawing.eps is not an image file this app opens \(it accepts PNG, JPEG"):
        open_image(str(eps))
    assert calls == []
    tif = tmp_path / "scan.tif"
    Image.new("RGB", (8, 8)).save(tif)
    with pytest.raises(ImageError, match="not an image file this app opens"):
        open_image(str(tif))
    for fmt in ("PNG", "JPEG", "GIF", "WEBP", "BMP"):
        buf = io.BytesIO()
        Image.new("RGB", (12, 9), (200, 10, 10)).save(buf, format=fmt)
        assert open_image(buf.getvalue()).size == (12, 9), fmt


def test_large_jpeg_is_decoded_reduced(tmp_path, monkeypatch):
    path = tmp_path / "photo.jpg"
    Image.new("RGB", (6000, 3000), (10, 200, 30)).save(path, quality=50)
    seen = []
    orig = Image.Image.load

    def load(self):
        seen.append(self.size)  # the size the decoder produces (after draft)
        return orig(self)

    monkeypatch.setattr(Image.Image, "load", load)
    im = open_image(str(path))
    assert max(im.size) <= images.DECODE_MAX_SIDE and abs(im.size[0] / im.size[1] - 2) < 0.01
    assert seen and max(seen[0]) <= 3000, f"the JPEG decoder produced {seen[0]}"
    px = im.getpixel((10, 10))
    assert abs(px[0] - 10) < 8 and abs(px[1] - 200) < 8
