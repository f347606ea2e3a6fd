"""Under ZeRO-3 the trainer fills the partitioned LM tensor by tensor from its safetensors shards
(visualchat_train/zero3.py: partitioned_lm), not through transformers' loader (which reads the whole checkpoint
into one state dict on rank 0): on a one-rank gloo group, a tiny random LLaMA saved as several
safetensors shards comes out of build_model with every weight a ZeRO-3 parameter equal to the
checkpoint's, tied or untied; a checkpoint missing a tensor, or holding one the model lacks, stops the
load with the tensor's name."""
import json
import os
import subprocess
import sys

from tests.test_train_run import ROOT, _env

PROBE = r'''
import json, os, sys
import torch
from safetensors.torch import load_file
from visualchat_train import cli, trainer as T, dist as D, model as M
from visualchat_train.errors import TrainError
import deepspeed

def refuse(*a, **k):  # transformers' ZeRO-3 loader must not be used for a safetensors folder
    raise AssertionError("fell back to transformers' ZeRO-3 loader")
M.partitioned_load = refuse

out = {}
D.init()
for name in sys.argv[2:]:
    ckpt = os.path.join(sys.argv[1], name)
    args = cli.parse_args(["--preset", "smoke", "--engine", "deepspeed", "--zero_stage", "3", "--lm", ckpt,
                           "--output_dir", os.path.join(sys.argv[1], "run-" + name), "--no_progress",
                           "--precision", "fp32"])
    plan = T.preflight(args)
    try:
        vcm, tok, _ = T.build_model(args, plan, T.deepspeed_config(args, plan))
    except TrainError as e:
        out[name] = {"error": str(e)}
        continue
    lm = vcm.lm
    want = {}
    for f in sorted(os.listdir(ckpt)):
        if f.endswith(".safetensors"):
            want.update(load_file(os.path.join(ckpt, f)))
    params = dict(lm.named_parameters())
    res = {"all_zero3": all(hasattr(p, "ds_id") for p in params.values()),
           "data_empty": all(p.data.numel() == 0 for p in params.values()),
           "dtypes": sorted({str(p.dtype) for p in params.values()}),
           "tied": lm.lm_head.weight is lm.get_input_embeddings().weight, "mismatch": [], "unread": [],
           "training": lm.training}
    for n, p in params.items():
        with deepspeed.zero.GatheredParameters([p]):
            if n not in want or not torch.equal(p.detach(), want[n]):
                res["mismatch"].append(n)
    res["unread"] = sorted(set(want) - set(params))
    out[name] = res
with open(os.path.join(sys.argv[1], "result.json"), "w") as f:
    json.dump(out, f)
'''


def _save(folder, tie: bool, shard: str = "60KB"):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from visualchat_train.tiny import build_tokenizer

    tok = build_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=tie)
    torch.manual_seed(1 + tie)
    lm = LlamaForCausalLM(cfg)
    with torch.no_grad():  # values unlike any fresh initialisation (norms are ones when initialised)
        for p in lm.parameters():
            p.normal_()
    lm.save_pretrained(folder, max_shard_size=shard)
    tok.save_pretrained(folder)
    return lm


def _edit_shard(folder, edit):
    """Apply ``edit(dict) -> dict`` to the first shard holding a layer-1 tensor and rewrite the index."""
    from safetensors.torch import load_file, save_file

    index_path = os.path.join(folder, "model.safetensors.index.json")
    index = json.load(open(index_path))
    shard = index["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    tensors = edit(load_file(os.path.join(folder, shard)))
    save_file(tensors, os.path.join(folder, shard), metadata={"format": "pt"})
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard}
    index["weight_map"].update({k: shard for k in tensors})
    json.dump(index, open(index_path, "w"))


