"""The trainer's on-disk cache of frozen-encoder features (visualchat_train/features.py)."""
import base64
import io
import os
import threading
import time

import pytest
import torch

from tests.conftest import color_image
from visualchat_train.data import shapes as S
from visualchat_train.features import FeatureCache, encoder_key, image_key


@pytest.fixture
def encoder(tiny_clip_dir):
    """A tiny CLIP encoder that counts the images it encodes (slowly, so fills can overlap)."""
    from visualchat.encoders import build_encoder

    enc = build_encoder("clip:" + tiny_clip_dir)
    enc.calls, enc.seen = 0, []
    real = enc.encode

    def counting(images):
        enc.calls += 1
        enc.seen += [im.getpixel((0, 0)) for im in images]
        time.sleep(0.05)
        return real(images)

    enc.encode = counting
    return enc


def _pngs(tmp_path, n):
    paths = []
    for i in range(n):
        p = tmp_path / f"im{i}.png"
        color_image((10 * i, 0, 255 - 10 * i)).save(p)
        paths.append(str(p))
    return paths


def test_image_keys(tmp_path):
    lazy = S.generate("train", 1)[0].conversation.images[0]
    assert image_key(lazy).startswith(f"shapes-v{S.SHAPES_VERSION}-{lazy.scene.id}-")
    (path,) = _pngs(tmp_path, 1)
    k = image_key(path)
    assert k.startswith("file-") and image_key(path) == k
    color_image((1, 2, 3), size=(50, 50)).save(path)  # the file changed: a new key
    assert image_key(path) != k
    buf = io.BytesIO()
    color_image((9, 9, 9)).save(buf, format="PNG")
    assert image_key("base64:" + base64.b64encode(buf.getvalue()).decode()).startswith("b64-")
    assert image_key(color_image((0, 0, 0))) is None  # in memory: not cacheable
    assert image_key(str(tmp_path / "missing.png")) is None


def test_fill_computes_each_image_once_and_reports_bad_ones(tmp_path, encoder):
    paths = _pngs(tmp_path, 5)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    cache = FeatureCache(str(tmp_path / "cache"), encoder)
    errors = cache.fill(encoder, paths + [paths[0], str(bad)], batch_size=2, progress=False)
    assert list(errors) == [image_key(str(bad))] and "bad.png" in next(iter(errors.values()))
    assert len(encoder.seen) == 5  # the duplicate reference was encoded once
    direct = encoder.encode([color_image((0, 0, 255))])[0]
    torch.testing.assert_close(cache.get(image_key(paths[0])), direct.float(), atol=2e-3, rtol=2e-3)  # stored fp16
    encoder.seen.clear()
    assert cache.fill(encoder, paths, progress=False) == {} and encoder.seen == []  # all cached already


def test_ranks_fill_disjoint_shares(tmp_path, encoder):
    paths = _pngs(tmp_path, 7)
    shares = []
    for rank in (0, 1):  # both ranks look at the same empty cache
        encoder.seen.clear()
        FeatureCache(str(tmp_path / f"cache{rank}"), encoder).fill(encoder, paths, rank=rank, world=2, progress=False)
        shares.append(set(encoder.seen))
    assert len(shares[0]) == 4 and len(shares[1]) == 3 and not shares[0] & shares[1]


def test_two_runs_filling_at_once_compute_each_image_once(tmp_path, encoder):
    """Two runs started together (CA and MMCA side by side) share the work instead of doubling it."""
    paths = _pngs(tmp_path, 12)
    root = str(tmp_path / "cache")
    caches = [FeatureCache(root, encoder), FeatureCache(root, encoder)]
    threads = [threading.Thread(target=c.fill, args=(encoder, paths), kwargs={"batch_size": 2, "progress": False})
               for c in caches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(encoder.seen) == 12 and len(set(encoder.seen)) == 12
    assert all(caches[0].has(image_key(p)) for p in paths)


def test_another_encoder_gets_another_folder(tmp_path, encoder, tiny_clip_dir):
    from visualchat.encoders import build_encoder

    other = build_encoder("clip:" + tiny_clip_dir)
    assert encoder_key(other) == encoder_key(encoder)
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    assert encoder_key(other) != encoder_key(encoder)
    assert os.path.basename(FeatureCache(str(tmp_path), other).dir) == encoder_key(other)


def test_a_pool_of_workers_fills_the_same_features(tmp_path, encoder, monkeypatch):
    """Images opened (shapes scenes drawn) in worker processes give the same cache as opening them here;
    a bad image is still reported, and every image is encoded once, in order."""
    import visualchat_train.features as F

    monkeypatch.setattr(F, "MIN_PER_WORKER", 2)  # start the pool for a short list
    refs = [img for smp in S.generate("train", 4, seed=3) for r in smp.conversation.rounds for img in r.images]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    refs = refs + [str(bad)]
    one = FeatureCache(str(tmp_path / "one"), encoder)
    err1 = one.fill(encoder, refs, batch_size=3, progress=False, workers=1)
    n1 = len(encoder.seen)
    pooled = FeatureCache(str(tmp_path / "pool"), encoder)
    err2 = pooled.fill(encoder, refs, batch_size=3, progress=False, workers=2)
    assert err1.keys() == err2.keys() == {image_key(str(bad))}
    assert encoder.seen[n1:] == encoder.seen[:n1]  # same images, same order
    for r in refs[:-1]:
        assert torch.equal(one.get(image_key(r)), pooled.get(image_key(r)))
