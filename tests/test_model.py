"""The model, sessions and checkpoints on tiny random configs of real architectures."""
import io

import pytest
import torch

from tests.conftest import color_image, tiny_llama, tiny_mistral, tiny_qwen2
from visualchat.checkpoint import WEIGHTS_NAME, CheckpointMismatch
from visualchat.images import ImageError
from visualchat.model import VisualChat
from visualchat.session import ContextWindowError, TooManyImagesError

import visualchat.attention  # noqa: F401  (registers "visualchat")


# -- the registered attention inside real HF architectures ------------------------------------
@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen2, tiny_mistral], ids=["llama", "qwen2", "mistral-sliding"])
def test_registered_attention_runs_in_hf_models(build, tiny_tokenizer):
    lm = build(tiny_tokenizer)
    ids = torch.randint(3, len(tiny_tokenizer), (2, 20))
    is_img = torch.zeros(2, 20, dtype=torch.bool)
    is_img[:, 5:11] = True
    lm.config._attn_implementation = "eager"
    eager = lm(input_ids=ids).logits
    lm.config._attn_implementation = "visualchat"
    causal = lm(input_ids=ids, vc_key_is_image=is_img, vc_attention_mode="causal").logits
    torch.testing.assert_close(causal, eager, atol=1e-5, rtol=1e-5)  # CA == the model's own attention

    # MMCA reached every layer: image positions no longer see the text before them
    mmca = lm(input_ids=ids, vc_key_is_image=is_img).logits
    ids2 = ids.clone()
    ids2[:, :5] = torch.randint(3, len(tiny_tokenizer), (2, 5))
    mmca2 = lm(input_ids=ids2, vc_key_is_image=is_img).logits
    causal2 = lm(input_ids=ids2, vc_key_is_image=is_img, vc_attention_mode="causal").logits
    torch.testing.assert_close(mmca[:, 5:11], mmca2[:, 5:11], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(causal[:, 5:11], causal2[:, 5:11], atol=1e-4)
    assert not torch.allclose(mmca[:, 11:], causal[:, 11:], atol=1e-4)  # text after images differs


# -- sessions ---------------------------------------------------------------------------------
def test_ask_with_and_without_images_and_stream_matches(tiny_vc):
    s = tiny_vc.new_session()
    a1 = s.ask("Hello there?", max_new_tokens=8)
    a2 = s.ask("What is in Image 1 and Image 2?", images=[color_image((255, 0, 0)), color_image((0, 0, 255))],
               max_new_tokens=8)
    assert isinstance(a1, str) and isinstance(a2, str)
    assert s.last_stats["new_tokens"] >= 1
    t = tiny_vc.new_session()
    assert "".join(t.stream("Hello there?", max_new_tokens=8)) == a1
    assert "".join(t.stream("What is in Image 1 and Image 2?",
                            images=[color_image((255, 0, 0)), color_image((0, 0, 255))], max_new_tokens=8)) == a2
    assert "### Image 2:\n[Image 2: 16 tokens]" in s.prompt_text()


def test_images_change_the_answer_logits(tiny_vc):
    s = tiny_vc.new_session()
    s.stream("Describe Image 1.", images=[color_image((255, 0, 0))]).close()
    r = s._render()
    a = s._prefill(r)
    s2 = tiny_vc.new_session()
    s2.stream("Describe Image 1.", images=[color_image((0, 255, 0))]).close()
    b = s2._prefill(s2._render())
    assert not torch.allclose(a, b)


def test_prefix_cache_matches_full_recompute(tiny_vc):
    s = tiny_vc.new_session()
    s.ask("First?", images=[color_image((10, 200, 30))], max_new_tokens=6)
    s.ask("Second, Image 2?", images=[color_image((200, 10, 30))], max_new_tokens=6)
    s.stream("Third?", images=[color_image((1, 2, 250))]).close()  # the open round: prefill only
    full_len = len(s._render())
    s._prefill(s._render())
    assert s.last_stats["prefill_tokens"] < full_len / 2  # rounds 1-2 came from the cache
    cached = s._prefill(s._render())
    assert s.last_stats["prefill_tokens"] == 1  # everything was already cached
    s._cache, s._cache_keys = None, []
    fresh = s._prefill(s._render())
    assert s.last_stats["prefill_tokens"] == full_len
    torch.testing.assert_close(cached, fresh, atol=1e-5, rtol=1e-5)


def test_sliding_window_model_chats_past_its_window(tiny_tokenizer, tiny_clip_dir):
    """A Mistral-style LM with an 8-token window: the prefix cache, undo and regenerate stay exact once
    the conversation is far longer than the window (each image alone is 16 tokens)."""
    from visualchat.encoders import build_encoder

    vc = VisualChat.from_components(tiny_mistral(tiny_tokenizer), tiny_tokenizer, build_encoder("clip:" + tiny_clip_dir))
    s = vc.new_session()
    a1 = s.ask("First?", images=[color_image((10, 200, 30))], max_new_tokens=6)
    s.ask("Second, Image 2?", images=[color_image((200, 10, 30))], max_new_tokens=6)
    s.stream("Third?").close()
    cached = s._prefill(s._render())
    s._cache, s._cache_keys = None, []
    torch.testing.assert_close(cached, s._prefill(s._render()), atol=1e-5, rtol=1e-5)
    s.undo()
    s.undo()
    assert "".join(s.regenerate(max_new_tokens=6)) == a1  # cropped back past the window, then decoded


def test_hf_sliding_window_cache_decodes_like_a_full_forward(tiny_tokenizer):
    """transformers' own cache for a sliding-window layer keeps only the latest keys; the attention
    then reads the matching tail of vc_key_is_image (lm.generate and other HF callers use that cache)."""
    from transformers import DynamicCache

    lm = tiny_mistral(tiny_tokenizer, sliding_window=6)
    lm.config._attn_implementation = "visualchat"
    ids = torch.randint(3, len(tiny_tokenizer), (1, 16))
    is_img = torch.zeros(1, 16, dtype=torch.bool)
    is_img[0, 3:7] = True
    full = lm(input_ids=ids, vc_key_is_image=is_img).logits[:, -1]
    cache = DynamicCache(config=lm.config)
    lm(input_ids=ids[:, :15], past_key_values=cache, use_cache=True, vc_key_is_image=is_img[:, :15])
    assert cache.layers[0].keys.shape[2] < 15  # the window dropped the oldest keys
    step = lm(input_ids=ids[:, 15:], past_key_values=cache, use_cache=True, vc_key_is_image=is_img).logits[:, -1]
    torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-5)