def test_zero3_fills_the_lm_tensor_by_tensor_from_safetensors_shards(tmp_path):
    import torch

    _save(tmp_path / "untied", tie=False)
    _save(tmp_path / "tied", tie=True)
    for name in ("untied", "tied"):
        assert len([f for f in os.listdir(tmp_path / name) if f.endswith(".safetensors")]) >= 2
    _save(tmp_path / "missing", tie=False)
    _edit_shard(tmp_path / "missing", lambda t: {k: v for k, v in t.items() if k != "model.layers.1.mlp.up_proj.weight"})
    _save(tmp_path / "extra", tie=False)
    _edit_shard(tmp_path / "extra", lambda t: {**t, "model.layers.1.mlp.gate.weight": torch.zeros(3)})
    _save(tmp_path / "shape", tie=False)
    _edit_shard(tmp_path / "shape", lambda t: {**t, "model.layers.1.mlp.up_proj.weight": torch.zeros(64, 31)})
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    p = subprocess.run([sys.executable, str(script), str(tmp_path), "untied", "tied", "missing", "extra", "shape"],
                       cwd=ROOT, env=_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    res = json.load(open(tmp_path / "result.json"))
    for name in ("untied", "tied"):
        r = res[name]
        assert "error" not in r, r
        assert r["all_zero3"] and r["data_empty"] and r["dtypes"] == ["torch.float32"], r
        assert r["mismatch"] == [] and r["unread"] == [] and r["training"] is False, r
    assert res["tied"]["tied"] and not res["untied"]["tied"]
    assert "1 tensors are missing from the checkpoint: ['model.layers.1.mlp.up_proj.weight']" in res["missing"]["error"]
    assert "missing" in res["missing"]["error"] and "--lm" in res["missing"]["error"]
    assert "the checkpoint has 1 tensors the model does not: ['model.layers.1.mlp.gate.weight']" in res["extra"]["error"]
    assert "model.layers.1.mlp.up_proj.weight: [64, 31] in the file, [64, 32] in the model" in res["shape"]["error"]


def test_zero3_config_limits_gathered_parameters_to_a_few_layers(tmp_path, capsys):
    """DeepSpeed's default 10^9 live parameters would keep a whole 1 B LM gathered between its forward
    and backward; the trainer writes limits from the LM's shape, the planner reports the budget, and
    --deepspeed_config still overrides them."""
    from transformers import LlamaConfig

    from visualchat_train import cli, memory
    from visualchat_train.preflight import deepspeed_config, preflight

    LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=18,
                num_attention_heads=16, tie_word_embeddings=False).save_pretrained(tmp_path / "lm")
    shape = memory.lm_shape(str(tmp_path / "lm"))
    layer = 4 * 2048 * 2048 + 3 * 2048 * 5632
    assert memory.zero3_unit(shape) == 32000 * 2048 > layer
    want = {"stage3_max_live_parameters": 2 * 32000 * 2048, "stage3_max_reuse_distance": 32000 * 2048,
            "stage3_prefetch_bucket_size": layer, "reduce_bucket_size": 32000 * 2048}
    assert memory.zero3_live_settings(shape) == want
    # a 70B layer (0.86 B parameters) is over half of DeepSpeed's default: capped there, never below one layer
    big = memory.zero3_live_settings(memory.lm_shape("llama-2-70b"))
    assert big["stage3_max_live_parameters"] == 10 ** 9 and big["stage3_max_reuse_distance"] < 10 ** 9

    def config(*flags):
        args = cli.parse_args(["--preset", "smoke", "--engine", "deepspeed", "--lm", str(tmp_path / "lm"),
                               "--output_dir", str(tmp_path / "run"), "--no_progress", *flags])
        return deepspeed_config(args, preflight(args))["zero_optimization"]

    z3 = config("--zero_stage", "3")
    assert {k: z3[k] for k in want} == want
    assert not any(k.startswith("stage3_") or k == "reduce_bucket_size" for k in config("--zero_stage", "2"))
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage3_max_live_parameters": 123}}))
    assert config("--zero_stage", "3", "--deepspeed_config", str(tmp_path / "ds.json"))["stage3_max_live_parameters"] == 123

    e = memory.estimate(shape, memory.vision_shape("tiny"), 3, 2, "bf16")
    assert e["zero3_gather"] == 2 * want["stage3_max_live_parameters"]
    memory.main(["--lm", str(tmp_path / "lm"), "--vision", "tiny", "--zero_stage", "3", "--gpus", "2"])
    out = capsys.readouterr().out
    assert "stage3_max_live_parameters 131 M" in out and "0.24 GiB of gathered parameters" in out


def test_a_hub_id_in_the_hub_cache_is_read_from_its_snapshot(tmp_path, monkeypatch):
    """The paper preset names its LM by hub id: once `huggingface-cli download` has put it in the hub
    cache, the tensor-by-tensor load reads that snapshot folder; an id not in the cache, or a snapshot
    missing a shard, is left to transformers' loader (which downloads)."""
    from visualchat_train.zero3 import lm_checkpoint_files, local_lm_folder

    cache = tmp_path / "hub"
    snap = cache / "models--org--tiny-llama" / "snapshots" / ("a" * 40)
    _save(snap, tie=False)
    (cache / "models--org--tiny-llama" / "refs").mkdir()
    (cache / "models--org--tiny-llama" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as C
    monkeypatch.setattr(C, "HF_HUB_CACHE", str(cache))
    folder = local_lm_folder("org/tiny-llama")
    assert os.path.samefile(folder, snap) and len(lm_checkpoint_files(folder)) >= 2
    assert local_lm_folder("org/not-downloaded") == "org/not-downloaded"
    assert local_lm_folder(str(snap)) == str(snap)
    index = json.load(open(snap / "model.safetensors.index.json"))
    os.remove(snap / sorted(set(index["weight_map"].values()))[-1])
    assert local_lm_folder("org/tiny-llama") == "org/tiny-llama"
