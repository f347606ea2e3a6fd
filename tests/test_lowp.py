"""The fast CPU decode path: LM weight formats (visualchat/kernels/lowp.py), the lean decode step
(visualchat/kernels/decode.py) and MMCA's one-query branch (visualchat/kernels/mmca_torch.py)."""
import os

import pytest
import torch
from torch import nn

from tests.conftest import color_image, save_tiny_checkpoint, tiny_llama
from visualchat import attention
from visualchat.kernels import lean_decoder, lowp

# fp16 stores each weight with a relative rounding error of at most 2**-11 (its unit roundoff); the
# activations and accumulation stay float32. Through the tiny model's 2 layers and the head, each
# output picks up a few such relative errors, and RMSNorm keeps the scale near 1, so the logits may
# move by a few 2**-11 of their size. 1e-2 of the largest logit is about 20 unit roundoffs: room for
# that, while any real mistake (a transposed or mis-scaled weight, a wrong layer) moves them by O(1).
FP16_RTOL = 1e-2
# bf16 rounds the weights and the activations to 8 significant bits (unit roundoff 2**-8), 8x coarser.
BF16_RTOL = 8e-2


@pytest.fixture
def tiny_ckpt(tmp_path, tiny_tokenizer, tiny_clip_dir):
    """A tiny saved checkpoint (its LM saved beside it), loadable by path."""
    return save_tiny_checkpoint(tmp_path, tiny_tokenizer, tiny_clip_dir)[1]


def _tiny_pair(tiny_tokenizer, tiny_clip_dir):
    """Two identical tiny VisualChats (same seed): one stays fp32, one gets converted."""
    from visualchat.encoders import build_encoder
    from visualchat.model import VisualChat

    enc = build_encoder("clip:" + tiny_clip_dir)
    a = VisualChat.from_components(tiny_llama(tiny_tokenizer, seed=3), tiny_tokenizer, enc, attention="mmca")
    b = VisualChat.from_components(tiny_llama(tiny_tokenizer, seed=3), tiny_tokenizer, enc, attention="mmca")
    b.model.projection.load_state_dict(a.model.projection.state_dict())
    return a, b


def _logits(vc, steps=(5, 9, 13)):
    """Logits after a prefill with two images, a few decode steps, a crop of the cache by 2 tokens (as
    undo and regenerate do) and two more steps."""
    s = vc.new_session()
    s.commit(s.prepare_round("What is in Image 1?", [color_image((255, 0, 0)), color_image((0, 0, 255))]))
    out = [s._prefill(s._render())]
    for t in steps:
        out.append(s._step(t))
    s._cache.crop(-2)
    del s._cache_keys[-2:], s._cache_is_image[-2:]
    for t in (21, 22):
        out.append(s._step(t))
    return torch.stack(out)