def test_unsupported_attention_features_are_refused():
    from visualchat.attention import hf_attention_forward

    q = torch.randn(1, 2, 3, 4)
    with pytest.raises(ValueError, match="soft-capping"):
        hf_attention_forward(None, q, q, q, softcap=30.0)
    with pytest.raises(ValueError, match="sinks"):
        hf_attention_forward(None, q, q, q, s_aux=torch.zeros(2))


def test_round_two_encodes_only_its_own_tokens(tiny_vc):
    s = tiny_vc.new_session()
    s.ask("First?", images=[color_image((10, 200, 30))], max_new_tokens=4)
    s.ask("Second?", images=[color_image((200, 10, 30))], max_new_tokens=4)
    r2 = tiny_vc.template.render_round(s.conversation.rounds[1], 2)
    sep = len(tiny_vc.tokenizer("\n\n", add_special_tokens=False)["input_ids"])
    # fed: round 1's last answer token, EOS and separator (never fed), then round 2's prompt
    assert s.last_stats["prefill_tokens"] <= 2 + sep + r2.answer_starts[0]
    assert s.last_stats["prefill_tokens"] < len(s._render()) / 2


def test_undo_and_regenerate(tiny_vc):
    s = tiny_vc.new_session()
    a1 = s.ask("One?", max_new_tokens=5)
    s.ask("Two?", images=[color_image((0, 0, 0))], max_new_tokens=5)
    assert len(s.images) == 1
    s.undo()
    assert len(s.conversation.rounds) == 1 and len(s.images) == 0
    again = "".join(s.regenerate(max_new_tokens=5))
    assert again == a1  # greedy: same answer, computed from the cropped cache
    fresh = tiny_vc.new_session()
    fresh.ask("One?", max_new_tokens=5)
    b = fresh.ask("Three?", max_new_tokens=5)
    assert s.ask("Three?", max_new_tokens=5) == b


