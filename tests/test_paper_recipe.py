"""The paper preset's data pipeline on fixtures in the published layouts, against the rule behind the
paper's Table 1: LLaVA packs a random 1..3 conversations per sample (so about N / 2 samples), LLaVA
dialogue a random 1..2 (about 2N / 3), every other set one conversation per sample; a sample with
more than 8 images is dropped (not cut), and an image missing from a MIMIC-IT images file drops just
that image (the original's preprocessing). Also: the preset's global batch and the derived
accumulation, the new data flags one by one, and --data_debug_path."""
import base64
import math
import os
from collections import Counter

import pytest

from tests.test_data_loaders import COLORS, CharTokenizer, cgd_ins, coco, img_bytes, llava_sample, write_img, write_json
from visualchat_train import cli
from visualchat_train import trainer as T
from visualchat_train.data.packing import pack_set
from visualchat_train.samples import build_samples_from_config, dump_debug_samples, parse_names
from visualchat.template import Conversation, Round, Template

N_LLAVA, N_DIAL = 600, 300


def b64(i):
    return base64.b64encode(img_bytes(COLORS[i % len(COLORS)])).decode()


def make_paper_root(root):
    """All nine paper sets, small. Returns the expected per-set counts of the non-random sets."""
    for i in range(1, 5):
        write_img(coco(root, f"{i:012d}.jpg"), COLORS[i])
    imgs = [f"{i:012d}.jpg" for i in range(1, 5)]
    write_json(root / "llava" / "detail_23k.json",
               [llava_sample(imgs[i % 4], (f"<image>\nDetail {i}?", f"D{i}.")) for i in range(N_LLAVA // 3)])
    write_json(root / "llava" / "complex_reasoning_77k.json",
               [llava_sample(imgs[i % 4], (f"Why {i}?\n<image>", f"R{i}.")) for i in range(N_LLAVA - N_LLAVA // 3)])
    write_json(root / "llava" / "conversation_58k.json",
               [llava_sample(imgs[i % 4], (f"<image>\nChat {i}?", f"C{i}."), (f"More {i}?", f"M{i}."))
                for i in range(N_DIAL)])
    # CGD: 5 groups of 2 images, one of 9 (dropped by the paper's rule)
    cgd = {}
    for g in range(5):
        cgd[f"CGD_INS_{g:06d}"] = cgd_ins(f"<image>Compare {g}.", f"Same {g}.",
                                         [f"CGD_IMG_{(g % 4) + 1:012d}", f"CGD_IMG_{((g + 1) % 4) + 1:012d}"], [])
    cgd["CGD_INS_000099"] = cgd_ins("<image>Nine?", "Yes.", [f"CGD_IMG_{(j % 4) + 1:012d}" for j in range(9)], [])
    write_json(root / "MIMIC-IT" / "CGD_instructions.json", {"meta": {}, "data": cgd})
    expected = {"otter_mimicit_cgd": 5}
    # base64 sets: per set, 6 groups of 3 images (one with a missing id: kept with 2 images), 2 groups of
    # 10 images (dropped), 1 group of 10 ids of which 3 are missing (7 present: kept, as the original)
    for set_name in ("SD", "SN", "TVC", "VST"):
        images = {f"{set_name}_IMG_{i:02d}": b64(i) for i in range(12)}
        ids = lambda *idx: [f"{set_name}_IMG_{i:02d}" for i in idx]  # noqa: E731
        ins = {}
        for g in range(6):
            ins[f"{set_name}_INS_{g}"] = cgd_ins(f"<image>Story {g}?", f"Story {g}.", ids(g, g + 1, g + 2), [])
        ins[f"{set_name}_INS_5"]["image_ids"] = ids(5, 6) + [f"{set_name}_IMG_404"]
        for g in (6, 7):
            ins[f"{set_name}_INS_{g}"] = cgd_ins("<image>Clip?", "Frames.", ids(*range(10)), [])
        ins[f"{set_name}_INS_8"] = cgd_ins("<image>Gappy?", "Yes.",
                                           ids(*range(7)) + [f"{set_name}_IMG_9{j}" for j in range(3)], [])
        write_json(root / "MIMIC-IT" / f"{set_name}_instructions.json", {"meta": {}, "data": ins})
        write_json(root / "MIMIC-IT" / f"{set_name}.json", images)
        expected[f"otter_mimicit_{set_name.lower()}"] = 7
    # Sparkles: two dialogues of 2 images, one of 9 images (dropped)
    for sub in ("CC", "VG"):
        for i in range(9):
            write_img(root / f"SparklesDialogue{sub}" / "images" / f"{i}.jpg", COLORS[i])

    def dialogue(*rounds):
        msgs = []
        for ids in rounds:
            tags = " and ".join(f"IMAGE#{i}<Img><ImageHere></Img>" for i in ids)
            msgs += [{"role": "user", "content": f"Compare {tags}.", "images": [{"image_id": i} for i in ids]},
                     {"role": "assistant", "content": "They differ."}]
        return {"dialogue": msgs}
    write_json(root / "SparklesDialogueCC" / "annotations" / "SparklesDialogueCC.json",
               [dialogue([0, 1]), dialogue(list(range(5)), list(range(5, 9)))])
    write_json(root / "SparklesDialogueVG" / "annotations" / "SparklesDialogueVG.json", [dialogue([2, 3])])
    expected["sparkles_dialogue"] = 2
    return expected


def paper_args(root, *extra):
    return cli.parse_args(["--preset", "paper", "--data_path", str(root), "--val_ratio", "0", "--max_seq_len", "100000",
                           *extra])


def build(args, convs_out=None):
    tpl = Template(CharTokenizer(), image_tokens=2)
    return build_samples_from_config(args, parse_names(args.dataset_names), tpl, conversations_out=convs_out)


def band(n, k):
    """The expected number of samples of n conversations packed in groups of a uniform 1..k, and a
    5-sigma band (renewal theory: mean n / mu, variance n * var / mu^3)."""
    mu = (k + 1) / 2
    var = (k * k - 1) / 12
    return n / mu, 5 * math.sqrt(n * var / mu ** 3)


def test_paper_preset_sample_counts_follow_table_1s_rule(tmp_path):
    expected = make_paper_root(tmp_path)
    args = paper_args(tmp_path)
    convs = {}
    train_s, val_s, stats = build(args, convs)
    counts = Counter(s.source for s in train_s)
    assert not val_s
    for name, n in expected.items():
        assert counts[name] == n, (name, counts[name], n, stats.as_dict())
    # more than 8 images: dropped (2 clips per MIMIC-IT set, the 9-image CGD group and Sparkles dialogue)
    d = stats.as_dict()
    for name in ("otter_mimicit_sd", "otter_mimicit_sn", "otter_mimicit_tvc", "otter_mimicit_vst"):
        assert d[f"{name}/skipped_too_many_images"] == 2
    assert d["otter_mimicit_cgd/skipped_too_many_images"] == 1
    assert d["sparkles_dialogue/skipped_too_many_images"] == 1
    # a missing image drops only that image; 7 of 10 present ids make a 7-image sample
    sn = sorted(len(c.images) for c in convs["otter_mimicit_sn"])
    assert sn == [2, 3, 3, 3, 3, 3, 7]
    # LLaVA: a random 1..3 per sample, every conversation once; dialogue a random 1..2
    for name, n, k in (("llava", N_LLAVA, 3), ("llava_dial", N_DIAL, 2)):
        sizes = Counter(len(c.images) for c in convs[name])
        assert set(sizes) == set(range(1, k + 1)), (name, sizes)
        assert sum(size * m for size, m in sizes.items()) == n
        mean, tol = band(n, k)
        assert abs(counts[name] - mean) <= tol, (name, counts[name], mean, tol)
    # the blend is there, images in CGD order, and drawn reproducibly
    assert counts["llava_otter_blend"] >= 1
    again = Counter(s.source for s in build(paper_args(tmp_path))[0])
    assert again == counts


def test_exact_packing_and_cutting_differ_from_the_paper(tmp_path):
    """The defaults (exact k per sample, cut to 8 images, skip a sample with a missing image) give other
    counts: what the paper preset changes."""
    make_paper_root(tmp_path)
    args = paper_args(tmp_path, "--concatenate_draw", "exact", "--over_max_images", "cut",
                      "--missing_image", "skip_sample")
    convs = {}
    train_s, _, stats = build(args, convs)
    counts = Counter(s.source for s in train_s)
    assert counts["llava"] == N_LLAVA // 3 and counts["llava_dial"] == N_DIAL // 2
    assert counts["otter_mimicit_sn"] == 7  # 5 + 2 clips cut to 8, less 2 with a missing image
    assert counts["sparkles_dialogue"] == 3  # the 9-image dialogue cut to its first round
    assert max(len(c.images) for c in convs["otter_mimicit_tvc"]) == 8


def test_paper_preset_global_batch_sets_accumulation(tmp_path, monkeypatch):
    a = paper_args(tmp_path, "--output_dir", str(tmp_path / "out"), "--lm", "tiny", "--vision", "tiny",
                   "--precision", "fp32", "--dataset_names", "jsonl", "--data_path", str(tmp_path))
    assert a.global_batch_size == 128 and a.per_device_batch_size == 1
    for world, accum in ((16, 8), (8, 16), (1, 128)):
        monkeypatch.setattr(T.D, "world_size", lambda w=world: w)
        plan = T.preflight(a)
        assert (plan.accum, plan.global_batch) == (accum, 128)
    monkeypatch.setattr(T.D, "world_size", lambda: 3)
    with pytest.raises(T.TrainError, match="128 is not divisible"):
        T.preflight(a)


def test_random_draw_packing_unit():
    convs = [Conversation(rounds=[Round(f"q{i}", images=[f"i{i}"], answer="a")]) for i in range(300)]
    exact = pack_set(convs, 3, seed=1)
    rnd = pack_set(convs, 3, seed=1, draw="random")
    assert {len(c.rounds) for c in exact} == {3} and len(exact) == 100
    assert {len(c.rounds) for c in rnd} == {1, 2, 3}
    assert sorted(r.question for c in rnd for r in c.rounds) == sorted(c.rounds[0].question for c in convs)
    assert pack_set(convs, 3, seed=1, draw="random") == rnd  # seeded
    with pytest.raises(ValueError, match="draw must be one of"):
        pack_set(convs, 3, draw="sometimes")


def test_bad_blend_draw_is_refused_before_compute(tmp_path):
    with pytest.raises(T.TrainError, match="--blend_cgd_questions: expected 'random', all or a count"):
        T.preflight(cli.parse_args(["--blend_cgd_questions", "some", "--output_dir", str(tmp_path)]))


def test_data_debug_dump_shows_prompt_numbering_and_label_mask(tmp_path):
    make_paper_root(tmp_path)
    args = paper_args(tmp_path, "--dataset_names", "llava", "otter_mimicit_sd")
    train_s, _, _ = build(args)
    tpl = Template(CharTokenizer(), image_tokens=2)
    out = tmp_path / "debug"
    n = dump_debug_samples(train_s, tpl, str(out), per_set=2)
    assert n == 4 and sorted(os.listdir(out)) == ["llava_0.txt", "llava_1.txt", "otter_mimicit_sd_0.txt",
                                                   "otter_mimicit_sd_1.txt"]
    text = (out / "otter_mimicit_sd_0.txt").read_text()
    first = next(s for s in train_s if s.source == "otter_mimicit_sd")
    k = len(first.images)
    assert f"images: {k}" in text and f"<Image {k}: 2 tokens>" in text and f"<Image {k + 1}:" not in text
    assert "Image 1: SD_IMG_" in text and "base64 chars" in text
    # the answer carries loss, the question does not
    answer = next(a for a in ("Story 0.", "Story 1.", "Story 2.", "Story 3.", "Story 4.", "Story 5.", "Yes.")
                  if a in text)
    assert f"[[{answer}" in text
    body = text.split("---\n", 1)[1]
    assert "[[" not in body.split("Story")[0]  # system prompt and question: no loss


def test_every_recipe_carries_its_global_batch(tmp_path, monkeypatch):
    """Accumulation follows from the world size: no recipe pins --grad_accum_steps; one given on the
    command line that disagrees with the preset's global batch is refused, not silently ignored."""
    for name in cli.recipe_names():
        r = cli.load_recipe(name)
        assert "grad_accum_steps" not in r and r.get("global_batch_size", 0) > 0, name
    a = cli.parse_args(["--preset", "shapes-mmca", "--engine", "deepspeed", "--output_dir", str(tmp_path)])
    assert T.preflight(a).accum == 4
    monkeypatch.setattr(T.D, "world_size", lambda: 2)
    assert T.preflight(a).accum == 2 and T.preflight(a).global_batch == 4
    b = cli.parse_args(["--preset", "shapes-mmca", "--engine", "deepspeed", "--grad_accum_steps", "8", "--output_dir",
                        str(tmp_path)])
    with pytest.raises(T.TrainError, match="--grad_accum_steps 8 disagrees with --global_batch_size 4"):
        T.preflight(b)
