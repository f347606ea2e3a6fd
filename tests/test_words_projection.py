"""visualchat/projection.py's ``words`` projection (per-cell classifiers read out as the LM's own word
embeddings), its concept space in the checkpoint config, the trainer's --aux_loss, and sharded checkpoints."""
import json
import os

import pytest
import torch

from tests.conftest import color_image, tiny_llama
from tests.test_model import _logits
from tests.test_model import _saved_base as _base
from visualchat.checkpoint import INDEX_NAME, WEIGHTS_NAME, load_tensors, shard
from visualchat.config import VisualChatConfig
from visualchat.encoders import build_encoder
from visualchat.model import VisualChat
from visualchat.projection import Projection, Words, check_concepts


def concepts_for(cells: int) -> dict:
    names = ["top left", "center"] + [f"cell {i}" for i in range(2, cells)]
    return {"cells": names[:cells], "cell_heads": {"color": ["empty", "red", "blue"], "shape": ["empty", "circle"]},
            "image_heads": {"word": {"cells": [0, 1], "labels": ["none", "cat"]}}}


def _words_vc(tok, clip_dir):
    enc = build_encoder("clip:" + clip_dir)
    return VisualChat.from_components(tiny_llama(tok), tok, enc, vis_proj="words",
                                      concepts=concepts_for(enc.num_tokens)), enc


def test_rows_are_the_words_of_each_cell_and_head(tiny_tokenizer, tiny_clip_dir):
    vc, enc = _words_vc(tiny_tokenizer, tiny_clip_dir)
    net = vc.model.projection.net
    cells = enc.num_tokens
    # 2 name words + 2 cell heads per cell, then "word" and its value
    assert vc.model.image_tokens == vc.config.image_tokens == cells * 4 + 2
    emb = vc.model.base_embedding
    row = lambda w: emb[tiny_tokenizer.encode(" " + w, add_special_tokens=False)].float().mean(0)  # noqa: E731
    with torch.no_grad():  # make every head certain: colour "blue", shape "circle", word "cat"
        for h, k in (("color", 2), ("shape", 1)):
            net.cell_out[h].weight.zero_()
            net.cell_out[h].bias.copy_(torch.full((net.cell_out[h].bias.numel(),), -50.0))
            net.cell_out[h].bias[k] = 50.0
        last = net.image_out["word"][-1]
        last.weight.zero_()
        last.bias.copy_(torch.tensor([-50.0, 50.0]))
    out = vc.model.project(torch.randn(3, cells, enc.hidden_size))  # [3, K, H]
    assert out.shape == (3, cells * 4 + 2, emb.shape[1])
    for i in range(3):
        torch.testing.assert_close(out[i, 0], row("top"))
        torch.testing.assert_close(out[i, 1], row("left"))
        torch.testing.assert_close(out[i, 2], row("blue"))
        torch.testing.assert_close(out[i, 3], row("circle"))
        torch.testing.assert_close(out[i, 4], row("center"))  # a one-word cell name ends with ","
        torch.testing.assert_close(out[i, 5], row(","))
        torch.testing.assert_close(out[i, -2], row("word"))
        torch.testing.assert_close(out[i, -1], row("cat"))
    pred = net.predict(torch.randn(1, cells, enc.hidden_size))[0]
    assert pred["word"] == "cat" and pred["cells"][0] == {"color": "blue", "shape": "circle"}