def test_stop_keeps_partial_answer(tiny_vc):
    s = tiny_vc.new_session()
    s.stream("Stopped before the first token?").close()
    s.ask("Next?", max_new_tokens=3)  # the unstarted round was closed with an empty answer
    s.reset()
    gen = s.stream("Tell me a long story?", max_new_tokens=50, temperature=1.0, seed=0)
    next(gen, None)
    gen.close()
    assert len(s.conversation.rounds) == 1
    assert s.conversation.rounds[0].answer is not None
    s.ask("Go on?", max_new_tokens=3)  # still usable
    assert len(s.conversation.rounds) == 2


def test_bad_input_is_refused_and_nothing_lost(tiny_vc):
    s = tiny_vc.new_session()
    s.ask("Hi?", images=[color_image((1, 1, 1))], max_new_tokens=3)
    state = s.prompt_text()
    with pytest.raises(ValueError, match="empty"):
        s.ask("   ")
    with pytest.raises(ImageError, match="not an image"):
        s.ask("Bad?", images=[b"this is not an image"])
    with pytest.raises(ImageError, match="corrupt|truncated"):
        buf = io.BytesIO()
        color_image((5, 5, 5), (64, 64)).save(buf, format="PNG")
        s.ask("Bad?", images=[buf.getvalue()[:80]])
    with pytest.raises(TooManyImagesError, match="at most 8"):
        s.ask("Many?", images=[color_image((i, i, i)) for i in range(8)])
    with pytest.raises(ContextWindowError, match="context window is 512"):
        s.ask("word " * 600)
    assert s.prompt_text() == state
    s.ask("Still here?", max_new_tokens=3)


def test_decompression_bomb_refused(tiny_vc, monkeypatch):
    import visualchat.images as images

    monkeypatch.setattr(images, "MAX_PIXELS", 1000)
    s = tiny_vc.new_session()
    buf = io.BytesIO()
    color_image((5, 5, 5), (100, 100)).save(buf, format="PNG")
    with pytest.raises(ImageError, match="decompression bomb"):
        s.ask("Big?", images=[buf.getvalue()])


# -- checkpoints ------------------------------------------------------------------------------
def _saved_base(tmp_path, tok, **kw):
    lm = tiny_llama(tok, **kw)
    d = tmp_path / "lm"
    lm.save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


def _logits(vc):
    s = vc.new_session()
    s.stream("Compare Image 1 and Image 2?", images=[color_image((200, 0, 0)), color_image((0, 0, 200))]).close()
    return s._prefill(s._render())


@pytest.mark.parametrize("rows_changed", [5, 300], ids=["sparse", "dense"])
def test_checkpoint_round_trip(tmp_path, tiny_tokenizer, tiny_clip_dir, rows_changed):
    from safetensors.torch import load_file

    lm_dir = _saved_base(tmp_path, tiny_tokenizer)
    vc = VisualChat.from_pretrained(None, lm=lm_dir, vision="clip:" + tiny_clip_dir, device="cpu")
    torch.manual_seed(1)
    with torch.no_grad():
        vc.model.projection.weight.normal_()
        vc.model.embed_tokens.weight[:rows_changed] += torch.randn(rows_changed, 32)
    vc.save_pretrained(str(tmp_path / "ckpt"))
    stored = load_file(str(tmp_path / "ckpt" / WEIGHTS_NAME))
    if rows_changed < 100:
        assert stored["embed_tokens.rows"].shape == (rows_changed, 32)
    else:
        assert "embed_tokens.weight" in stored
    vc2 = VisualChat.from_pretrained(str(tmp_path / "ckpt"), device="cpu")
    torch.testing.assert_close(_logits(vc2), _logits(vc), atol=0, rtol=0)


