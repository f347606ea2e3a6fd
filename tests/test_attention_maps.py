"""Where the model looked (visualchat/attention_maps.py): a hand-made attention pattern on a tiny model,
the CA maps against transformers' own eager attention, the grid and drawing helpers, and the embedded
default's map of a one-object shapes scene."""
import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import color_image, tiny_llama
from visualchat import attention, attention_maps
from visualchat.attention_maps import AttentionMaps, grid_shape

HOT_A, HOT_B = 6, 13  # the tokens of Image 2 that layer 0 and layer 1 look at (a 4 x 4 grid: (1, 2) and (3, 1))


def pattern_model(tokenizer, clip_dir, mode):
    """A tiny LLaMA whose attention is set by hand. Every layer's output projection and MLP are zero, so
    each layer sees the embeddings themselves. Text tokens carry hidden dim 0, which every query reads;
    in layer 0 the keys read dim 1, in layer 1 dim 2. Image 2's token HOT_A is the only token with dim 1
    and HOT_B the only one with dim 2, so each answer token looks at HOT_A in layer 0 and at HOT_B in
    layer 1, with a score of about 11 against 0 for everything else. The signal sits in the slowest
    rotary pair of each head, and a rope theta of 1e12 keeps it from turning with position."""
    from visualchat.encoders import build_encoder
    from visualchat.model import VisualChat

    lm = tiny_llama(tokenizer, rope_parameters={"rope_type": "default", "rope_theta": 1e12})
    enc = build_encoder("clip:" + clip_dir)
    vc = VisualChat.from_components(lm, tokenizer, enc, attention=mode)
    hd = lm.config.hidden_size // lm.config.num_attention_heads  # 8
    with torch.no_grad():
        for i, layer in enumerate(lm.model.layers):
            a = layer.self_attn
            a.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
            a.q_proj.weight.zero_()
            a.k_proj.weight.zero_()
            for h in range(lm.config.num_attention_heads):
                a.q_proj.weight[h * hd + hd - 1, 0] = 1.0
            for h in range(lm.config.num_key_value_heads):
                a.k_proj.weight[h * hd + hd - 1, 1 + i] = 1.0
        vc.model.embed_tokens.weight.zero_()
        vc.model.embed_tokens.weight[:, 0] = 1.0
        vc.model.projection.weight.zero_()
        vc.model.projection.bias.zero_()
        for j in range(4):
            vc.model.projection.weight[j, j] = 1.0

    def encode_images(images):  # image features: HOT_A of the 2nd image in dim 1, HOT_B in dim 2, the rest dim 3
        k, d = enc.num_tokens, enc.hidden_size
        feats = torch.zeros(len(images), k, d)
        feats[:, :, 3] = 1.0
        for n, im in enumerate(images):
            if im.getpixel((0, 0)) == (0, 0, 255):  # the blue image is the one with the pattern
                feats[n, HOT_A, 3], feats[n, HOT_A, 1] = 0.0, 1.0
                feats[n, HOT_B, 3], feats[n, HOT_B, 2] = 0.0, 1.0
        return feats

    vc.model.encode_images = encode_images
    return vc


@pytest.mark.parametrize("mode", ["mmca", "causal"])
def test_hand_made_pattern_puts_the_mass_where_the_pattern_does(tiny_tokenizer, tiny_clip_dir, mode):
    vc = pattern_model(tiny_tokenizer, tiny_clip_dir, mode)
    s = vc.new_session()
    s.add_round("What is in Image 1?", [color_image((255, 0, 0))], "A red circle.")
    s.add_round("And in Image 2?", [color_image((0, 0, 255))], "A blue square.")
    m = s.attention_maps()
    assert m.mode == mode and m.n_layers == 2 and m.n_images == 2 and m.grid == (4, 4)
    assert m.answer_tokens == len(tiny_tokenizer("A blue square.")["input_ids"]) + 1  # and the EOS
    assert m.peak(1, layer=0) == divmod(HOT_A, 4) and m.peak(1, layer=1) == divmod(HOT_B, 4)
    assert m.maps(layer=0)[1].flat[HOT_A] > 0.99 and m.maps(layer=1)[1].flat[HOT_B] > 0.99
    both = m.maps()[1]  # the mean of the two layers: half on each
    assert both.flat[HOT_A] == pytest.approx(0.5, abs=0.01) and both.flat[HOT_B] == pytest.approx(0.5, abs=0.01)
    assert m.shares(layer=0)[1] > 0.99 and m.shares()[1] > 0.99  # Image 2 got the attention, Image 1 none
    np.testing.assert_allclose(m.maps()[0], np.full((4, 4), 1 / 16), atol=0.01)  # nothing stands out in Image 1
    assert all(abs(float(x.sum()) - 1) < 1e-6 for x in m.maps())
    assert m.image_share() > 0.99  # for CA: almost all of the one softmax went to image tokens here
    # the session is as it was: the next answer still continues from its cache
    assert s.conversation.rounds[-1].answer == "A blue square."