@pytest.mark.parametrize("fmt,rtol", [("fp16", FP16_RTOL), ("bf16", BF16_RTOL)])
def test_lowp_logits_close_to_fp32_on_tiny_model(tiny_tokenizer, tiny_clip_dir, fmt, rtol):
    if lowp.UNSUPPORTED[fmt]() is not None:
        pytest.skip(f"{fmt} not supported on this CPU: {lowp.UNSUPPORTED[fmt]()}")
    ref_vc, vc = _tiny_pair(tiny_tokenizer, tiny_clip_dir)
    assert lowp.convert_lm(vc.model.lm, fmt) == 2 * 7 + 1  # 7 projections per layer + the head
    assert all(type(m) is not nn.Linear for m in vc.model.lm.modules())
    ref, got = _logits(ref_vc), _logits(vc)
    err = (got - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert 0 < err <= rtol * scale, (err, scale)


def test_convert_refuses_a_weight_beyond_fp16_and_leaves_the_lm_as_it_was(tiny_tokenizer):
    """A weight float16 cannot hold is refused with a clear error, and nothing of the LM is replaced
    (the conversions run side by side; none is placed before all have succeeded)."""
    if lowp.UNSUPPORTED["fp16"]() is not None:
        pytest.skip(lowp.UNSUPPORTED["fp16"]())
    lm = tiny_llama(tiny_tokenizer, seed=1).requires_grad_(False)
    with torch.no_grad():
        lm.model.layers[1].mlp.down_proj.weight[0, 0] = 1e6
    before = {n: type(m) for n, m in lm.named_modules()}
    with pytest.raises(ValueError, match="beyond float16's range"):
        lowp.convert_lm(lm, "fp16")
    assert {n: type(m) for n, m in lm.named_modules()} == before and lowp.lm_format(lm) == "fp32"


def test_fused_parts_share_one_gemm_and_match_separate_layers():
    """q/k/v (and gate/up) become one stacked fp16 matrix: the three calls on one input run one GEMM,
    each part gives its own layer's output, and an input changed in place (or a new one) is recomputed."""
    if lowp.fp16_unsupported_reason() is not None:
        pytest.skip(f"fp16 not supported here: {lowp.fp16_unsupported_reason()}")
    torch.manual_seed(0)
    attn = nn.Module()
    for name, out in (("q_proj", 16), ("k_proj", 8), ("v_proj", 8), ("o_proj", 16)):
        setattr(attn, name, nn.Linear(16, out, bias=name == "k_proj"))
    attn.requires_grad_(False)
    ref = {n: lowp._Fp16(getattr(attn, n).weight, getattr(attn, n).bias) for n in ("q_proj", "k_proj", "v_proj")}
    assert lowp.convert_lm(attn, "fp16") == 4
    group = lowp.fused_group(attn.q_proj, attn.k_proj, attn.v_proj)
    assert group is not None and group.sizes == [16, 8, 8] and lowp.fused_group(attn.k_proj, attn.q_proj) is None
    assert type(attn.o_proj) is lowp._Fp16  # no sibling reads its input: converted alone
    calls = []
    inner = group.linear
    group.linear = lambda x: calls.append(1) or inner(x)
    x = torch.randn(2, 3, 16)
    for n in ("q_proj", "k_proj", "v_proj"):
        torch.testing.assert_close(getattr(attn, n)(x), ref[n](x), rtol=1e-6, atol=1e-6)
    assert len(calls) == 1 and group._last is None  # one GEMM; the memo dropped once all parts had it
    attn.q_proj(x)
    x.mul_(2)  # changed in place: the memo must not answer for it
    torch.testing.assert_close(attn.k_proj(x), ref["k_proj"](x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(attn.v_proj(x.clone()), ref["v_proj"](x), rtol=1e-6, atol=1e-6)
    assert len(calls) == 4
    torch.testing.assert_close(group(x), torch.cat([ref[n](x) for n in ("q_proj", "k_proj", "v_proj")], -1),
                               rtol=1e-6, atol=1e-6)
    with torch.inference_mode():  # inference tensors have no version counter: each part runs its own GEMM
        xi = torch.randn(1, 16)
        torch.testing.assert_close(attn.q_proj(xi), ref["q_proj"](xi), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(attn.v_proj(xi), ref["v_proj"](xi), rtol=1e-6, atol=1e-6)


def test_bench_section_profile_times_every_section_of_the_lean_step(tiny_tokenizer, tiny_clip_dir):
    """bench/default_model.py --profile: the lean step reports each of its sections through ``tick``,
    the per-token times are positive and the step's hooks are removed afterwards."""
    from bench.default_model import section_profile

    vc, _ = _tiny_pair(tiny_tokenizer, tiny_clip_dir)
    lean = lean_decoder(vc)
    ims = [color_image(c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    rows = dict(section_profile(vc, ims, new_tokens=6))
    assert set(rows) == {"between steps: sampling, streaming, session bookkeeping",
                         "step setup (embedding row, rotary tables, MMCA masks)", "RMSNorm", "GEMM q/k/v",
                         "rotary embedding", "KV cache append", "attention (MMCA)", "GEMM o", "GEMM gate/up",
                         "SiLU x up, residual adds", "GEMM down", "GEMM head (logits)"}, rows
    assert all(v > 0 for v in rows.values()), rows
    assert lean.tick is None and "step" not in vars(lean)


def test_bench_matmuls_alone_cover_every_weight_once(tiny_tokenizer, tiny_clip_dir, monkeypatch):
    """bench/default_model.py's "matrix products alone" row runs each of the step's products once: the
    lean step's 4 per layer + the head, or today's 7 per layer + the head, together every weight of the
    LM's linear layers (what the bandwidth limit counts)."""
    from bench.default_model import matmul_calls, matmuls_alone_s

    ref, vc = _tiny_pair(tiny_tokenizer, tiny_clip_dir)
    lowp.convert_lm(vc.model.lm, "fp16" if lowp.UNSUPPORTED["fp16"]() is None else "fp32")
    n_weights = sum(m.weight.numel() for m in ref.model.lm.modules() if type(m) is nn.Linear)
    layers = ref.model.lm.config.num_hidden_layers
    for v, env, per_layer in ((vc, "lean", 4), (ref, "hf", 7)):
        monkeypatch.setenv("VISUALCHAT_DECODE", env)
        calls = matmul_calls(v)
        assert len(calls) == per_layer * layers + 1
        assert sum(n * f(torch.randn(1, n)).shape[-1] for f, n in calls) == n_weights
        assert matmuls_alone_s(v, repeats=2) > 0


def test_lean_decode_step_matches_transformers(tiny_tokenizer, tiny_clip_dir, monkeypatch):
    """The lean decode step computes what transformers' forward does (float32 rounding apart)."""
    vc, _ = _tiny_pair(tiny_tokenizer, tiny_clip_dir)
    assert lean_decoder(vc) is not None
    lean = _logits(vc)
    monkeypatch.setenv("VISUALCHAT_DECODE", "hf")
    assert lean_decoder(vc) is None
    hf = _logits(vc)
    torch.testing.assert_close(lean, hf, rtol=1e-5, atol=1e-5)


def _session_run(vc, images):
    """Logits of every forward and the cache's keys and values at the end, through what a session does
    to its cache: a prefill, steps (past the lean step's room, made small by the caller), a crop (undo
    and regenerate do one), more steps, then the next round's prefill (transformers' forward reading the
    lean step's views) and two more steps."""
    s = vc.new_session()
    s.commit(s.prepare_round("What is in Image 1?", images))
    out = [s._prefill(s._render())]
    for t in range(5, 14):
        out.append(s._step(t))
    s._cache.crop(-2)
    del s._cache_keys[-2:], s._cache_is_image[-2:]
    for t in (21, 22, 23):
        out.append(s._step(t))
    s._answer_ids[-1] = [t for t in s._cache_keys[len(s._render()):] if isinstance(t, int)]
    s.commit(s.prepare_round("And Image 2?", images[:1]))
    out.append(s._prefill(s._render()))
    for t in (31, 32):
        out.append(s._step(t))
    layers = s._cache.layers
    return torch.stack(out), [torch.cat([la.keys, la.values]) for la in layers]


@pytest.mark.parametrize("mode,n_images", [("mmca", 2), ("mmca", 0), ("causal", 2)])
def test_lean_decode_state_follows_the_cache(tiny_tokenizer, tiny_clip_dir, monkeypatch, mode, n_images):
    """The lean step keeps its own key/value buffers, masks and rotary tables per cache: they stay in
    step with the cache through a rebuild when their room runs out (ROOM = 4 here), a crop and the next
    round's prefill; the logits and the cache's keys and values are transformers' (float32 rounding
    apart), for MMCA with and without images and for causal attention."""
    from visualchat.kernels import decode
    from visualchat.encoders import build_encoder
    from visualchat.model import VisualChat

    monkeypatch.setattr(decode, "ROOM", 4)
    enc = build_encoder("clip:" + tiny_clip_dir)
    vc = VisualChat.from_components(tiny_llama(tiny_tokenizer, seed=5), tiny_tokenizer, enc, attention=mode)
    images = [color_image((255, 0, 0)), color_image((0, 0, 255))][:n_images]
    assert lean_decoder(vc) is not None
    lean_logits, lean_kv = _session_run(vc, images)
    monkeypatch.setenv("VISUALCHAT_DECODE", "hf")
    assert lean_decoder(vc) is None
    hf_logits, hf_kv = _session_run(vc, images)
    torch.testing.assert_close(lean_logits, hf_logits, rtol=1e-5, atol=1e-5)
    for a, b in zip(lean_kv, hf_kv):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_lean_step_leaves_a_cache_it_cannot_drive_to_transformers(tiny_tokenizer, tiny_clip_dir):
    """A cache that is not a plain batch-1 DynamicCache (here: one of two rows) is not touched by the
    lean step (it returns None, and the session runs transformers' forward)."""
    vc, _ = _tiny_pair(tiny_tokenizer, tiny_clip_dir)
    lean = lean_decoder(vc)
    cache = vc.model.new_cache()
    k = torch.randn(2, 2, 5, 8)
    for i in range(2):
        cache.update(k, k.clone(), i)
    before = [la.keys for la in cache.layers]
    assert lean.step(7, cache, [False] * 6) is None
    assert [la.keys for la in cache.layers] == before and not hasattr(cache, "_vc_lean")


@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("images", ["none", "some"])
def test_mmca_decode_branch_matches_the_general_path(groups, images):
    torch.manual_seed(0)
    hkv, lk, d = 2, 23, 8
    q = torch.randn(1, hkv * groups, 1, d)
    k, v = torch.randn(1, hkv, lk, d), torch.randn(1, hkv, lk, d)
    kis = torch.zeros(1, lk, dtype=torch.bool)
    if images == "some":
        kis[0, 3:9] = True
        kis[0, 12:15] = True
    fast = attention.mmca_attention(q, k, v, kis, scale=0.3)
    ref = attention.reference_attention(q, k, v, kis, scale=0.3)
    torch.testing.assert_close(fast, ref, rtol=1e-6, atol=1e-6)
    # an image query (not a decode step) is not the branch's case: it must fall back, not guess
    kis2 = kis.clone()
    kis2[0, -1] = True
    torch.testing.assert_close(attention.mmca_attention(q, k, v, kis2, scale=0.3),
                               attention.reference_attention(q, k, v, kis2, scale=0.3))


def test_fp16_falls_back_cleanly_without_fbgemm(monkeypatch, tiny_tokenizer, tiny_clip_dir):
    monkeypatch.setattr(lowp, "fp16_unsupported_reason", lambda: "no fbgemm here (simulated)")
    fmt, note = lowp.resolve("fp16")
    assert fmt == "fp32" and "no fbgemm here (simulated)" in note and "using fp32" in note
    assert lowp.resolve("auto")[0] == "fp32"
    _, vc = _tiny_pair(tiny_tokenizer, tiny_clip_dir)
    assert lowp.apply(vc.model.lm, "auto") == ("fp32", "fp16: no fbgemm here (simulated)")
    assert all(type(m) is nn.Linear for m in vc.model.lm.modules() if isinstance(m, (nn.Linear, lowp.LowpLinear)))
    assert vc.new_session().ask("What is in the image?", max_new_tokens=3) is not None  # still serves


def test_bf16_falls_back_cleanly_without_native_bf16(monkeypatch):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    fmt, note = lowp.resolve("bfloat16")
    assert fmt == "fp32" and "no native bf16" in note


def test_auto_picks_fp16_where_supported_and_formats_are_cpu_only(monkeypatch):
    monkeypatch.setattr(lowp, "fp16_unsupported_reason", lambda: None)
    assert lowp.resolve("auto") == ("fp16", None)
    assert lowp.resolve(None, "cuda") == ("fp32", None)
    with pytest.raises(ValueError, match="is for CPU"):
        lowp.resolve("fp16", "cuda")
    with pytest.raises(ValueError, match="auto, fp32, fp16, bf16"):
        lowp.normalize("int4")


def test_converted_weights_survive_float_and_a_shared_lm_keeps_its_format(tiny_ckpt):
    """DeepSpeed-Inference calls ``module.float()`` on the LM; the converted weights are no parameters,
    so they stay in their format. A second checkpoint sharing the LM reports that format."""
    from visualchat.model import VisualChat

    if lowp.fp16_unsupported_reason() is not None:
        pytest.skip("fp16 not supported here")
    vc = VisualChat.from_pretrained(tiny_ckpt, device="cpu", lm_weights="fp16")
    assert vc.lm_weights == "fp16" and vc.lm_weights_note is None
    vc.model.lm.float()
    assert any(isinstance(m, lowp.LowpLinear) and m.fmt == "fp16" for m in vc.model.lm.modules())
    other = VisualChat.from_pretrained(tiny_ckpt, device="cpu", share_with=vc, lm_weights="auto")
    assert other.lm_weights == "fp16"


def test_library_default_is_the_apps_weight_format_and_fp32_is_one_argument_away(tiny_ckpt):
    """``from_pretrained`` without ``lm_weights`` serves what the app serves on CPU (``auto``: fp16 where
    fbgemm is); ``lm_weights="fp32"`` keeps the weights as loaded; a non-float32 dtype is left alone."""
    from visualchat.model import VisualChat

    fast = VisualChat.from_pretrained(tiny_ckpt, device="cpu")
    assert fast.lm_weights == lowp.resolve("auto", "cpu")[0]
    if fast.lm_weights == "fp16":
        assert any(isinstance(m, lowp.LowpLinear) and m.fmt == "fp16" for m in fast.model.lm.modules())
    plain = VisualChat.from_pretrained(tiny_ckpt, device="cpu", lm_weights="fp32")
    assert plain.lm_weights == "fp32" and not any(isinstance(m, lowp.LowpLinear) for m in plain.model.lm.modules())
    half = VisualChat.from_pretrained(tiny_ckpt, device="cpu", dtype=torch.bfloat16)
    assert half.lm_weights == "fp32" and not any(isinstance(m, lowp.LowpLinear) for m in half.model.lm.modules())
    assert half.new_session().ask("Hi?", max_new_tokens=2) is not None


def test_serving_dtype_plan():
    from visualchat.server import plan_dtype

    assert plan_dtype("auto", "cpu") == (torch.float32, "auto")
    assert plan_dtype("float16", "cpu") == (torch.float32, "fp16")
    assert plan_dtype("float32", "cpu") == (torch.float32, "fp32")
    assert plan_dtype("auto", "cuda") == (torch.bfloat16, None)
    assert plan_dtype("auto", "cpu", world=2) == (torch.float32, None)  # AutoTP shards plain nn.Linear
    assert plan_dtype("bfloat16", "cpu", quantization="8bit") == (torch.bfloat16, None)
    with pytest.raises(ValueError, match="dtype must be"):
        plan_dtype("int8", "cpu")


@pytest.mark.skipif(os.environ.get("VISUALCHAT_SKIP_DEFAULT") == "1", reason="default model skipped")
def test_default_model_greedy_text_equal_in_fp16():
    """A short conversation with the embedded default: fp16 LM weights give the fp32 greedy text."""
    from PIL import Image

    from visualchat.assets import ASSETS_DIR
    from visualchat.model import VisualChat

    if lowp.fp16_unsupported_reason() is not None:
        pytest.skip("fp16 not supported here")
    ims = [Image.open(os.path.join(ASSETS_DIR, "examples", f"shapes_{i}.png")) for i in (4, 5)]
    vc = VisualChat.from_pretrained(None, device="cpu", lm_weights="fp32")

    def talk():
        s = vc.new_session()
        return [s.ask("What color is the circle in Image 2?", images=ims, max_new_tokens=8),
                s.ask("Describe Image 1.", max_new_tokens=16)]

    ref = talk()
    assert lowp.convert_lm(vc.model.lm, "fp16") > 0
    assert talk() == ref


def test_app_model_line_names_the_lm_weight_format(tmp_path, tiny_tokenizer, tiny_clip_dir, monkeypatch):
    """Server.load (what app.py runs) on one CPU rank: --dtype auto converts the LM, and the model line
    (``server.backend``) says which format it serves and why when it fell back."""
    from tests.test_app_tp import make_tiny_checkpoints
    from visualchat.server import Server, ServeOptions

    paths = make_tiny_checkpoints(str(tmp_path), tiny_tokenizer, tiny_clip_dir)
    opts = ServeOptions(checkpoint=paths["chat"], device="cpu", deepspeed="off", compare=False)
    if lowp.fp16_unsupported_reason() is None:
        s = Server.load(opts)
        assert s.chat.lm_weights == "fp16" and s.backend.endswith("cpu float32, LM weights fp16")
    monkeypatch.setattr(lowp, "fp16_unsupported_reason", lambda: "simulated: no fbgemm")
    s = Server.load(opts)
    assert s.chat.lm_weights == "fp32" and "LM weights fp32 (fp16: simulated: no fbgemm)" in s.backend


def test_eval_answer_match():
    """visualchat_train.eval --match: the share of rounds answered alike and the accuracy difference."""
    from visualchat_train.eval import answer_match

    acc = lambda x: {"all": {"accuracy": x, "n": 4}}  # noqa: E731
    a = {"seed": 0, "answers": ["1", "red", "2", "top"], "accuracy": acc(0.5), "lm_weights": "fp16"}
    b = {"seed": 0, "answers": ["1", "red", "3", "top"], "accuracy": acc(0.75), "lm_weights": "fp32"}
    m = answer_match(a, b)
    assert (m["same_answers"], m["match_rate"], m["accuracy_delta_points"], m["other_lm_weights"]) == (3, 0.75, -25.0, "fp32")
    with pytest.raises(ValueError, match="same test set"):
        answer_match(a, {**b, "answers": b["answers"][:3]})
