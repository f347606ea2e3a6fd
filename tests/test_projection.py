"""visualchat/projection.py (--vis_proj kinds) and the checkpoint checks of every field and tensor."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import color_image, tiny_llama
from tests.test_model import _logits
from tests.test_model import _saved_base as _base
from visualchat.checkpoint import WEIGHTS_NAME, CheckpointMismatch
from visualchat.config import CONFIG_NAME, VisualChatConfig
from visualchat.encoders import build_encoder
from visualchat.model import VisualChat
from visualchat.projection import Projection, parse_spec

SPECS = ["linear", "baseline", "mlp", "perceiver:4"]


@pytest.mark.parametrize("spec", SPECS)
def test_every_projection_kind_saves_and_loads(tmp_path, tiny_tokenizer, tiny_clip_dir, spec):
    lm_dir = _base(tmp_path, tiny_tokenizer)
    enc = build_encoder("clip:" + tiny_clip_dir)
    vc = VisualChat.from_components(tiny_llama(tiny_tokenizer), tiny_tokenizer, enc, lm_spec=lm_dir, vis_proj=spec)
    assert vc.config.vis_proj == spec
    k = 4 if spec.startswith("perceiver") else enc.num_tokens
    assert vc.config.image_tokens == vc.model.image_tokens == k
    torch.manual_seed(3)
    with torch.no_grad():
        for p in vc.model.projection.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    vc.save_pretrained(str(tmp_path / "ckpt"))
    assert json.load(open(tmp_path / "ckpt" / CONFIG_NAME))["vis_proj"] == spec
    vc2 = VisualChat.from_pretrained(str(tmp_path / "ckpt"), device="cpu", lm_weights="fp32")
    assert vc2.model.projection.spec == spec and vc2.template.k == k
    # (the two LMs are the same fp32 weights loaded two ways: equal up to float rounding)
    torch.testing.assert_close(_logits(vc2), _logits(vc), atol=1e-5, rtol=1e-5)
    # the prompt really holds K rows per image
    s = vc2.new_session()
    s.stream("Image 1?", images=[color_image((0, 200, 0))]).close()
    assert sum(s._render().is_image) == k


def test_a_checkpoint_from_before_vis_proj_loads_as_linear(tmp_path, tiny_tokenizer, tiny_clip_dir):
    """A config.json without "vis_proj" and tensors named projection.weight/.bias (the only format
    before this change) load as a linear projection with exactly those values."""
    lm_dir = _base(tmp_path, tiny_tokenizer)
    enc = build_encoder("clip:" + tiny_clip_dir)
    vc = VisualChat.from_components(tiny_llama(tiny_tokenizer), tiny_tokenizer, enc, lm_spec=lm_dir)
    d = tmp_path / "old"
    os.makedirs(d)
    cfg = vc.config.to_dict()
    del cfg["vis_proj"]
    json.dump(cfg, open(d / CONFIG_NAME, "w"))
    w, b = torch.randn(32, enc.hidden_size), torch.randn(32)
    save_file({"projection.weight": w, "projection.bias": b}, str(d / WEIGHTS_NAME))
    vc2 = VisualChat.from_pretrained(str(d), device="cpu")
    assert vc2.config.vis_proj == "linear"
    assert torch.equal(vc2.model.projection.weight, w) and torch.equal(vc2.model.projection.bias, b)


def test_the_shipped_checkpoints_name_a_known_projection_and_hold_its_tensors():
    from visualchat.checkpoint import SHARD_BYTES, load_tensors

    for name in ("shapes-mmca", "shapes-ca"):
        path = os.path.join("assets", "checkpoints", name)
        cfg = VisualChatConfig.load(path)
        t = load_tensors(path)
        assert parse_spec(cfg.vis_proj)[0] in ("linear", "baseline", "mlp", "perceiver", "words")
        assert {k for k in t if k.startswith("projection.")}, name
        # every file stays under the Hugging Face Hub's limit for files pushed without git-lfs
        assert all(os.path.getsize(os.path.join(path, f)) <= SHARD_BYTES for f in os.listdir(path)), name


def test_perceiver_output_depends_on_where_a_feature_is():
    torch.manual_seed(0)
    p = Projection("perceiver:3", 6, 8, 5)
    with torch.no_grad():
        p.net.pos.normal_()
    x = torch.randn(2, 5, 6)
    y = p(x)
    assert y.shape == (2, 3, 8)
    assert not torch.allclose(p(x.flip(1)), y)  # a learned position embedding: order matters
    with pytest.raises(ValueError, match="built for 5 image tokens"):
        p(torch.randn(1, 4, 6))


@pytest.mark.parametrize("bad, match", [("conv", "unknown vis_proj"), ("mlp:2", "takes no"),
                                        ("perceiver:x", "integer"), ("perceiver:0", "between"), (3, "string")])
def test_bad_vis_proj_specs_are_explained(bad, match):
    with pytest.raises(ValueError, match=match):
        parse_spec(bad)


# -- checkpoint validation: every field and tensor, messages name the file -----------------------
@pytest.fixture
def saved(tmp_path, tiny_tokenizer, tiny_clip_dir):
    lm_dir = _base(tmp_path, tiny_tokenizer)
    vc = VisualChat.from_pretrained(None, lm=lm_dir, vision="clip:" + tiny_clip_dir, device="cpu")
    with torch.no_grad():
        vc.model.embed_tokens.weight[:3] += 1.0
    vc.save_pretrained(str(tmp_path / "ckpt"))
    return tmp_path / "ckpt"


def _edit_tensors(ckpt, **changes):
    t = load_file(str(ckpt / WEIGHTS_NAME))
    t.update(changes)
    save_file({k: v for k, v in t.items() if v is not None}, str(ckpt / WEIGHTS_NAME))


def _edit_config(ckpt, text=None, **changes):
    if text is None:
        d = json.load(open(ckpt / CONFIG_NAME))
        d.update(changes)
        text = json.dumps(d)
    (ckpt / CONFIG_NAME).write_text(text)


@pytest.mark.parametrize("change, match", [
    (dict(**{"projection.bias": torch.zeros(1)}), r"projection.bias has shape \(1,\), the model needs \(32,\)"),
    (dict(**{"projection.weight": torch.full((32, 24), float("nan"))}), "projection.weight holds NaN"),
    (dict(**{"embed_tokens.index": torch.tensor([0, 1, -2])}), "outside 0..399"),
    (dict(**{"embed_tokens.index": torch.tensor([0, 1, 400])}), "outside 0..399"),
    (dict(**{"embed_tokens.index": torch.tensor([0, 1, 1])}), "more than once"),
    (dict(**{"embed_tokens.index": torch.tensor([0, 1, 2], dtype=torch.int32)}), "int64"),
    (dict(**{"embed_tokens.rows": torch.full((3, 32), float("inf"))}), "embed_tokens.rows holds NaN or infinite"),
    (dict(**{"embed_tokens.rows": torch.zeros(2, 32)}), r"embed_tokens.rows has shape \(2, 32\)"),
])
def test_bad_checkpoint_tensors_are_refused_by_name(saved, change, match):
    _edit_tensors(saved, **change)
    with pytest.raises(CheckpointMismatch, match=match) as e:
        VisualChat.from_pretrained(str(saved), device="cpu")
    assert WEIGHTS_NAME in str(e.value)


@pytest.mark.parametrize("change, match", [
    (dict(max_images="8"), "'max_images' is '8'"),
    (dict(max_images=-1), "'max_images' is -1"),
    (dict(vocab_size="400"), "'vocab_size' is '400'"),
    (dict(attention="sparse"), "'attention'"),
    (dict(vis_proj="conv"), "'vis_proj'"),
    (dict(lora=[1]), "'lora'"),
    (dict(max_seq_len=0), "'max_seq_len'"),
])
def test_bad_config_fields_are_refused_by_name(saved, change, match):
    _edit_config(saved, **change)
    with pytest.raises(ValueError, match=match) as e:
        VisualChat.from_pretrained(str(saved), device="cpu")
    assert CONFIG_NAME in str(e.value)


@pytest.mark.parametrize("text, match", [("{not json", "not valid JSON"), ("[1, 2]", "must hold a JSON object")])
def test_malformed_config_json_names_the_file(saved, text, match):
    _edit_config(saved, text=text)
    with pytest.raises(ValueError, match=match) as e:
        VisualChatConfig.load(str(saved))
    assert CONFIG_NAME in str(e.value)


def test_a_refused_checkpoint_leaves_the_model_unchanged(saved, tiny_tokenizer, tiny_clip_dir):
    from visualchat.checkpoint import load_trainable

    vc = VisualChat.from_pretrained(str(saved), device="cpu")
    before = {k: v.clone() for k, v in vc.model.state_dict().items() if k.startswith(("projection", "embed_tokens"))}
    _edit_tensors(saved, **{"embed_tokens.rows": torch.full((3, 32), float("nan")),
                            "projection.weight": torch.ones(32, 24)})
    with pytest.raises(CheckpointMismatch):
        load_trainable(vc.model, str(saved))
    after = vc.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_forward_uses_the_decoders_current_cache_argument(tiny_vc, monkeypatch):
    """transformers 5 logs "`past_key_values`/`cache_params` are deprecated" when a decoder is called
    with the old argument name (42 times in one app session); the model must use the new one."""
    import transformers.utils.generic as generic

    said = []
    monkeypatch.setattr(generic.logger, "warning_once", lambda msg, *a, **k: said.append(str(msg)))
    monkeypatch.setattr(generic.logger, "warning", lambda msg, *a, **k: said.append(str(msg)))
    s = tiny_vc.new_session()
    assert isinstance(s.ask("What is in Image 1?", images=[color_image((0, 0, 200))], max_new_tokens=3), str)
    s.ask("And now?", max_new_tokens=3)
    assert not [m for m in said if "deprecated" in m], said