def test_pattern_moves_the_map(tiny_tokenizer, tiny_clip_dir):
    """The same model with the pattern on the first image instead: the map follows it (the test above
    cannot pass by a fixed bias toward one image or cell)."""
    vc = pattern_model(tiny_tokenizer, tiny_clip_dir, "mmca")
    s = vc.new_session()
    s.add_round("Two images?", [color_image((0, 0, 255)), color_image((255, 0, 0))], "Yes.")
    m = s.attention_maps()
    assert m.shares()[0] > 0.99 and m.peak(0, layer=0) == divmod(HOT_A, 4)


def test_causal_maps_match_transformers_eager_attention(tiny_vc, tiny_tokenizer, tiny_clip_dir):
    """CA: the captured probabilities are exactly transformers' own eager attention weights (image columns,
    answer-producing rows, mean over heads and rows)."""
    from visualchat.encoders import build_encoder
    from visualchat.model import VisualChat

    torch.manual_seed(0)
    lm = tiny_llama(tiny_tokenizer, initializer_range=0.2)
    vc = VisualChat.from_components(lm, tiny_tokenizer, build_encoder("clip:" + tiny_clip_dir), attention="causal")
    with torch.no_grad():
        vc.model.projection.weight.normal_(0, 0.3)
    s = vc.new_session()
    s.add_round("What is in Image 1?", [color_image((255, 0, 0)), color_image((0, 200, 30))], "A red circle.")
    m = s.attention_maps()
    r = s._render()
    start = r.answer_starts[-1]
    end = r.input_ids.index(vc.template.eos_id, start) + 1
    ids = torch.tensor([r.input_ids[:end - 1]])
    is_img = torch.tensor([r.is_image[:end - 1]])
    feats = torch.stack(s._features)
    with torch.no_grad():
        embeds = vc.model.embed(ids, is_img, feats.reshape(-1, feats.shape[-1]))
        lm.config._attn_implementation = "eager"
        try:
            out = lm.model(inputs_embeds=embeds, output_attentions=True)
        finally:
            lm.config._attn_implementation = attention.ATTN_IMPLEMENTATION
    expect = torch.stack([a[0, :, start - 1:end - 1][:, :, is_img[0]].mean(dim=(0, 1)) for a in out.attentions])
    np.testing.assert_allclose(m.probs, expect.reshape(m.probs.shape).numpy(), rtol=1e-4, atol=1e-6)
    assert 0 < m.image_share() < 1


def test_ordinary_answers_capture_nothing(tiny_vc, monkeypatch):
    calls = []
    orig = attention_maps._Recorder.__call__
    monkeypatch.setattr(attention_maps._Recorder, "__call__", lambda self, *a: calls.append(1) or orig(self, *a))
    s = tiny_vc.new_session()
    s.ask("What is in Image 1?", [color_image((9, 9, 9))], max_new_tokens=4)
    assert calls == [] and attention.CAPTURE.get() is None
    s.attention_maps()
    assert len(calls) == tiny_vc.model.lm.config.num_hidden_layers  # one extra forward, every layer once
    assert attention.CAPTURE.get() is None  # and the capture is off again


def test_no_answer_or_no_image_is_a_clear_error(tiny_vc):
    s = tiny_vc.new_session()
    with pytest.raises(ValueError, match="no answer yet"):
        s.attention_maps()
    s.add_round("Hello?", [], "Hi.")
    with pytest.raises(ValueError, match="no images"):
        s.attention_maps()


@pytest.mark.parametrize("k,grid", [(49, (7, 7)), (9, (3, 3)), (16, (4, 4)), (256, (16, 16)), (12, (3, 4)),
                                    (7, (1, 7))])
def test_grid_of_any_k(k, grid):
    assert grid_shape(k) == grid
    m = AttentionMaps("mmca", np.random.default_rng(0).random((3, 2, k)), answer_tokens=5)
    assert m.grid == grid and m.square == (grid[0] == grid[1])
    assert all(x.shape == grid for x in m.maps()) and all(x.shape == grid for x in m.maps(layer=2))
    with pytest.raises(ValueError, match="layer must be between 0 and 2"):
        m.maps(layer=3)


