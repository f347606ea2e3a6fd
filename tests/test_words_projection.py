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
    assert float(net.aux_loss(feats, labels).detach()) < 0.05 < first
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
    vc2 = VisualChat.from_pretrained(str(tmp_path / "ckpt"), device="cpu", lm_weights="fp32")
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
    vc2 = VisualChat.from_pretrained(str(tmp_path / "ckpt"), device="cpu", lm_weights="fp32")
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


# -- the trainer's side: per-image labels, --aux_loss, --detach_image_rows, --lora_layers -----------------
def test_concept_labels_follow_the_scene_graph():
    from visualchat_train.data.shapes import CONCEPTS, Obj, Scene, concept_labels

    check_concepts(CONCEPTS, 9)
    sc = Scene("white", (Obj("star", "blue", "large", 0), Obj("circle", "red", "small", 8)), "cat")
    y = concept_labels(sc)
    heads = CONCEPTS["cell_heads"]
    assert len(y) == 9 * 3 + 1
    assert y[0:3] == [heads["size"].index("large"), heads["color"].index("blue"), heads["shape"].index("star")]
    assert y[24:27] == [heads["size"].index("small"), heads["color"].index("red"), heads["shape"].index("circle")]
    assert y[3:24] == [0] * 21  # empty cells
    assert CONCEPTS["image_heads"]["word"]["labels"][y[-1]] == "cat"
    assert concept_labels(Scene("gray", (Obj("star", "blue", "large", 0),)))[-1] == 0  # no word: "none"


def test_collate_gives_per_image_labels_only_for_labelled_images(tiny_tokenizer):
    from visualchat_train.batches import Batcher
    from visualchat_train.data.shapes import concept_labels, generate
    from visualchat_train.samples import Sample

    s = generate("train", 1, 0)[0]
    refs = [im for r in s.conversation.rounds for im in r.images]
    labelled = Sample([1, 2, 3], [False, True, False], [-100, -100, 3], refs[:1])
    plain = Sample([1, 2], [False, False], [-100, 2], [])
    b = Batcher([], 2, 1, 0, 0, encoder=build_encoder("efficientnet-lite0:head@3"))
    batch = b.collate([labelled, plain], to_device=False)
    assert batch["image_labels"].tolist() == [concept_labels(refs[0].scene)]
    assert "image_labels" not in b.collate([plain], to_device=False)


def _module(tok, aux: float, detach: bool = False):
    from visualchat_train.model import TrainModule
    from visualchat_train.tiny import random_lm

    lm = random_lm(tok, "llama", 0, keep_rng=False, **{"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                                      "num_attention_heads": 4, "num_key_value_heads": 2,
                                                      "tie_word_embeddings": True})
    from visualchat.encoders.base import VisionEncoder
    from visualchat.model import VisualChatModel

    class Grid(VisionEncoder):  # 9 tokens of 8 dims: one per cell
        hidden_size, num_tokens = 8, 9

        def forward(self, pixel_values):
            return pixel_values

    from visualchat_train.data.shapes import CONCEPTS

    torch.manual_seed(0)
    vcm = VisualChatModel(lm, Grid(), "mmca", "words", CONCEPTS)
    vcm.projection.net.init_tables(tok, vcm.base_embedding)
    return TrainModule(vcm, aux_loss=aux, detach_image_rows=detach), vcm


def _batch(with_labels: bool):
    from visualchat_train.data.shapes import Obj, Scene, concept_labels

    k = 9 * 5 + 2
    ids = torch.tensor([[1] * 3 + [5] * k + [7, 8, 9, 10]])
    is_img = torch.tensor([[False] * 3 + [True] * k + [False] * 4])
    labels = torch.tensor([[-100] * (3 + k) + [-100, 8, 9, 10]])
    b = {"input_ids": ids, "is_image": is_img, "padding_mask": None, "labels": labels,
         "image_feats": torch.randn(1, 9, 8, generator=torch.Generator().manual_seed(1))}
    if with_labels:
        b["image_labels"] = torch.tensor([concept_labels(Scene("white", (Obj("star", "red", "small", 4),)))])
    return b


