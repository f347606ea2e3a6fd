"""Shared fixtures: tiny random configs of the real architectures, and a tokenizer trained in memory."""
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

CORPUS = [
    "You are a powerful vision-language assistant.",
    "### Image 1:\n### Image 2:\n### Question:\nWhat is in the image?\n\n### Answer:\nA red circle.",
    "How many shapes are there? There are 3 shapes. Which image has more circles? Image 2.",
    "the quick brown fox jumps over the lazy dog 0123456789 colour color blue green yellow",
]


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


#: the tests' tiny LM shapes (smaller than ``--lm tiny``'s); the models come from visualchat_train.tiny's factory
TEST_LM = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=512)


def tiny_llama(tokenizer, seed=0, **kw):
    from visualchat_train.tiny import random_lm

    return random_lm(tokenizer, "llama", seed, keep_rng=False, **{**TEST_LM, "tie_word_embeddings": True, **kw})


def save_tiny_checkpoint(tmp_path, tokenizer, clip_dir) -> tuple[str, str]:
    """A tiny LM saved in ``tmp_path/lm`` and an (untrained) checkpoint of it with the tiny CLIP in
    ``tmp_path/ckpt``, loadable by path. Returns (lm dir, checkpoint dir)."""
    from visualchat.model import VisualChat

    lm_dir = tmp_path / "lm"
    tiny_llama(tokenizer).save_pretrained(lm_dir)
    tokenizer.save_pretrained(lm_dir)
    vc = VisualChat.from_pretrained(None, lm=str(lm_dir), vision="clip:" + clip_dir, device="cpu")
    vc.save_pretrained(str(tmp_path / "ckpt"))
    return str(lm_dir), str(tmp_path / "ckpt")


def tiny_qwen2(tokenizer, seed=0):
    from visualchat_train.tiny import random_lm

    return random_lm(tokenizer, "qwen2", seed, keep_rng=False, **TEST_LM, tie_word_embeddings=False, bos_token_id=None)


def tiny_mistral(tokenizer, seed=0, sliding_window=8):
    """A tiny Mistral: LLaMA-like, but its attention layers have a sliding window."""
    from visualchat_train.tiny import random_lm

    return random_lm(tokenizer, "mistral", seed, keep_rng=False, **TEST_LM, tie_word_embeddings=False,
                     sliding_window=sliding_window)


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    """A tiny random CLIP vision tower saved to disk, so it has a path (checkpoints name it)."""
    from visualchat_train.tiny import random_clip

    path = tmp_path_factory.mktemp("clip")
    random_clip(0, keep_rng=False).save_pretrained(path)
    return str(path)


@pytest.fixture
def tiny_vc(tiny_tokenizer, tiny_clip_dir):
    """An untrained VisualChat: tiny random LLaMA + tiny CLIP, built through the public API."""
    from visualchat.encoders import build_encoder
    from visualchat.model import VisualChat

    enc = build_encoder("clip:" + tiny_clip_dir)
    return VisualChat.from_components(tiny_llama(tiny_tokenizer), tiny_tokenizer, enc, attention="mmca")


def color_image(rgb, size=(40, 30)):
    from PIL import Image

    return Image.new("RGB", size, rgb)