def test_non_square_k_is_said_in_the_note():
    from webapp import views

    m = AttentionMaps("causal", np.full((2, 1, 12), 0.01), answer_tokens=3)
    note = views.looked_note([("", m)], None)
    assert "K=12 is not a square number" in note and "3×4" in note
    assert "12% of its attention went to image tokens" in note  # 12 tokens x 0.01 of one softmax
    square = AttentionMaps("mmca", np.full((2, 1, 9), 1 / 9), answer_tokens=3)
    assert "not a square" not in views.looked_note([("", square)], 0) and "layer 1 of 2" in views.looked_note(
        [("", square)], 0)


def test_hot_cells_are_the_fewest_holding_half():
    heat = np.array([[0.0, 0.1, 0.05], [0.3, 0.25, 0.0], [0.2, 0.05, 0.05]])
    assert attention_maps.hot_cells(heat).tolist() == [[False, False, False], [True, True, False],
                                                       [False, False, False]]
    assert attention_maps.hot_cells(np.zeros((2, 2))).sum() == 1  # no attention at all: one cell, not none


def test_map_beside_keeps_the_image_colours_and_outlines_the_hot_cell():
    blue = (30, 60, 230)
    im = Image.new("RGB", (90, 60), blue)
    heat = np.zeros((3, 3))
    heat[1, 2] = 1.0
    out = attention_maps.map_beside(im, heat, gap=6)
    assert out.size == (2 * 90 + 6, 60)
    left = np.asarray(out.crop((0, 0, 90, 60)))
    # the picture keeps its own colour everywhere but on the outline of the hot cell (x 60-90, y 20-40)
    inside_hot, cold = left[30, 75], left[10, 15]
    assert tuple(inside_hot) == blue and tuple(cold) == blue
    outline = {tuple(left[20, 75]), tuple(left[30, 60])}  # its top edge and its left edge
    assert outline <= {(0, 0, 0), (255, 255, 255)}, outline
    assert tuple(left[10, 45]) == blue  # a cold cell's border is not drawn
    right = np.asarray(out.crop((96, 0, 186, 60)))
    hot, cold = right[30, 75].astype(float), right[10, 15].astype(float)
    assert hot[0] > 180 and hot[1] > 150  # the map beside it: pale yellow in the hot cell, dark elsewhere
    assert cold.max() < 40


# ---------------------------------------------------------------------------------------------------
# The embedded default


SHAPES = ("circle", "square", "triangle", "star")


def _cell_of(peak, g):
    """The 3 x 3 layout cell of the shapes world that token cell ``peak`` of a g x g grid lies in."""
    return int((peak[0] + 0.5) * 3 / g) * 3 + int((peak[1] + 0.5) * 3 / g)


#: 18 one-object scenes: every cell of the 3 x 3 layout, two shapes each (all four shapes in turn)
SCENES = [(cell, shape) for cell in range(9) for shape in (SHAPES[cell % 4], SHAPES[(cell + 2) % 4])]


@pytest.fixture(scope="module")
def shipped_mmca():
    from visualchat.assets import shipped_checkpoint
    from visualchat.model import VisualChat

    path = shipped_checkpoint("shapes-mmca")
    if path is None:
        pytest.skip("assets/checkpoints/shapes-mmca is not shipped")
    return VisualChat.from_pretrained(path, device="cpu")


def test_default_looks_at_the_only_object(shipped_mmca):
    """One object in a scene and the question about it, answered with its true colour: where does the
    map (mean of all layers) put its peak? Measured on the shipped MMCA checkpoint (K=49): in the
    object's cell in 5 of these 18 scenes (chance: 2), and the object's cell gets more than an even
    share in 15 of 18. So the peak is NOT reliably in the object's cell (the issue's hope); this test
    holds the measured level, well above chance, so that a map that stops following the object fails
    (e.g. CA's maps, which peak on the first image token: 2 of 72 in bench/where_it_looked.py)."""
    from visualchat_train.data.shapes import COLORS, Obj, Scene, draw

    colors = list(COLORS)
    hits, above = 0, 0
    for i, (cell, shape) in enumerate(SCENES):
        color = colors[i % len(colors)]
        scene = Scene(["white", "gray", "black"][i % 3], (Obj(shape, color, "large", cell),))
        s = shipped_mmca.new_session()
        s.add_round(f"What color is the {shape} in Image 1?", [draw(scene)], color)
        m = s.attention_maps()
        g = m.grid[0]
        hits += _cell_of(m.peak(0), g) == cell
        region = np.floor((np.arange(g) + 0.5) * 3 / g)
        mask = (region[:, None] == cell // 3) & (region[None, :] == cell % 3)
        above += float(m.maps()[0][mask].sum()) > float(mask.mean())
    assert hits >= 4, f"the peak was in the object's cell in {hits} of {len(SCENES)} scenes (chance: 2)"
    assert above >= 13, f"the object's cell got more than an even share in {above} of {len(SCENES)} scenes"