def test_aux_loss_changes_nothing_without_labels_and_adds_the_heads_loss_with_them(tiny_tokenizer):
    on, vcm = _module(tiny_tokenizer, 1.0)
    off, _ = _module(tiny_tokenizer, 0.0)
    l_on, n_on = on(**_batch(False))
    l_off, n_off = off(**_batch(False))
    assert n_on == n_off and torch.equal(l_on, l_off)  # no labels: exactly the answers' loss
    l_lab, _ = on(**_batch(True))
    aux = vcm.projection.net.aux_loss(_batch(True)["image_feats"], _batch(True)["image_labels"])
    torch.testing.assert_close(l_lab, l_off + aux)
    assert float(off(**_batch(True))[0].detach()) == float(l_off.detach())  # weight 0: labels are ignored


def test_detached_image_rows_get_no_gradient_from_the_answers(tiny_tokenizer):
    for detach in (False, True):
        m, vcm = _module(tiny_tokenizer, 0.0, detach)
        loss, _ = m(**_batch(False))
        loss.backward()
        g = vcm.projection.net.cell_mlp[0].weight.grad
        assert (g is None or float(g.abs().sum()) == 0.0) == detach


def test_lora_layers_adapts_only_the_top_layers(tmp_path):
    s = _train_in_process_words(tmp_path, "--lora_rank", "4", "--lora_layers", "1", "--max_steps", "2")
    assert s["steps"] == 2
    cfg = json.load(open(tmp_path / "final" / "config.json"))
    assert cfg["lora"]["lm"]["layers_to_transform"] == [1]
    t = load_tensors(str(tmp_path / "final"))
    lora = [k for k in t if k.startswith("lora.")]
    assert lora and all(".layers.1." in k for k in lora)
    assert cfg["vis_proj"] == "words" and cfg["concepts"]["cells"][0] == "top left"
    # the checkpoint with trained LM tensors loads and serves
    vc = VisualChat.from_pretrained(str(tmp_path / "final"), device="cpu")
    from visualchat_train.data.shapes import generate

    im = generate("test", 1, 0)[0].conversation.rounds[0].images[0].load()
    assert isinstance(vc.new_session().ask("Describe Image 1.", images=[im], max_new_tokens=4), str)


def _train_in_process_words(out, *flags):
    from visualchat_train import cli
    from visualchat_train.trainer import train

    args = cli.parse_args(["--preset", "smoke", "--engine", "torch", "--eval_every", "0", "--output_dir", str(out),
                           "--no_progress", "--vision", "efficientnet-lite0:head@3", "--vis_proj", "words",
                           "--aux_loss", "1", "--detach_image_rows", "--embedding_lr", "0", "--dataset_samples", "8",
                           *flags])
    return train(args)


def test_a_checkpoint_from_before_concepts_still_loads(tmp_path, tiny_tokenizer, tiny_clip_dir):
    """A config.json written before the ``concepts`` field existed (a linear projection, one
    trainable.safetensors) loads as before."""
    lm_dir = _base(tmp_path, tiny_tokenizer)
    enc = build_encoder("clip:" + tiny_clip_dir)
    vc = VisualChat.from_components(tiny_llama(tiny_tokenizer), tiny_tokenizer, enc, lm_spec=lm_dir)
    vc.save_pretrained(str(tmp_path / "old"))
    cfg = json.load(open(tmp_path / "old" / "config.json"))
    del cfg["concepts"]
    json.dump(cfg, open(tmp_path / "old" / "config.json", "w"))
    vc2 = VisualChat.from_pretrained(str(tmp_path / "old"), device="cpu", lm_weights="fp32")
    assert vc2.config.concepts is None and vc2.config.vis_proj == "linear"
    torch.testing.assert_close(_logits(vc2), _logits(vc), atol=1e-5, rtol=1e-5)


def test_aux_only_is_a_perception_stage_a_later_run_starts_from(tmp_path):
    """--aux_only trains the heads on their labels alone (the LM is never run, its loss never logged); a
    second run starts from that checkpoint with --init_from and keeps the heads fixed with --projection_lr 0."""
    s = _train_in_process_words(tmp_path / "perception", "--aux_only", "--lr", "1e-3", "--max_steps", "8",
                                "--eval_every", "8")
    assert s["steps"] == 8 and s["val_loss_last"] < s["val_loss_first"]  # the heads' validation loss fell
    first = load_tensors(str(tmp_path / "perception" / "final"))
    assert not [k for k in first if k.startswith("lora.")]
    _train_in_process_words(tmp_path / "lm", "--init_from", str(tmp_path / "perception" / "final"),
                            "--projection_lr", "0", "--lora_rank", "4", "--lora_layers", "1", "--max_steps", "2")
    second = load_tensors(str(tmp_path / "lm" / "final"))
    for k, v in first.items():
        if k.startswith("projection."):
            assert torch.equal(second[k], v), k
    assert [k for k in second if k.startswith("lora.")]
    from visualchat_train.errors import TrainError

    with pytest.raises(TrainError, match="heads alone"):
        _train_in_process_words(tmp_path / "bad", "--aux_only", "--lora_rank", "4", "--max_steps", "1")


