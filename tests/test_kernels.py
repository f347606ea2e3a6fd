"""Every fast path of visualchat/kernels/ against the reference (visualchat/attention.py) on tiny random
cases, and the dispatch (``visualchat.kernels.attend``) picking each where it applies. The Triton kernel
(tests/test_attention_triton.py), the lean decode step and the low-precision weights
(tests/test_lowp.py) have their own files."""
import pytest
import torch

from tests.conftest import tiny_llama
from visualchat import kernels
from visualchat.attention import mmca_attention, reference_attention
from visualchat.kernels import mmca_torch

TOL = dict(rtol=1e-5, atol=1e-5)


def qkv(b, hkv, groups, lq, lk, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hkv * groups, lq, d, generator=g), torch.randn(b, hkv, lk, d, generator=g),
            torch.randn(b, hkv, lk, d, generator=g))


def images(b, lk, spans):
    kis = torch.zeros(b, lk, dtype=torch.bool)
    for lo, hi in spans:
        kis[:, lo:hi] = True
    return kis


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("lq", [17, 6, 1], ids=["prefill", "chunk", "one"])
@pytest.mark.parametrize("spans", [[], [(0, 4)], [(3, 7), (9, 12)], [(13, 17)]],
                         ids=["text", "first", "two", "last"])
def test_prefill_compaction_equals_the_reference(groups, lq, spans):
    q, k, v = qkv(1, 2, groups, lq, 17)
    kis = images(1, 17, spans)
    out = mmca_torch.mmca_prefill(q, k, v, kis[0], 0.3)
    torch.testing.assert_close(out, reference_attention(q, k, v, kis, scale=0.3), **TOL)


@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("spans", [[], [(2, 6), (8, 10)]], ids=["text", "images"])
def test_one_query_decode_equals_the_reference(groups, spans):
    q, k, v = qkv(2, 2, groups, 1, 15)
    kis = images(2, 15, spans)
    out = mmca_torch.mmca_decode(q, k, v, kis, None)
    torch.testing.assert_close(out, reference_attention(q, k, v, kis), **TOL)


def test_one_query_decode_declines_what_it_does_not_cover():
    q, k, v = qkv(2, 1, 1, 1, 9)
    mixed = images(2, 9, [(1, 3)])
    mixed[1] = False  # one row with images, one without
    assert mmca_torch.mmca_decode(q, k, v, mixed, None) is None
    image_query = images(2, 9, [(7, 9)])
    assert mmca_torch.mmca_decode(q, k, v, image_query, None) is None


def spy(monkeypatch):
    """Record which fast path ``attend`` runs."""
    seen = []
    for name in ("mmca_prefill", "mmca_decode"):
        real = getattr(mmca_torch, name)
        monkeypatch.setattr(mmca_torch, name, lambda *a, real=real, name=name: seen.append(name) or real(*a))
    return seen


@pytest.mark.parametrize("case, path", [
    ("prefill", "mmca_prefill"), ("all real padding", "mmca_prefill"), ("decode", "mmca_decode"),
    ("decode, VISUALCHAT_DECODE=hf", "mmca_prefill"), ("padding", None), ("window", None),
    ("causal", "sdpa"), ("causal, padding", None)])
def test_the_dispatch_picks_one_path_and_equals_the_reference(monkeypatch, case, path):
    seen = spy(monkeypatch)
    monkeypatch.delenv("VISUALCHAT_DECODE", raising=False)
    lq = 1 if case.startswith("decode") else 12
    q, k, v = qkv(2, 2, 2, lq, 12)
    kis = images(2, 12, [(2, 5)])
    pad, window, mode = None, None, "causal" if case.startswith("causal") else "mmca"
    if "padding" in case:
        pad = torch.ones(2, 12, dtype=torch.bool)
        if case != "all real padding":
            pad[0, :3] = False
    if case == "window":
        window = 5
    if case.endswith("=hf"):
        monkeypatch.setenv("VISUALCHAT_DECODE", "hf")
    out = kernels.attend(q, k, v, kis, pad, None, mode, window)
    assert (out is None) == (path is None) and seen[:1] == ([path] if path in ("mmca_prefill", "mmca_decode") else [])
    ref = reference_attention(q, k, v, kis, pad, None, mode, window)
    real = pad[:, None, -lq:, None] if pad is not None else 1  # padded query rows are not compared
    torch.testing.assert_close(mmca_attention(q, k, v, kis, pad, None, mode, window) * real, ref * real, **TOL)


@pytest.mark.parametrize("spec", ["linear", "mlp", "perceiver:4"])
def test_image_embeds_are_the_projected_rows_of_whole_images(tiny_tokenizer, tiny_clip_dir, spec):
    """What the session feeds for any new image slots: the same rows whatever the projection kind."""
    from visualchat.encoders import build_encoder
    from visualchat.model import VisualChat

    vc = VisualChat.from_components(tiny_llama(tiny_tokenizer), tiny_tokenizer,
                                    build_encoder("clip:" + tiny_clip_dir), vis_proj=spec)
    feats = list(torch.randn(2, vc.model.projection.in_tokens, vc.model.encoder.hidden_size))
    k = vc.model.image_tokens
    rows = [(0, k - 1), (1, 0), (1, 2)]
    whole = vc.model.project(torch.stack(feats))
    with torch.no_grad():
        got = vc.model.image_embeds(feats, rows)
    torch.testing.assert_close(got, torch.stack([whole[i][j] for i, j in rows]).detach(), **TOL)
