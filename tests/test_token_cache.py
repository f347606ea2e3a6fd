"""Tokenize once per node (visualchat_train/token_cache.py): the rendered samples are written to a cached index
by the first build and read back by the next one (no tokenization), and any change of the data, the
length limit or the tokenizer gives another index."""
import json
import os

import pytest

from tests.test_data_loaders import COLORS, write_img


def _write_data(folder, answer="A red square."):
    imgs = [os.path.basename(write_img(folder / f"im{i}.jpg", COLORS[i])) for i in range(4)]
    lines = []
    for i in range(12):
        rounds = [{"images": [imgs[i % 4]], "question": f"What is in Image 1? ({i})", "answer": answer},
                  {"images": [imgs[(i + 1) % 4]], "question": "And in Image 2?", "answer": "Blue " * (i + 1)}]
        lines.append(json.dumps({"rounds": rounds}))
    path = folder / "chats.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _build(path, tok, max_seq_len=64):
    from visualchat_train.samples import build_samples
    from visualchat.template import Template

    return build_samples(["jsonl"], path, template=Template(tok, 3), val_ratio=0.25, seed=0,
                         max_seq_len=max_seq_len, image_check="node")


def _as_tuples(samples):
    return [(s.input_ids, [bool(x) for x in s.is_image], s.labels, s.images, s.source) for s in samples]


@pytest.fixture
def counted_render(monkeypatch):
    from visualchat.template import Template

    calls = []
    real = Template.render
    monkeypatch.setattr(Template, "render", lambda self, c, *a, **k: calls.append(1) or real(self, c, *a, **k))
    return calls


def test_second_build_reads_the_token_index(tmp_path, monkeypatch, tiny_tokenizer, counted_render):
    monkeypatch.setenv("VISUALCHAT_CACHE", str(tmp_path / "cache"))
    path = _write_data(tmp_path)
    tr1, va1, st1 = _build(path, tiny_tokenizer)
    assert counted_render and os.listdir(tmp_path / "cache" / "token_index")
    # the length cut was exercised: some conversations lost rounds
    assert st1.as_dict().get("jsonl/cut_rounds", 0) > 0
    counted_render.clear()
    tr2, va2, st2 = _build(path, tiny_tokenizer)
    assert counted_render == [], "the second build tokenized again instead of reading the index"
    assert _as_tuples(tr2) == _as_tuples(tr1) and _as_tuples(va2) == _as_tuples(va1)
    assert st2.as_dict() == st1.as_dict()
    assert all(type(x) is int for s in tr2 for x in s.input_ids + s.labels)


def test_a_change_invalidates_the_token_index(tmp_path, monkeypatch, tiny_tokenizer, counted_render):
    from visualchat_train.tiny import build_tokenizer

    monkeypatch.setenv("VISUALCHAT_CACHE", str(tmp_path / "cache"))
    index = tmp_path / "cache" / "token_index"
    path = _write_data(tmp_path)
    tr1, _, _ = _build(path, tiny_tokenizer)
    assert len(os.listdir(index)) == 1
    # the data: one answer changed
    counted_render.clear()
    _write_data(tmp_path, answer="A green circle.")
    tr2, _, _ = _build(path, tiny_tokenizer)
    assert counted_render and len(os.listdir(index)) == 2
    assert _as_tuples(tr2) != _as_tuples(tr1)
    # an image file changed (its key: path, size, mtime)
    counted_render.clear()
    write_img(tmp_path / "im0.jpg", COLORS[5])
    os.utime(tmp_path / "im0.jpg", ns=(1, 1))
    _build(path, tiny_tokenizer)
    assert counted_render and len(os.listdir(index)) == 3
    # the length limit
    counted_render.clear()
    _build(path, tiny_tokenizer, max_seq_len=80)
    assert counted_render and len(os.listdir(index)) == 4
    # the tokenizer
    counted_render.clear()
    _build(path, build_tokenizer())
    assert counted_render and len(os.listdir(index)) == 5


def test_a_stale_or_unreadable_index_is_rebuilt_here(tmp_path, monkeypatch, tiny_tokenizer, counted_render):
    monkeypatch.setenv("VISUALCHAT_CACHE", str(tmp_path / "cache"))
    path = _write_data(tmp_path)
    tr1, _, _ = _build(path, tiny_tokenizer)
    (f,) = os.listdir(tmp_path / "cache" / "token_index")
    (tmp_path / "cache" / "token_index" / f).write_bytes(b"garbage")
    counted_render.clear()
    monkeypatch.setattr("visualchat_train.dist.local_rank", lambda: 1)  # a rank that reads what local rank 0 wrote
    tr2, _, _ = _build(path, tiny_tokenizer)
    assert counted_render and _as_tuples(tr2) == _as_tuples(tr1)
