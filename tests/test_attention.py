"""mmca_attention against an independent float64 reference written token by token."""
import math
import zlib

import pytest
import torch

from visualchat.attention import build_masks, mmca_attention


def reference(q, k, v, is_img, pad, scale, mode, window=None):
    """Loop over every (batch, head, query) in float64, straight from the definition."""
    q, k, v = q.double(), k.double(), v.double()
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    out = torch.zeros(b, hq, lq, d, dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            kh = h // (hq // hkv)
            for qi in range(lq):
                i = lk - lq + qi  # absolute position of this query

                def term(keys):
                    keys = [j for j in keys if (pad is None or pad[bi, j]) and (window is None or i - j < window)]
                    if not keys:
                        return torch.zeros(d, dtype=torch.float64)
                    s = torch.stack([q[bi, h, qi] @ k[bi, kh, j] * scale for j in keys])
                    w = torch.softmax(s, 0)
                    return sum(w[n] * v[bi, kh, j] for n, j in enumerate(keys))

                if mode == "causal":
                    out[bi, h, qi] = term(range(i + 1))
                elif is_img[bi, i]:
                    out[bi, h, qi] = term([i])
                else:
                    text = [j for j in range(i + 1) if not is_img[bi, j]]
                    img = [j for j in range(i) if is_img[bi, j]]
                    out[bi, h, qi] = term(text) + term(img)
    return out


def layout(name, b=2, n=14):
    img = torch.zeros(b, n, dtype=torch.bool)
    pad = None
    if name == "image_first":
        img[:, 0:4] = True
    elif name == "image_last":
        img[:, -4:] = True
    elif name == "adjacent":
        img[:, 2:5] = True
        img[:, 5:8] = True
    elif name == "interleaved":
        img[0, 1:4] = True
        img[0, 7:10] = True
        img[1, 3:6] = True
    elif name == "padding":
        img[:, 2:6] = True
        pad = torch.ones(b, n, dtype=torch.bool)
        pad[0, -3:] = False  # right padding
        pad[1, :2] = False  # left padding
    return img, pad


LAYOUTS = ["no_image", "image_first", "image_last", "adjacent", "interleaved", "padding"]


@pytest.mark.parametrize("mode", ["mmca", "causal"])
@pytest.mark.parametrize("name", LAYOUTS)
@pytest.mark.parametrize("heads", [(4, 4), (4, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("lq", ["prefill", "decode", "chunk"])
def test_matches_float64_reference(mode, name, heads, lq):
    torch.manual_seed(zlib.crc32(repr((mode, name, heads, lq)).encode()))
    img, pad = layout(name)
    b, n = img.shape
    hq, hkv = heads
    d = 8
    lq = {"prefill": n, "decode": 1, "chunk": 5}[lq]
    q = torch.randn(b, hq, lq, d, requires_grad=True)
    k = torch.randn(b, hkv, n, d, requires_grad=True)
    v = torch.randn(b, hkv, n, d, requires_grad=True)
    scale = 1 / math.sqrt(d)
    out = mmca_attention(q, k, v, img, pad, mode=mode)

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = reference(q64, k64, v64, img, pad, scale, mode)
    torch.testing.assert_close(out.double(), ref, atol=1e-6, rtol=1e-6)

    # backward: the same upstream gradient through both
    g = torch.randn_like(ref)
    out.backward(g.float())
    ref.backward(g)
    for a, r in ((q, q64), (k, k64), (v, v64)):
        # no gradient at all (None) where the output does not depend on it: an image query only
        # copies its value row, so its q gets none; the reference's is then exactly zero
        grad = a.grad if a.grad is not None else torch.zeros_like(a)
        assert torch.isfinite(grad).all()
        # gradients sum over many queries: float32 rounding grows with the sum, hence rtol 1e-5
        torch.testing.assert_close(grad.double(), r.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("mode", ["mmca", "causal"])
@pytest.mark.parametrize("name", ["interleaved", "padding"])
@pytest.mark.parametrize("lq", ["prefill", "decode", "chunk"])
@pytest.mark.parametrize("window", [1, 3, 6, 14])
def test_sliding_window_matches_float64_reference(mode, name, lq, window):
    torch.manual_seed(zlib.crc32(repr((mode, name, lq, window)).encode()))
    img, pad = layout(name)
    b, n = img.shape
    lq = {"prefill": n, "decode": 1, "chunk": 5}[lq]
    q = torch.randn(b, 4, lq, 8, requires_grad=True)
    k, v = (torch.randn(b, 2, n, 8, requires_grad=True) for _ in range(2))
    out = mmca_attention(q, k, v, img, pad, mode=mode, window=window)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = reference(q64, k64, v64, img, pad, 1 / math.sqrt(8), mode, window)
    torch.testing.assert_close(out.double(), ref, atol=1e-6, rtol=1e-6)
    g = torch.randn_like(ref)
    out.backward(g.float())
    ref.backward(g)
    for a, r in ((q, q64), (k, k64), (v, v64)):  # small windows leave one-key softmaxes, whose exact
        torch.testing.assert_close(a.grad.double(), r.grad, atol=5e-6, rtol=1e-5)  # zero gradient float32 misses by ~1e-6
    if window >= n:  # a window as long as the sequence changes nothing
        torch.testing.assert_close(out, mmca_attention(q, k, v, img, pad, mode=mode), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="window"):
        mmca_attention(q, k, v, img, pad, mode=mode, window=0)


def test_image_query_returns_its_own_value():
    torch.manual_seed(0)
    img, _ = layout("interleaved")
    q, k, v = torch.randn(2, 2, 14, 4), torch.randn(2, 2, 14, 4), torch.randn(2, 2, 14, 4)
    out = mmca_attention(q, k, v, img)
    for b in range(2):
        for i in torch.nonzero(img[b]).flatten().tolist():
            torch.testing.assert_close(out[b, :, i], v[b, :, i], atol=0, rtol=0)


def test_image_term_is_exactly_zero_without_earlier_image():
    """Text before the first image equals plain causal attention over text: the image term adds 0,
    not a uniform average (the reference code's fault), and no NaN."""
    torch.manual_seed(1)
    img, _ = layout("image_last")
    q, k, v = torch.randn(2, 2, 14, 4), torch.randn(2, 2, 14, 4), torch.randn(2, 2, 14, 4)
    mm = mmca_attention(q, k, v, img)
    ca = mmca_attention(q, k, v, img, mode="causal")
    assert torch.isfinite(mm).all()
    torch.testing.assert_close(mm[:, :, :10], ca[:, :, :10], atol=1e-6, rtol=0)
    v_big = v.clone()
    v_big[:, :, 10:] = 1e6  # the image rows: any weight on them would show
    mm_big = mmca_attention(q, k, v_big, img)
    torch.testing.assert_close(mm_big[:, :, :10], mm[:, :, :10], atol=0, rtol=0)
    pad = torch.ones(2, 14, dtype=torch.bool)
    pad[:, 0] = False  # the general (masked) path too
    torch.testing.assert_close(mmca_attention(q, k, v_big, img, pad)[:, :, 1:10],
                               mmca_attention(q, k, v, img, pad)[:, :, 1:10], atol=0, rtol=0)


def test_padded_keys_get_no_weight():
    torch.manual_seed(2)
    img, pad = layout("padding")
    q, k, v = torch.randn(2, 2, 14, 4), torch.randn(2, 2, 14, 4), torch.randn(2, 2, 14, 4)
    out = mmca_attention(q, k, v, img, pad)
    v2 = v.clone()
    v2[~pad[:, None, :, None].expand_as(v)] = 1e6  # garbage in padded rows must not leak
    k2 = k.clone()
    k2[~pad[:, None, :, None].expand_as(k)] = 50.0
    out2 = mmca_attention(q, k2, v2, img, pad)
    real = pad[:, None, :, None].expand_as(out)
    torch.testing.assert_close(out[real], out2[real])


def test_masks_are_vectorised_and_shaped():
    img, pad = layout("padding")
    text_term, image_term = build_masks(img, 14, pad)
    assert text_term.shape == image_term.shape == (2, 14, 14)
    assert not (text_term & image_term).any()  # a key is in at most one term


def test_bad_shapes_are_explained():
    q = torch.randn(1, 3, 4, 8)
    k = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="multiple"):
        mmca_attention(q, k, k, torch.zeros(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="key_is_image"):
        mmca_attention(q[:, :2], k, k, torch.zeros(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="mode"):
        mmca_attention(q[:, :2], k, k, torch.zeros(1, 4, dtype=torch.bool), mode="nope")