def test_checkpoint_mismatch_is_explained(tmp_path, tiny_tokenizer, tiny_clip_dir):
    lm_dir = _saved_base(tmp_path, tiny_tokenizer)
    vc = VisualChat.from_pretrained(None, lm=lm_dir, vision="clip:" + tiny_clip_dir, device="cpu")
    vc.save_pretrained(str(tmp_path / "ckpt"))
    other = tmp_path / "other"
    other.mkdir()
    wide = tiny_llama(tiny_tokenizer, head_dim=16)
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{**wide.config.to_dict(), "hidden_size": 64, "head_dim": 16})
    LlamaForCausalLM(cfg).save_pretrained(other)
    tiny_tokenizer.save_pretrained(other)
    with pytest.raises(CheckpointMismatch, match="hidden size 32 vs the LM's 64"):
        VisualChat.from_pretrained(str(tmp_path / "ckpt"), lm=str(other), device="cpu")
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        VisualChat.from_pretrained(str(tmp_path / "nowhere"), device="cpu")


def test_generation_stops_at_the_next_template_section(tiny_vc, monkeypatch):
    """An undertrained model that writes '\\n### Question:' itself is cut there; the stream and the
    stored answer agree, and the next round renders from ids that match the text."""
    tok = tiny_vc.tokenizer
    script = tok("Red.\n### Question:\nmore", add_special_tokens=False)["input_ids"]
    calls = iter(script)

    def fake_next_token(logits, previous, cfg, generator=None):
        return next(calls)

    monkeypatch.setattr("visualchat.generation.next_token", fake_next_token)
    s = tiny_vc.new_session()
    streamed = "".join(s.stream("Colour?", max_new_tokens=len(script)))
    assert streamed == "Red." and s.conversation.rounds[0].answer == "Red."
    assert s._answer_ids[0] == tok("Red.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def test_failed_forward_mid_answer_keeps_session_usable(tiny_vc, monkeypatch):
    s = tiny_vc.new_session()
    s.ask("One?", max_new_tokens=3)
    real_step, n = s._step, {"calls": 0}

    def flaky(token):
        n["calls"] += 1
        if n["calls"] == 2:
            raise RuntimeError("boom")
        return real_step(token)

    monkeypatch.setattr(s, "_step", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        s.ask("Two?", max_new_tokens=8)
    monkeypatch.undo()
    assert len(s.conversation.rounds) == 2  # the partial answer was kept
    assert isinstance(s.ask("Three?", max_new_tokens=3), str)  # and the session still works


def test_sparse_store_ignores_rounding_of_a_lower_precision_base():
    from visualchat.checkpoint import embedding_tensors

    base32 = torch.randn(50, 8)
    trained = base32.clone()
    trained[[3, 7]] += 0.5
    t = embedding_tensors(trained, base32.to(torch.bfloat16))  # the LM was cast to bf16 for training
    assert t["embed_tokens.index"].tolist() == [3, 7]
    torch.testing.assert_close(t["embed_tokens.rows"], trained[[3, 7]])


def test_forward_returns_a_named_output_for_each_use(tiny_vc):
    """Issue 17: the loss path and the logits path each return their own dataclass, not a tuple whose
    meaning depends on the arguments."""
    from visualchat.model import LogitsOutput, LossOutput

    m = tiny_vc.model
    ids = torch.randint(3, 50, (1, 12))
    is_img = torch.zeros_like(ids, dtype=torch.bool)
    labels = torch.full_like(ids, -100)
    labels[0, 8:] = ids[0, 8:]
    with torch.no_grad():
        lo = m(ids, is_img, labels=labels)
        out = m(ids, is_img, past_key_values=m.new_cache(), use_cache=True, logits_to_keep=1)
        full = m(ids, is_img)
    assert type(lo) is LossOutput and lo.n_tokens == 4 and lo.loss.ndim == 0 and torch.isfinite(lo.loss)
    assert type(out) is LogitsOutput and out.logits.shape == (1, 1, m.lm.config.vocab_size)
    assert out.cache.get_seq_length() == 12 and full.logits.shape[1] == 12
    torch.testing.assert_close(out.logits[0, -1], full.logits[0, -1])
    # the loss is the mean cross-entropy of the label positions, from the same logits
    ref = torch.nn.functional.cross_entropy(full.logits[0, 7:11], ids[0, 8:12])
    torch.testing.assert_close(lo.loss, ref, atol=1e-5, rtol=1e-5)