def test_init_from_continues_the_lora_adapters_of_an_earlier_stage(tmp_path):
    """A later stage (--init_from a checkpoint with LoRA factors) starts from those factors, not fresh ones:
    with lr 0 it saves them unchanged; a run asking for other adapters, or none, is refused by name."""
    from visualchat_train.errors import TrainError

    _train_in_process_words(tmp_path / "one", "--lora_rank", "4", "--lora_layers", "1", "--max_steps", "2")
    first = load_tensors(str(tmp_path / "one" / "final"))
    lora = {k: v for k, v in first.items() if k.startswith("lora.")}
    assert lora and any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)  # trained: B left zero
    _train_in_process_words(tmp_path / "two", "--init_from", str(tmp_path / "one" / "final"), "--lora_rank", "4",
                            "--lora_layers", "1", "--lr", "0", "--projection_lr", "0", "--max_steps", "1")
    second = load_tensors(str(tmp_path / "two" / "final"))
    for k, v in lora.items():
        torch.testing.assert_close(second[k], v, rtol=0, atol=0, msg=k)
    with pytest.raises(TrainError, match="differ from this run's"):
        _train_in_process_words(tmp_path / "rank", "--init_from", str(tmp_path / "one" / "final"), "--lora_rank", "8",
                                "--lora_layers", "1", "--max_steps", "1")
    with pytest.raises(TrainError, match="holds LoRA adapters"):
        _train_in_process_words(tmp_path / "none", "--init_from", str(tmp_path / "one" / "final"), "--max_steps", "1")


def test_the_cell_layout_gives_one_row_per_cell_holding_all_its_words(tmp_path, tiny_tokenizer, tiny_clip_dir):
    """words:cell (for MMCA, where an image row never sees another): each cell's row is the mean of its
    name's words and its heads' labels (no "," padding), each image head's row the mean of its name and
    value; the tensors are those of 'words', so a words checkpoint loads into it."""
    from visualchat.checkpoint import load_trainable
    from visualchat.projection import parse_spec

    enc = build_encoder("clip:" + tiny_clip_dir)
    cells = enc.num_tokens
    vc = VisualChat.from_components(tiny_llama(tiny_tokenizer), tiny_tokenizer, enc, vis_proj="words:cell",
                                    concepts=concepts_for(cells))
    assert vc.model.image_tokens == vc.config.image_tokens == cells + 1
    net = vc.model.projection.net
    emb = vc.model.base_embedding
    row = lambda w: emb[tiny_tokenizer.encode(" " + w, add_special_tokens=False)].float().mean(0)  # noqa: E731
    with torch.no_grad():
        for h, k in (("color", 2), ("shape", 1)):
            net.cell_out[h].weight.zero_()
            net.cell_out[h].bias.copy_(torch.full((net.cell_out[h].bias.numel(),), -50.0))
            net.cell_out[h].bias[k] = 50.0
        net.image_out["word"][-1].weight.zero_()
        net.image_out["word"][-1].bias.copy_(torch.tensor([-50.0, 50.0]))
    out = vc.model.project(torch.randn(2, cells, enc.hidden_size))
    assert out.shape == (2, cells + 1, emb.shape[1])
    torch.testing.assert_close(out[0, 0], (row("top") + row("left") + row("blue") + row("circle")) / 4)
    torch.testing.assert_close(out[1, 1], (row("center") + row("blue") + row("circle")) / 3)
    torch.testing.assert_close(out[0, -1], (row("word") + row("cat")) / 2)
    # a 'words' checkpoint (same tensors) loads into the cell layout, and its heads come with it
    vc2, _ = _words_vc(tiny_tokenizer, tiny_clip_dir)
    with torch.no_grad():
        vc2.model.projection.net.cell_mlp[0].weight.normal_()
    vc2.save_pretrained(str(tmp_path / "words"))
    load_trainable(vc.model, str(tmp_path / "words"), any_grid=True)
    assert torch.equal(vc.model.projection.net.cell_mlp[0].weight, vc2.model.projection.net.cell_mlp[0].weight)
    with pytest.raises(ValueError, match="layout"):
        parse_spec("words:rows")
