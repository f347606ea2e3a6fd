"""bench/default_model.py --llama_cpp: the peer anchor's pure helpers (no llama_cpp needed)."""
import pytest

from bench import default_model as dm


def test_gguf_bytes_per_token_counts_a_tied_head_once_and_skips_an_untied_embedding():
    tied = {"token_embd.weight": 300, "blk.0.attn_q.weight": 50, "blk.0.ffn_down.weight": 70, "output_norm.weight": 4}
    assert dm.gguf_bytes_per_token(tied) == 424  # the embedding is the head: all of it is read
    untied = {**tied, "output.weight": 200}
    assert dm.gguf_bytes_per_token(untied) == 324  # one row of the embedding per token: not counted


def test_fit_prompt_gives_exactly_n_tokens_with_head_and_tail_kept():
    def tok(s):  # a fake tokenizer: one token per word
        return [hash(w) % 1000 for w in s.split()]

    ids = dm.fit_prompt(tok, "user says", "one two three", "describe it now", 202)
    assert len(ids) == 202
    assert ids[:2] == tok("user says") and ids[-3:] == tok("describe it now")
    assert ids[2:5] == tok("one two three") and ids[5:8] == tok("one two three")  # the filler repeats
    assert len(dm.fit_prompt(tok, "a", "b c", "d", 2)) == 2  # no room for filler
    with pytest.raises(ValueError, match="longer than n=3"):
        dm.fit_prompt(tok, "a b", "c", "d e", 3)
    with pytest.raises(ValueError, match="filler"):
        dm.fit_prompt(tok, "a", "", "d", 5)


def test_kv_f16_bytes_and_anchor_figures():
    # SmolLM2-135M: 30 layers, 3 KV heads of 64; K and V in float16 over 234 tokens
    assert dm.kv_f16_bytes(30, 3, 64, 234) == 2 * 30 * 3 * 64 * 234 * 2
    r = dm.anchor_figures([0.01, 0.02, 0.012], stream_s=0.5, n_new=10, weight_bytes=90_000_000,
                          kv_bytes=10_000_000, bandwidth=30e9)
    assert r["step_s"] == 0.012 and r["step_tok_s"] == pytest.approx(1 / 0.012)
    assert r["session_tok_s"] == pytest.approx(20.0)
    assert r["limit_tok_s"] == pytest.approx(300.0)  # 30 GB/s over 100 MB per token
    assert r["share"] == pytest.approx((1 / 0.012) / 300)
    with pytest.raises(ValueError, match="at least one timed step"):
        dm.anchor_figures([], 1.0, 1, 1, 0, 1.0)


def test_llama_cpp_anchor_skips_with_a_message_when_not_installed(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    msg = dm.run_llama_cpp(202, 32, 2)
    assert isinstance(msg, str) and "llama-cpp-python" in msg and "skipped" in msg
