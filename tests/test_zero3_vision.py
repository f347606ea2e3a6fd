"""Under ZeRO-3 the Qwen-VL encoder is built partitioned from the start, like the LM (visualchat_train/zero3.py):
on 2 gloo ranks, right after the trainer's build_model every encoder weight is a ZeRO-3 parameter
holding only its rank's share, in the run's precision, with the checkpoint's values; the feature
cache is filled with the partitioned encoder in lockstep (ranks with different numbers of images)
and gives the whole encoder's features; a short ZeRO-3 training run with it completes and exports;
the memory planner counts the encoder's share at load."""
import json
import subprocess
import sys

import pytest
import torch

from tests.test_encoders import _save_qwen_checkpoint, _tiny_qwen
from tests.test_train_run import ROOT, _env, _port, run_train
from visualchat_train import memory

PROBE = r'''
import json, os, sys
import torch
from visualchat_train import cli, trainer as T, dist as D
from visualchat_train.features import FeatureCache, encoder_key, image_key
from visualchat_train.zero3 import is_partitioned
import deepspeed

ckpt, out_dir, precision = sys.argv[1], sys.argv[2], sys.argv[3]
args = cli.parse_args(["--preset", "smoke", "--engine", "deepspeed", "--zero_stage", "3", "--output_dir",
                       os.path.join(out_dir, "run"), "--no_progress", "--vision", "qwen-vl:" + ckpt,
                       "--precision", precision])
plan = T.preflight(args)
D.init()
vcm, tok, _ = T.build_model(args, plan, T.deepspeed_config(args, plan))
enc = vcm.encoder
params = dict(enc.named_parameters())
res = {"rank": plan.rank, "all_zero3": all(hasattr(p, "ds_id") for p in params.values()),
       "data_empty": all(p.data.numel() == 0 for p in params.values()),
       "full": sum(int(p.ds_numel) for p in params.values()),
       "local": sum(int(p.ds_tensor.numel()) for p in params.values()),
       "dtypes": sorted({str(p.dtype) for p in params.values()}), "requires_grad": any(p.requires_grad for p in params.values())}
# the values: each parameter gathered, against the checkpoint (cast to the run's dtype)
from visualchat.encoders.qwen_vl import QwenVLEncoder
whole = QwenVLEncoder.from_checkpoint(ckpt).to(next(iter(params.values())).dtype)
wsd = whole.state_dict()
same = True
for name, p in params.items():
    with deepspeed.zero.GatheredParameters([p]):
        same &= bool(torch.equal(p.detach().cpu(), wsd[name]))
res["values_match"] = same
res["key_matches_whole"] = encoder_key(enc) == encoder_key(whole)
# the feature cache: rank 0 has three images, rank 1 none (lockstep: rank 1 runs blank forwards)
from PIL import Image
refs = []
for i in range(3):
    path = os.path.join(out_dir, f"img{i}.png")
    if plan.rank == 0:
        Image.new("RGB", (60, 50), (40 * i, 200 - 30 * i, 90)).save(path)
    refs.append(path)
D.barrier()
cache = FeatureCache(os.path.join(out_dir, f"features{plan.rank}"), enc)
bad = cache.fill(enc, refs if plan.rank == 0 else [], batch_size=2, rank=0, world=1, progress=False)
res["bad"] = bad
if plan.rank == 0:
    ims = [Image.open(r).convert("RGB") for r in refs]
    ref_feats = whole.encode(ims).float()
    got = torch.stack([cache.get(image_key(r)) for r in refs])
    res["features_close"] = bool(torch.allclose(got, ref_feats, atol=5e-2 if precision == "bf16" else 1e-3, rtol=1e-2))
res["still_partitioned"] = is_partitioned(enc) and all(p.data.numel() == 0 for p in enc.parameters())
with open(os.path.join(out_dir, f"rank{plan.rank}.json"), "w") as f:
    json.dump(res, f)
'''