def test_the_aux_loss_trains_the_heads_to_the_labels(tiny_tokenizer, tiny_clip_dir):
    torch.manual_seed(0)
    vc, enc = _words_vc(tiny_tokenizer, tiny_clip_dir)
    net = vc.model.projection.net
    cells = enc.num_tokens
    feats = torch.randn(8, cells, enc.hidden_size)
    labels = torch.randint(0, 2, (8, cells * 2 + 1))
    labels[0, 0] = -100  # unlabelled entries are ignored
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    first = float(net.aux_loss(feats, labels).detach())
    for _ in range(60):
        loss = net.aux_loss(feats, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(net.aux_loss(feats, labels)) < 0.05 < first
    assert all(not p.requires_grad for p in (net.cell_names, net.head_names, *net.tables.values()))


def test_a_words_checkpoint_saves_and_loads_with_its_concepts(tmp_path, tiny_tokenizer, tiny_clip_dir):
    lm_dir = _base(tmp_path, tiny_tokenizer)
    enc = build_encoder("clip:" + tiny_clip_dir)
    vc = VisualChat.from_components(tiny_llama(tiny_tokenizer), tiny_tokenizer, enc, lm_spec=lm_dir, vis_proj="words",
                                    concepts=concepts_for(enc.num_tokens))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in vc.model.projection.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    vc.save_pretrained(str(tmp_path / "ckpt"))
    cfg = json.load(open(tmp_path / "ckpt" / "config.json"))
    assert cfg["vis_proj"] == "words" and cfg["concepts"] == concepts_for(enc.num_tokens)
    vc2 = VisualChat.from_pretrained(str(tmp_path / "ckpt"), device="cpu")
    for (k, a), b in zip(vc.model.projection.state_dict().items(), vc2.model.projection.state_dict().values()):
        assert torch.equal(a, b), k
    torch.testing.assert_close(_logits(vc2), _logits(vc), atol=1e-5, rtol=1e-5)
    s = vc2.new_session()
    s.stream("Image 1?", images=[color_image((0, 200, 0))]).close()
    assert sum(s._render().is_image) == vc2.model.image_tokens


@pytest.mark.parametrize("bad, why", [
    ({"cells": [], "cell_heads": {"a": ["x", "y"]}, "image_heads": {}}, "cells"),
    ({"cells": ["a"], "cell_heads": {"a": ["x"]}, "image_heads": {}}, "two labels"),
    ({"cells": ["a"], "cell_heads": {"a": ["x", "y"]}, "image_heads": {"w": {"cells": [3], "labels": ["n", "c"]}}},
     "indices"),
    ({"cells": ["a"]}, "exactly the keys"),
])
def test_a_malformed_concept_space_is_refused(bad, why):
    with pytest.raises(ValueError, match=why):
        check_concepts(bad)


def test_words_needs_concepts_and_a_cell_per_token():
    with pytest.raises(ValueError, match="concept space"):
        Projection("words", 8, 4, 9)
    with pytest.raises(ValueError, match="9 cells named, but the encoder gives 49"):
        Words(8, 4, 49, {"cells": [f"c {i}" for i in range(9)], "cell_heads": {"a": ["x", "y"]}, "image_heads": {}})
    with pytest.raises(ValueError, match="concepts"):
        VisualChatConfig(vis_proj="words")  # a words config without its concept space
    with pytest.raises(ValueError, match="concepts"):
        VisualChatConfig(vis_proj="linear", concepts=concepts_for(2))


def test_shard_splits_big_tensors_and_load_joins_them(tmp_path, tiny_tokenizer, tiny_clip_dir):
    t = {"a": torch.randn(3_000_000), "b": torch.randn(10), "c": torch.randn(4000, 1000)}
    parts = shard(t, limit=10_000_000)
    assert all(sum(v.numel() * v.element_size() for v in p.values()) <= 10_000_000 for p in parts)
    assert len(parts) == 4 and "a@1" in parts[1]
    # a checkpoint over the limit is written in shards with an index, and loads exactly
    lm_dir = _base(tmp_path, tiny_tokenizer)
    enc = build_encoder("clip:" + tiny_clip_dir)
    vc = VisualChat.from_components(tiny_llama(tiny_tokenizer), tiny_tokenizer, enc, lm_spec=lm_dir,
                                    vis_proj="perceiver:4")
    from visualchat import checkpoint

    before = checkpoint.SHARD_BYTES
    checkpoint.SHARD_BYTES = 20_000  # tiny model: force shards
    try:
        vc.save_pretrained(str(tmp_path / "ckpt"))
    finally:
        checkpoint.SHARD_BYTES = before
    files = sorted(os.listdir(tmp_path / "ckpt"))
    assert INDEX_NAME in files and WEIGHTS_NAME not in files
    shards = [f for f in files if f.startswith("trainable-")]
    assert len(shards) > 2 and all(os.path.getsize(tmp_path / "ckpt" / f) <= 20_000 + 4096 for f in shards)
    loaded = load_tensors(str(tmp_path / "ckpt"))
    for k, v in vc.model.projection.checkpoint_tensors().items():
        assert torch.equal(loaded[k], v.detach()), k
    vc2 = VisualChat.from_pretrained(str(tmp_path / "ckpt"), device="cpu")
    torch.testing.assert_close(_logits(vc2), _logits(vc), atol=1e-5, rtol=1e-5)
    # saved again small: the shards and the index go, one file stays
    vc2.save_pretrained(str(tmp_path / "ckpt"))
    assert sorted(f for f in os.listdir(tmp_path / "ckpt") if f.startswith("trainable")) == [WEIGHTS_NAME]
    # a missing shard is named
    checkpoint.SHARD_BYTES = 20_000
    try:
        vc.save_pretrained(str(tmp_path / "ckpt2"))
    finally:
        checkpoint.SHARD_BYTES = before
    os.remove(tmp_path / "ckpt2" / sorted(f for f in os.listdir(tmp_path / "ckpt2") if f.startswith("trainable-"))[0])
    with pytest.raises(FileNotFoundError, match="missing"):
        load_tensors(str(tmp_path / "ckpt2"))
