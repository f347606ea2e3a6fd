"""The sampling step on its own: greedy, repetition penalty, top-p and a seeded draw; the text streamer."""
import torch

from visualchat.generation import GenerationConfig, TextStreamer, next_token


def test_greedy_takes_the_argmax_and_leaves_the_logits_alone():
    logits = torch.tensor([0.1, 2.0, 1.9, -3.0])
    before = logits.clone()
    assert next_token(logits, [], GenerationConfig()) == 1
    assert next_token(logits, [1], GenerationConfig()) == 1  # no penalty: earlier tokens do not matter
    assert torch.equal(logits, before)


def test_the_repetition_penalty_moves_greedy_off_a_repeated_token_without_touching_the_input():
    logits = torch.tensor([0.1, 2.0, 1.9, -3.0])
    before = logits.clone()
    assert next_token(logits, [1], GenerationConfig(repetition_penalty=1.2)) == 2  # 2.0 / 1.2 < 1.9
    assert next_token(logits, [3], GenerationConfig(repetition_penalty=1.2)) == 1
    assert torch.equal(logits, before)


def test_top_p_keeps_only_the_head_and_a_seed_repeats_the_draw():
    logits = torch.tensor([5.0, 4.9, -10.0, -10.0])
    cfg = GenerationConfig(temperature=1.0, top_p=0.5, seed=0)
    draws = {next_token(logits, [], cfg, torch.Generator().manual_seed(s)) for s in range(20)}
    assert draws == {0}  # token 0 alone holds more than half the mass
    wide = GenerationConfig(temperature=1.0, top_p=1.0)
    a = [next_token(logits, [], wide, torch.Generator().manual_seed(s)) for s in range(20)]
    b = [next_token(logits, [], wide, torch.Generator().manual_seed(s)) for s in range(20)]
    assert a == b and set(a) <= {0, 1} and len(set(a)) == 2


def stream_all(tokenizer, ids):
    """Push ``ids`` through a TextStreamer, recording the length of every id list it decodes."""
    windows = []
    decode = tokenizer.decode

    def counting(ids, **kw):
        windows.append(len(ids))
        return decode(ids, **kw)

    tokenizer.decode = counting
    try:
        streamer = TextStreamer(tokenizer)
        pieces = [streamer.push(i) for i in ids]
    finally:
        del tokenizer.decode
    return streamer, pieces, windows


def test_streamer_decodes_a_short_window_and_gives_the_whole_decode(tiny_tokenizer):
    """Byte-level BPE (GPT-2, SmolLM2): characters the tokenizer never saw are split into byte tokens.
    The pieces join to the decode of all ids, none carries half a character, and no push decodes more
    than a few ids however long the answer grows."""
    text = "A red circle, naïve café; 日本語 🙂 and 🙂🙂! " * 8
    ids = tiny_tokenizer(text).input_ids
    assert len(ids) > 300 and len(ids) > len(text) // 2  # many tokens, several per multi-byte character
    streamer, pieces, windows = stream_all(tiny_tokenizer, ids)
    assert "".join(pieces) == streamer.text == tiny_tokenizer.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)
    assert max(windows) <= 8, max(windows)  # the bytes of one character and the piece before them


def test_streamer_matches_a_sentencepiece_decoder_at_every_step():
    """LLaMA-style SentencePiece decoding: ``▁`` is a space, the first one of a decode is stripped, and
    unknown characters come as ``<0x..>`` byte tokens. After each push the streamed text is the decode
    of all ids so far (less an unfinished character), though each push sees a window only."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    pieces = ["<unk>", "</s>", "▁Hello", "▁world", ",", "▁caf", "!", "▁"] + [f"<0x{b:02X}>" for b in range(256)]
    tk = Tokenizer(models.WordLevel({p: i for i, p in enumerate(pieces)}, unk_token="<unk>"))
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>", unk_token="<unk>")
    vocab = {p: i for i, p in enumerate(pieces)}
    byte = lambda s: [vocab[f"<0x{b:02X}>"] for b in s.encode()]  # noqa: E731
    ids = ([vocab["▁Hello"], vocab[","], vocab["▁world"], vocab["!"], vocab["▁caf"]] + byte("é")
           + [vocab["▁"]] + byte("🙂") + [vocab["</s>"], vocab["▁Hello"]] + byte("日本") + [vocab["!"]])
    streamer = TextStreamer(tok)
    for n, i in enumerate(ids, 1):
        streamer.push(i)
        whole = tok.decode(ids[:n], skip_special_tokens=True)
        if not whole.endswith("\ufffd"):
            assert streamer.text == whole, (n, streamer.text, whole)
    assert streamer.text == "Hello, world! café 🙂 Hello日本!"


def test_generation_settings_are_checked_once_where_they_are_made():
    """Issue 28: GenerationConfig is the one check of generation settings (what serving.check_generation
    did apart): types, finiteness, ranges, a server's cap on max_new_tokens, normalised values."""
    import pytest

    cfg = GenerationConfig(max_new_tokens=12.0, temperature=1, top_p=1, repetition_penalty=1, seed=3.0)
    assert (cfg.max_new_tokens, cfg.temperature, cfg.seed) == (12, 1.0, 3)
    assert type(cfg.max_new_tokens) is int and type(cfg.temperature) is float and type(cfg.seed) is int
    assert GenerationConfig(max_new_tokens=5000).max_new_tokens == 5000  # no server: no cap
    bad = [({"max_new_tokens": 5000, "max_new_tokens_limit": 1024},
            r"max_new_tokens must be a whole number from 1 to 1024 \(this server's limit\), got 5000"),
           ({"max_new_tokens": "12"}, "max_new_tokens must be a whole number >= 1, got str"),
           ({"max_new_tokens": 0}, "max_new_tokens must be a whole number >= 1, got 0"),
           ({"temperature": float("nan")}, r"temperature must be a number from 0 \(greedy\) to 5, got nan"),
           ({"temperature": -1}, "temperature must be a number from 0"),
           ({"top_p": 0}, "top_p must be a number > 0 and <= 1, got 0"),
           ({"repetition_penalty": True}, "repetition_penalty must be a number > 0 and <= 10 .* got bool"),
           ({"seed": -1}, r"seed must be null or a whole number from 0 to 2\*\*63-1, got -1")]
    for kw, message in bad:
        with pytest.raises(ValueError, match=message):
            GenerationConfig(**kw)