@pytest.fixture(scope="module")
def qwen_ckpt(tmp_path_factory):
    cfg, enc = _tiny_qwen()
    path = tmp_path_factory.mktemp("qwen") / "ckpt"
    _save_qwen_checkpoint(path, cfg, enc.state_dict())
    return str(path), cfg


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_zero3_builds_qwen_vl_partitioned_and_fills_the_cache_in_lockstep(tmp_path, qwen_ckpt, precision):
    from visualchat_train.trainer import bf16_supported

    if precision == "bf16" and not bf16_supported(torch.device("cpu")):
        pytest.skip("no bf16 on this CPU")
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", _port(),
           str(script), qwen_ckpt[0], str(tmp_path), precision]
    p = subprocess.run(cmd, cwd=ROOT, env=_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    ranks = [json.load(open(tmp_path / f"rank{r}.json")) for r in (0, 1)]
    want = "torch.bfloat16" if precision == "bf16" else "torch.float32"
    for r in ranks:
        assert r["all_zero3"] and r["data_empty"] and not r["requires_grad"], r
        assert r["dtypes"] == [want], r
        # each rank holds about half of the encoder (each parameter's partition is padded to the world size)
        n_params = len(dict(_tiny_qwen()[1].named_parameters()))
        assert r["local"] <= r["full"] / 2 + n_params and r["local"] < 0.6 * r["full"], r
        assert r["values_match"] and r["key_matches_whole"], r
        assert r["bad"] == {} and r["still_partitioned"], r
    assert ranks[0]["features_close"]


def test_zero3_training_run_with_a_partitioned_qwen_vl(tmp_path, qwen_ckpt):
    out = tmp_path / "run"
    run_train(out, "--engine", "deepspeed", "--zero_stage", "3", "--vision", "qwen-vl:" + qwen_ckpt[0],
              "--max_steps", "2", "--eval_every", "2", "--dataset_samples", "24", nproc=2, timeout=900)
    cfg = json.load(open(out / "final" / "config.json"))
    assert cfg["vision"] == "qwen-vl:" + qwen_ckpt[0] and cfg["info"]["zero_stage"] == 3
    assert cfg["vision_hidden_size"] == qwen_ckpt[1].output_dim
    # the exported checkpoint loads whole, with the encoder read from the same files
    from visualchat.model import VisualChat

    vc = VisualChat.from_pretrained(str(out / "final"), device="cpu", dtype=torch.float32)
    assert vc.model.encoder.config == qwen_ckpt[1]


def test_planner_counts_the_partitioned_encoder_at_load(capsys):
    from visualchat_train.zero3 import encoder_partitioned

    assert encoder_partitioned("qwen-vl") and encoder_partitioned("qwen-vl:/data/Qwen-VL-Chat")
    assert not encoder_partitioned("clip:openai/clip-vit-large-patch14") and not encoder_partitioned("default")
    lm, vis = memory.lm_shape("llama-2-70b"), memory.vision_shape("qwen-vl")
    whole = memory.estimate(lm, vis, 3, 16)["load_peak"]
    part = memory.estimate(lm, vis, 3, 16, vision_partitioned=True)["load_peak"]
    # the encoder's 1.94 B parameters: 4 bytes each on every GPU before, 2 / 16 bytes each now
    assert abs((whole - part) - (vis[0] * 4 - vis[0] * 2 / 16 - vis[1] ** 2 * 4)) < 1e6
    # ZeRO-2 is unchanged (every GPU loads everything whole)
    assert memory.estimate(lm, vis, 2, 16, vision_partitioned=True)["load_peak"] == memory.estimate(lm, vis, 2, 16)["load_peak"]
    memory.main(["--lm", "llama-2-70b", "--vision", "qwen-vl", "--zero_stage", "3", "--gpus", "8", "--nodes", "2"])
    out = capsys.readouterr().out
    assert "the encoder partitioned in bf16" in out and f"{part / memory.GiB:.2f} GiB per GPU at its peak" in out
    memory.main(["--lm", "llama-2-70b", "--vision", "clip:openai/clip-vit-large-patch14", "--zero_stage", "3"])
    assert "the encoder whole in fp32" in capsys.readouterr().out
