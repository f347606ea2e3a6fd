"""Serving a LoRA checkpoint: the adapters are folded into the base weights (visualchat.lora.merge_lora),
so the LM keeps plain layers (low-precision weights and the lean decode step apply) and answers the same."""
import torch
from torch import nn

from visualchat.lora import inject, lora_parameters, merge_lora

from .conftest import save_tiny_checkpoint, tiny_llama


class _Holder(nn.Module):  # lora_parameters() takes names relative to the VisualChatModel
    def __init__(self, lm):
        super().__init__()
        self.lm = lm


def test_merge_keeps_the_logits_and_leaves_plain_linear_layers(tiny_tokenizer):
    lm = tiny_llama(tiny_tokenizer).eval()
    ids = torch.randint(0, lm.config.vocab_size, (1, 12))
    inject(lm, {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"})
    holder = _Holder(lm)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in lora_parameters(holder).values():  # B starts at zero: give the adapters an effect
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        with_adapters = lm(ids).logits
        n_linear = sum(hasattr(m, "base_layer") for m in lm.modules())
        assert merge_lora(lm) == n_linear > 0
        merged = lm(ids).logits
    assert not lora_parameters(holder)
    assert all(type(m) is nn.Linear for n, m in lm.named_modules() if n.endswith(("q_proj", "down_proj")))
    # fp32 sums in another order: the difference is rounding, far below the adapters' effect
    assert torch.allclose(merged, with_adapters, atol=1e-4)


def test_merge_changes_the_weights_by_the_adapters_product(tiny_tokenizer):
    lm = tiny_llama(tiny_tokenizer).eval()
    w0 = lm.model.layers[0].self_attn.q_proj.weight.detach().clone()
    inject(lm, {"r": 2, "lora_alpha": 6, "target_modules": ["q_proj"]})
    q = lm.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        q.lora_A["default"].weight.fill_(0.5)
        q.lora_B["default"].weight.fill_(0.25)
    merge_lora(lm)
    expect = w0 + (6 / 2) * (q.lora_B["default"].weight @ q.lora_A["default"].weight)
    assert torch.allclose(lm.model.layers[0].self_attn.q_proj.weight, expect, atol=1e-6)


def _lora_checkpoint(tmp_path, tiny_tokenizer, tiny_clip_dir):
    """A tiny checkpoint whose LM has (non-zero) LoRA adapters, saved the way the trainer exports one."""
    from visualchat_train.export import export_checkpoint
    from visualchat.model import VisualChat

    lm_dir, plain_dir = save_tiny_checkpoint(tmp_path, tiny_tokenizer, tiny_clip_dir)
    adapted = VisualChat.from_pretrained(plain_dir, lm=lm_dir, device="cpu", lm_weights="fp32")  # as the trainer has it
    lora = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    inject(adapted.model.lm, lora)
    with torch.no_grad():
        for p in lora_parameters(adapted.model).values():
            p.copy_(torch.randn_like(p) * 0.2)
    adapted.config.lora = {"lm": lora}
    export_checkpoint(adapted.model, str(tmp_path / "lora"), adapted.config)
    return lm_dir, plain_dir, str(tmp_path / "lora")


def test_a_lora_checkpoint_does_not_share_the_lm_of_another(tmp_path, tiny_tokenizer, tiny_clip_dir):
    """The Compare tab loads the second checkpoint with share_with=the first: with adapters folded into
    the weights, neither may use the other's LM, and each answers as when loaded alone."""
    from visualchat.model import VisualChat

    lm_dir, plain_dir, lora_dir = _lora_checkpoint(tmp_path, tiny_tokenizer, tiny_clip_dir)
    ids = torch.randint(0, 50, (1, 9))
    alone = {d: VisualChat.from_pretrained(d, lm=lm_dir, device="cpu") for d in (plain_dir, lora_dir)}
    for first, second in ((plain_dir, lora_dir), (lora_dir, plain_dir)):
        a = VisualChat.from_pretrained(first, lm=lm_dir, device="cpu")
        b = VisualChat.from_pretrained(second, lm=lm_dir, device="cpu", share_with=a)
        assert b.model.lm is not a.model.lm
        for vc, d in ((a, first), (b, second)):
            with torch.no_grad():
                assert torch.allclose(vc.model.lm(ids).logits, alone[d].model.lm(ids).logits, atol=1e-5)
    with torch.no_grad():  # the adapters matter: otherwise the check above could not fail
        assert not torch.allclose(alone[plain_dir].model.lm(ids).logits, alone[lora_dir].model.lm(ids).logits, atol=1e-3)
    # two plain checkpoints still share one LM
    c = VisualChat.from_pretrained(plain_dir, lm=lm_dir, device="cpu", share_with=alone[plain_dir])
    assert c.model.lm is alone[plain_dir].model.lm
