"""ZeRO-3 builds the LM partitioned from the start (transformers' ZeRO-3 path, deepspeed.zero.Init) in
the run's precision: right after the trainer's build_model, on 2 gloo ranks, every LM weight is a
ZeRO-3 parameter holding only its share, the trainable embedding copy equals the LM's embedding
(gathered for the copy), and the memory planner reports the load peak. A whole ZeRO-3 training run
with this load is covered by tests/test_train_run.py (stages agree, two processes, export)."""
import json
import subprocess
import sys

import pytest

from tests.test_train_run import ROOT, _env, _port
from visualchat_train import memory

SCRIPT = r'''
import json, os, sys
import torch
from visualchat_train import cli, trainer as T, dist as D

args = cli.parse_args(["--preset", "smoke", "--engine", "deepspeed", "--zero_stage", "3", "--output_dir",
                       sys.argv[1], "--no_progress", *sys.argv[3:]])
plan = T.preflight(args)
D.init()
vcm, tok, _ = T.build_model(args, plan, T.deepspeed_config(args, plan))
lm = [p for p in vcm.lm.parameters()]
full = sum(int(p.ds_numel) if hasattr(p, "ds_numel") else p.numel() for p in lm)
local = sum(int(p.ds_tensor.numel()) if hasattr(p, "ds_tensor") else p.numel() for p in lm)
import deepspeed
with deepspeed.zero.GatheredParameters([vcm.base_embedding]):
    same = bool(torch.equal(vcm.embed_tokens.weight.detach().float(), vcm.base_embedding.detach().float()))
out = {"rank": plan.rank, "all_zero3": all(hasattr(p, "ds_id") for p in lm), "full": full, "local": local,
       "dtypes": sorted({str(p.dtype) for p in lm}), "embedding_copied": same,
       "data_empty": all(p.data.numel() == 0 for p in lm)}
with open(os.path.join(sys.argv[2], f"rank{plan.rank}.json"), "w") as f:
    json.dump(out, f)
'''


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_zero3_builds_the_lm_partitioned_in_the_run_precision(tmp_path, precision):
    from visualchat_train.trainer import bf16_supported

    import torch
    if precision == "bf16" and not bf16_supported(torch.device("cpu")):
        pytest.skip("no bf16 on this CPU")
    script = tmp_path / "probe.py"
    script.write_text(SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", _port(),
           str(script), str(tmp_path / "out"), str(tmp_path), "--precision", precision]
    p = subprocess.run(cmd, cwd=ROOT, env=_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    ranks = [json.load(open(tmp_path / f"rank{r}.json")) for r in (0, 1)]
    want = "torch.bfloat16" if precision == "bf16" else "torch.float32"
    for r in ranks:
        assert r["all_zero3"] and r["data_empty"] and r["embedding_copied"], r
        assert r["dtypes"] == [want]
        # each rank holds about half of the LM (partitions are padded to the world size)
        assert r["local"] <= r["full"] / 2 + 64 * 2 and r["local"] < 0.6 * r["full"], r


def test_planner_reports_the_load_peak(capsys):
    lm, vis = memory.lm_shape("llama-2-70b"), memory.vision_shape("qwen-vl")
    z3, z2 = memory.estimate(lm, vis, 3, 16), memory.estimate(lm, vis, 2, 16)
    # ZeRO-2 loads the whole LM in fp32 on every GPU; ZeRO-3 loads its share in bf16
    assert z2["load_peak"] > lm.params() * 4
    share = lm.params() * 2 / 16
    assert share < z3["load_peak"] < share + (3 * lm.vocab * lm.hidden + vis[0]) * 4
    assert z3["load_peak"] < z2["load_peak"] / 10
    memory.main(["--lm", "llama-2-70b", "--vision", "qwen-vl", "--zero_stage", "3", "--gpus", "8", "--nodes", "2"])
    out = capsys.readouterr().out
    assert "Loading (the LM built partitioned in bf16" in out and "GiB per GPU at its peak" in out
    memory.main(["--lm", "llama-2-70b", "--zero_stage", "2", "--json"])
    assert json.loads(capsys.readouterr().out)["stages"]["2"]["load_peak"] > 0
