"""The grounded projection start (visualchat_train/grounding.py): token labels, the ridge fit, the trainer flag."""
import pytest
import torch

from visualchat_train.data.shapes import Obj, Scene
from visualchat_train.grounding import fit_projection, token_words, word_targets


def test_token_words_follow_the_scene_graph():
    sc = Scene("gray", (Obj("circle", "red", "large", 0), Obj("star", "blue", "small", 8)), word=None)
    w = token_words(sc, grid=7)
    assert len(w) == 49
    grid = [w[7 * r:7 * r + 7] for r in range(7)]
    # token centres at 16, 48, 80, ... px of 224: the first two rows and columns fall in cell 0
    assert grid[0][0] == grid[1][1] == "red circle"
    assert grid[6][6] == grid[5][5] == "blue star"
    assert grid[3][3] == grid[0][3] == "gray"
    with_word = Scene("white", (Obj("square", "green", "small", 2),), word="cat")
    w = token_words(with_word, grid=7)
    assert w[7 * 3 + 0] == w[7 * 3 + 6] == "cat"  # the middle row shows the word
    assert w[6] == "green square" and w[7 * 6] == "white"


def test_fit_projection_recovers_a_linear_map():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 12, generator=g)
    w0, b0 = torch.randn(5, 12, generator=g), torch.randn(5, generator=g)
    w, b = fit_projection(x, x @ w0.T + b0, ridge=1e-8, chunk=64)  # sums over 8 chunks
    torch.testing.assert_close(w, w0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b, b0, atol=1e-4, rtol=1e-4)
    # a strong ridge shrinks the map towards 0 (and the bias towards the targets' mean)
    ws, _ = fit_projection(x, x @ w0.T + b0, ridge=100.0)
    assert ws.norm() < 0.1 * w0.norm()


def test_word_targets_are_scaled_word_embeddings(tiny_tokenizer):
    emb = torch.randn(len(tiny_tokenizer), 8)
    t = word_targets(["red circle", "cat"], tiny_tokenizer, emb)
    assert t.shape == (2, 8)
    torch.testing.assert_close(t.norm(dim=-1), emb.norm(dim=-1).mean().expand(2))
    ids = tiny_tokenizer(" cat", add_special_tokens=False)["input_ids"]
    mean = emb[ids].mean(0)
    torch.testing.assert_close(torch.nn.functional.normalize(t[1], dim=0), torch.nn.functional.normalize(mean, dim=0))


def test_grounded_start_in_a_training_run(tmp_path):
    """With lr 0 the exported projection is the fit. Even a tiny random CLIP at 32 px explains part of
    the targets (R^2 about 0.18; a projection unrelated to the labels has R^2 <= 0)."""
    from tests.test_train_run import _train_in_process, weights

    s = _train_in_process(tmp_path / "g", "--projection_init", "grounded", "--lr", "0", "--max_steps", "1")
    g = s["grounding"]
    assert g["images"] > 50 and g["tokens"] == 16 * g["images"]
    assert g["r2"] > 0.1 and g["words"] > 16, g
    _train_in_process(tmp_path / "r", "--lr", "0", "--max_steps", "1")
    grounded, rand = weights(tmp_path / "g" / "final"), weights(tmp_path / "r" / "final")
    assert not torch.equal(grounded["projection.weight"], rand["projection.weight"])


def test_grounded_start_needs_shapes_scenes(tmp_path):
    from visualchat_train import cli
    from visualchat_train.trainer import TrainError, train

    data = tmp_path / "chat.jsonl"
    data.write_text('{"rounds": [{"question": "Hi", "answer": "Hello!"}]}\n' * 8)
    args = cli.parse_args(["--preset", "smoke", "--engine", "torch", "--output_dir", str(tmp_path / "o"), "--no_progress",
                           "--dataset_names", "jsonl", "--data_path", str(data), "--dataset_samples", "all",
                           "--projection_init", "grounded", "--max_steps", "1"])
    with pytest.raises(TrainError, match="needs shapes scenes"):
        train(args)


def test_projection_lr_is_the_projection_groups_own(tmp_path):
    """--projection_lr 0 keeps the grounded projection through training while the embedding trains."""
    from tests.test_train_run import _train_in_process, weights

    _train_in_process(tmp_path / "fit", "--projection_init", "grounded", "--lr", "0", "--max_steps", "1")
    _train_in_process(tmp_path / "t", "--projection_init", "grounded", "--projection_lr", "0", "--max_steps", "2")
    fit, t = weights(tmp_path / "fit" / "final"), weights(tmp_path / "t" / "final")
    assert torch.equal(fit["projection.weight"], t["projection.weight"])
    assert not torch.equal(fit["embed_tokens.weight"], t["embed_tokens.weight"])


def test_grounded_start_without_a_feature_cache(tmp_path):
    """With --feature_cache off the fit encodes the scenes itself: the same fit as from the (fp16) cache."""
    from tests.test_train_run import _train_in_process

    cached = _train_in_process(tmp_path / "c", "--projection_init", "grounded", "--lr", "0", "--max_steps", "1")
    direct = _train_in_process(tmp_path / "d", "--projection_init", "grounded", "--lr", "0", "--max_steps", "1",
                               "--feature_cache", "off")
    assert direct["grounding"]["images"] == cached["grounding"]["images"]
    assert abs(direct["grounding"]["r2"] - cached["grounding"]["r2"]) < 0.01, (direct["grounding"], cached["grounding"])
