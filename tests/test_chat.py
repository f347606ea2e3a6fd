"""The command-line chat on a tiny saved checkpoint."""
import pytest

from tests.conftest import color_image, save_tiny_checkpoint
from visualchat import chat


@pytest.fixture
def tiny_ckpt(tmp_path, tiny_tokenizer, tiny_clip_dir):
    return save_tiny_checkpoint(tmp_path, tiny_tokenizer, tiny_clip_dir)[1]


def test_one_shot_question_with_image(tiny_ckpt, tmp_path, capsys):
    color_image((0, 255, 0)).save(tmp_path / "g.png")
    rc = chat.main(["--checkpoint", tiny_ckpt, "--image", str(tmp_path / "g.png"), "--ask", "What is it?",
                    "--max_new_tokens", "3"])
    assert rc == 0


def test_the_cli_serves_the_apps_weight_format_and_fp32_is_one_flag_away(tiny_ckpt, capsys):
    from visualchat.kernels import lowp

    assert chat.main(["--checkpoint", tiny_ckpt, "--ask", "Hi?", "--max_new_tokens", "2"]) == 0
    assert f"LM weights {lowp.resolve('auto', 'cpu')[0]}" in capsys.readouterr().err
    assert chat.main(["--checkpoint", tiny_ckpt, "--ask", "Hi?", "--max_new_tokens", "2", "--lm_weights", "fp32"]) == 0
    assert "LM weights fp32\n" in capsys.readouterr().err


def test_bad_image_is_a_clear_error(tiny_ckpt, tmp_path, capsys):
    (tmp_path / "x.png").write_bytes(b"not a png")
    rc = chat.main(["--checkpoint", tiny_ckpt, "--image", str(tmp_path / "x.png"), "--ask", "What?"])
    assert rc == 2
    assert "not an image" in capsys.readouterr().err


def test_interactive_commands(tiny_ckpt, tmp_path, monkeypatch, capsys):
    color_image((0, 0, 255)).save(tmp_path / "b.png")
    lines = iter([f"/image {tmp_path / 'b.png'}", "What is in Image 1?", "/prompt", "/undo", "/image nope.png",
                  "Hi?", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert chat.main(["--checkpoint", tiny_ckpt, "--max_new_tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "[Image 1: 16 tokens]" in out
    assert "removed the last round" in out
    assert "image not found: nope.png" in out and "conversation is unchanged" in out


def test_refused_image_is_dropped_and_the_chat_goes_on(tiny_ckpt, tmp_path, monkeypatch, capsys):
    color_image((0, 0, 255)).save(tmp_path / "b.png")
    (tmp_path / "fake.png").write_bytes(b"not a png")
    lines = iter([f"/image {tmp_path / 'b.png'}", "What is in Image 1?", f"/image {tmp_path / 'fake.png'}",
                  "Hi?", "/undo", "/prompt", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert chat.main(["--checkpoint", tiny_ckpt, "--max_new_tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "not an image" in out and "not attached" in out  # refused with the reason, at once
    assert out.count("vc> ") == 2  # the later question was answered
    # /undo took back "Hi?", not the real first round
    prompt = out[out.index("removed the last round"):]
    assert "What is in Image 1?" in prompt and "[Image 1: 16 tokens]" in prompt and "Hi?" not in prompt


def test_answer_line_keeps_its_prefix_when_a_warning_is_raised(tiny_ckpt, monkeypatch, capsys):
    """A warning from the first forward (as transformers' deprecation warnings were) is printed after the
    answer's line, not between "vc> " and the answer."""
    import io
    import sys
    import warnings

    from visualchat.model import VisualChatModel

    orig = VisualChatModel.forward
    calls = []

    def forward(self, *a, **k):
        calls.append(1)
        if len(calls) == 1:
            warnings.warn("a deprecation warning from deep inside", FutureWarning)
        return orig(self, *a, **k)

    monkeypatch.setattr(VisualChatModel, "forward", forward)
    both = io.StringIO()  # stdout and stderr in one stream, as a terminal shows them
    monkeypatch.setattr(sys, "stdout", both)
    monkeypatch.setattr(sys, "stderr", both)
    lines = iter(["Hello there?", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert chat.main(["--checkpoint", tiny_ckpt, "--max_new_tokens", "3"]) == 0
    text = both.getvalue()
    (line,) = [ln for ln in text.splitlines() if "vc> " in ln]
    assert line.startswith("vc> ") and "deprecation" not in line
    assert "FutureWarning: a deprecation warning from deep inside" in text.split(line, 1)[1]
