"""Shared fixtures: tiny random configs of the real architectures, and a tokenizer trained in memory."""
import os

import pytest
import torch

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


def tiny_llama(tokenizer, seed=0, **kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True, **kw)
    return LlamaForCausalLM(cfg).eval()


def tiny_qwen2(tokenizer, seed=0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return Qwen2ForCausalLM(cfg).eval()


def tiny_mistral(tokenizer, seed=0, sliding_window=8):
    """A tiny Mistral: LLaMA-like, but its attention layers have a sliding window."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    cfg = MistralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                        sliding_window=sliding_window, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return MistralForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    """A tiny random CLIP vision tower saved to disk, so it has a path (checkpoints name it)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=24, intermediate_size=48,
                           num_hidden_layers=2, num_attention_heads=2, projection_dim=24)
    path = tmp_path_factory.mktemp("clip")
    CLIPVisionModel(cfg).save_pretrained(path)
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
