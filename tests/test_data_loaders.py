"""Data set loaders on handmade fixtures in the published layouts, image checks, packing, trimming."""
import base64
import io
import json
import logging
import os
import sys

import pytest
from PIL import Image

import visualchat_train.data as data
from visualchat_train.data import DATASETS, load_dataset
from visualchat_train.data.b64index import Base64Slice, base64_index, scan
from visualchat_train.data.packing import PAPER_COUNTS, concat, fit_to_length, limit_images, pack, pack_set
from visualchat_train.data.validate import validate_images
from visualchat.images import open_image
from visualchat.template import Conversation, Round, Template

COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255), (128, 0, 0),
          (0, 128, 0), (0, 0, 128), (128, 128, 0), (0, 128, 128), (128, 0, 128)]


# -- fixture helpers -------------------------------------------------------------------------------
def img_bytes(color, fmt="PNG"):
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), color).save(buf, format=fmt)
    return buf.getvalue()


def write_img(path, color=(255, 0, 0), fmt="JPEG"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(img_bytes(color, fmt))
    return str(path)


def write_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


def color_of(ref):
    from visualchat_train.features import open_ref

    return open_ref(ref).getpixel((1, 1))


def near(c1, c2, tol=40):
    return all(abs(a - b) <= tol for a, b in zip(c1, c2))


def coco(root, name):
    return os.path.join(str(root), "coco", "train2017", name)


def llava_sample(image, *qa):
    conv = []
    for i, (q, a) in enumerate(qa):
        conv += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return {"id": image.split(".")[0], "image": image, "conversations": conv}


@pytest.fixture
def llava_root(tmp_path):
    """data_path with llava/ (all three files) and coco/train2017/."""
    for i, n in enumerate(["000000000001.jpg", "000000000002.jpg", "000000000003.jpg"]):
        write_img(coco(tmp_path, n), COLORS[i])
    write_json(tmp_path / "llava" / "detail_23k.json", [
        llava_sample("000000000001.jpg", ("<image>\nDescribe the image in detail.", "A red square."),
                     ("Second question?", "Not used by llava.")),
    ])
    write_json(tmp_path / "llava" / "complex_reasoning_77k.json", [
        llava_sample("000000000002.jpg", ("Why is it green?\n<image>", " Because it is. ")),
    ])
    write_json(tmp_path / "llava" / "conversation_58k.json", [
        llava_sample("000000000002.jpg", ("<image>\nWhat color?", "Green."), ("Is it large?", "No."),
                     ("What shape?", "A square.")),
        llava_sample("000000000003.jpg", ("What is this?\n<image>", "Blue.")),
        {"id": "bad", "image": "000000000003.jpg",
         "conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]},
    ])
    return tmp_path


def cgd_ins(instruction, answer, image_ids, rel):
    return {"instruction": instruction, "answer": answer, "image_ids": image_ids, "rel_ins_ids": rel}


# -- registry ----------------------------------------------------------------------------------------
def test_registry_names():
    for name in ["llava", "llava_dial", "otter_mimicit_cgd", "otter_mimicit_sd", "otter_mimicit_sn",
                 "otter_mimicit_tvc", "otter_mimicit_vst", "sparkles_dialogue", "llava_otter_blend", "jsonl",
                 "shapes"]:
        assert name in DATASETS and callable(DATASETS[name])


def test_unknown_name_lists_valid_names(tmp_path):
    with pytest.raises(ValueError) as e:
        load_dataset("llava_150k", str(tmp_path))
    msg = str(e.value)
    assert "llava_150k" in msg and "llava_dial" in msg and "sparkles_dialogue" in msg and "jsonl" in msg


@pytest.mark.parametrize("name,expected", [
    ("llava", "detail_23k.json"),
    ("llava_dial", "conversation_58k.json"),
    ("otter_mimicit_cgd", "CGD_instructions.json"),
    ("otter_mimicit_sd", "SD_instructions.json"),
    ("otter_mimicit_sn", "SN_instructions.json"),
    ("otter_mimicit_tvc", "TVC_instructions.json"),
    ("otter_mimicit_vst", "VST_instructions.json"),
    ("sparkles_dialogue", os.path.join("SparklesDialogueCC", "annotations", "SparklesDialogueCC.json")),
    ("llava_otter_blend", "CGD_instructions.json"),
    ("jsonl", "nothing.jsonl"),
])
def test_missing_files_name_the_expected_path(tmp_path, name, expected):
    path = str(tmp_path / "nothing.jsonl") if name == "jsonl" else str(tmp_path)
    with pytest.raises(FileNotFoundError) as e:
        load_dataset(name, path)
    assert expected in str(e.value)
    assert str(tmp_path) in str(e.value)


def test_missing_image_folder_is_named(tmp_path):
    write_json(tmp_path / "llava" / "detail_23k.json", [llava_sample("000000000001.jpg", ("<image>\nQ", "A"))])
    write_json(tmp_path / "llava" / "complex_reasoning_77k.json", [])
    with pytest.raises(FileNotFoundError) as e:
        load_dataset("llava", str(tmp_path))
    assert os.path.join("coco", "train2017") in str(e.value)


def test_missing_base64_images_file_is_named(tmp_path):
    write_json(tmp_path / "MIMIC-IT" / "SD_instructions.json", {"meta": {}, "data": {}})
    with pytest.raises(FileNotFoundError) as e:
        load_dataset("otter_mimicit_sd", str(tmp_path))
    assert os.path.join("MIMIC-IT", "SD.json") in str(e.value)


def test_shapes_is_registered_lazily(monkeypatch):
    monkeypatch.delattr(data, "shapes", raising=False)
    monkeypatch.setitem(sys.modules, "visualchat_train.data.shapes", None)
    with pytest.raises(ImportError) as e:
        load_dataset("shapes", None, n=1)
    assert "shapes.py" in str(e.value)


# -- llava / llava_dial --------------------------------------------------------------------------------
def test_llava_first_pair_only_marker_stripped(llava_root):
    stats = {}
    convs = load_dataset("llava", str(llava_root), stats=stats)
    assert len(convs) == 2 and stats["loaded"] == 2
    a, b = convs
    assert len(a.rounds) == 1  # the second pair of the sample is dropped, as the reference did
    assert a.rounds[0].question == "Describe the image in detail."
    assert a.rounds[0].answer == "A red square."
    assert a.rounds[0].images == [coco(llava_root, "000000000001.jpg")]
    assert b.rounds[0].question == "Why is it green?" and b.rounds[0].answer == "Because it is."
    for c in convs:
        assert "<image>" not in c.rounds[0].question


def test_llava_flat_hugging_face_layout(tmp_path):
    write_img(coco(tmp_path, "000000000001.jpg"))
    write_json(tmp_path / "detail_23k.json", [llava_sample("000000000001.jpg", ("<image>\nQ?", "A."))])
    write_json(tmp_path / "complex_reasoning_77k.json", [])
    assert [c.rounds[0].question for c in load_dataset("llava", str(tmp_path))] == ["Q?"]


def test_llava_dial_keeps_every_round(llava_root):
    stats = {}
    convs = load_dataset("llava_dial", str(llava_root), stats=stats)
    assert len(convs) == 2 and stats["skipped_malformed"] == 1
    c = convs[0]
    assert [r.question for r in c.rounds] == ["What color?", "Is it large?", "What shape?"]
    assert [r.answer for r in c.rounds] == ["Green.", "No.", "A square."]
    assert c.rounds[0].images == [coco(llava_root, "000000000002.jpg")]
    assert c.rounds[1].images == [] and c.rounds[2].images == []
    assert convs[1].rounds[0].question == "What is this?"


# -- MIMIC-IT CGD --------------------------------------------------------------------------------------
@pytest.fixture
def cgd_root(llava_root):
    write_img(coco(llava_root, "000000000004.jpg"), COLORS[3])
    write_json(llava_root / "MIMIC-IT" / "CGD_instructions.json", {
        "meta": {"version": "0.0.1", "time": "2023-06", "author": "x"},
        "data": {
            # image order deliberately not sorted: Image 1 must be ..02, Image 2 ..01
            "CGD_INS_000000": cgd_ins("<image>What differs between the two images?", "The color.",
                                      ["CGD_IMG_000000000002", "CGD_IMG_000000000001"],
                                      ["CGD_INS_000001", "CGD_INS_000002", "CGD_INS_999999"]),
            "CGD_INS_000001": cgd_ins("Which one is red?", "The second.",
                                      ["CGD_IMG_000000000002", "CGD_IMG_000000000001"], ["CGD_INS_000000"]),
            "CGD_INS_000002": cgd_ins("About other images?", "Yes.",
                                      ["CGD_IMG_000000000003", "CGD_IMG_000000000002"], ["CGD_INS_000000"]),
            "CGD_INS_000003": cgd_ins("Compare them.", "Same size.",
                                      ["CGD_IMG_000000000001", "CGD_IMG_000000000004"], []),
            "CGD_INS_000004": cgd_ins("And these?", "Also same.",
                                      ["CGD_IMG_000000000004", "CGD_IMG_000000000003"], []),
        },
    })
    return llava_root


def test_cgd_groups_and_image_order(cgd_root):
    convs = load_dataset("otter_mimicit_cgd", str(cgd_root))
    assert len(convs) == 4
    g = convs[0]
    assert [r.question for r in g.rounds] == ["What differs between the two images?", "Which one is red?"]
    assert [r.answer for r in g.rounds] == ["The color.", "The second."]
    # Image i is the i-th published image id (the reference inserted them reversed)
    assert g.rounds[0].images == [coco(cgd_root, "000000000002.jpg"), coco(cgd_root, "000000000001.jpg")]
    assert g.rounds[1].images == []
    assert near(color_of(g.images[0]), COLORS[1]) and near(color_of(g.images[1]), COLORS[0])
    # a related instruction about other images keeps its own images, in its own conversation
    assert convs[1].rounds[0].question == "About other images?"
    assert convs[1].images == [coco(cgd_root, "000000000003.jpg"), coco(cgd_root, "000000000002.jpg")]


# -- MIMIC-IT base64 sets ----------------------------------------------------------------------------
def make_base64_set(root, set_name, layout="flat"):
    """SET_instructions.json + SET.json; images keyed SET_IMG_i with colour COLORS[i]."""
    folder = root / "MIMIC-IT" if layout == "flat" else root / set_name
    images = {f"{set_name}_IMG_{i:02d}": base64.b64encode(img_bytes(COLORS[i])).decode() for i in range(12)}
    ids = lambda *idx: [f"{set_name}_IMG_{i:02d}" for i in idx]  # noqa: E731
    ins = {
        f"{set_name}_INS_0": cgd_ins("<image>Tell a story about these.", "Once upon a time.", ids(2, 0, 1),
                                     [f"{set_name}_INS_1"]),
        f"{set_name}_INS_1": cgd_ins("What happens next?", "The end.", ids(2, 0, 1), [f"{set_name}_INS_0"]),
        f"{set_name}_INS_2": cgd_ins("Describe the clip.", "Many frames.", ids(*range(12)), []),
        f"{set_name}_INS_3": cgd_ins("Missing one?", "Yes.", ids(3) + [f"{set_name}_IMG_404"], []),
    }
    write_json(folder / f"{set_name}_instructions.json", {"meta": {"version": "0.0.1"}, "data": ins})
    write_json(folder / f"{set_name}.json", images)
    return images


@pytest.mark.parametrize("set_name,layout", [("SD", "flat"), ("SN", "flat"), ("TVC", "per_set"), ("VST", "flat")])
def test_base64_sets(tmp_path, set_name, layout):
    images = make_base64_set(tmp_path, set_name, layout)
    stats = {}
    convs = load_dataset(f"otter_mimicit_{set_name.lower()}", str(tmp_path), stats=stats)
    assert len(convs) == 2 and stats["skipped_missing_image"] == 1
    story, clip = convs
    assert [r.question for r in story.rounds] == ["Tell a story about these.", "What happens next?"]
    assert [r.answer for r in story.rounds] == ["Once upon a time.", "The end."]
    assert story.rounds[1].images == []
    # references (slices of the images file, read when opened), not opened images, in published order
    assert all(isinstance(r, Base64Slice) for r in story.images)
    assert [r.image_ref() for r in story.rounds[0].images] == ["base64:" + images[f"{set_name}_IMG_{i:02d}"]
                                                                for i in (2, 0, 1)]
    assert [near(color_of(r), COLORS[i]) for r, i in zip(story.images, (2, 0, 1))] == [True] * 3
    # 12 images -> 8 spread evenly, in order, first and last kept
    assert len(clip.images) == 8
    picked = [next(i for i in range(12) if "base64:" + images[f"{set_name}_IMG_{i:02d}"] == r.image_ref())
              for r in clip.images]
    assert picked == sorted(picked) and picked[0] == 0 and picked[-1] == 11 and len(set(picked)) == 8


def test_base64_overflow_and_missing_options(tmp_path):
    images = make_base64_set(tmp_path, "TVC")
    convs = load_dataset("otter_mimicit_tvc", str(tmp_path), overflow="truncate", on_missing_image="drop",
                         lazy_images=False)  # base64:<data> strings
    assert len(convs) == 3
    assert convs[1].images == ["base64:" + images[f"TVC_IMG_{i:02d}"] for i in range(8)]
    assert convs[2].images == ["base64:" + images["TVC_IMG_03"]]
    assert len(load_dataset("otter_mimicit_tvc", str(tmp_path), overflow="skip")) == 1


# -- Sparkles --------------------------------------------------------------------------------------------
def sparkles_root(tmp_path):
    for sub, ids in (("CC", [804, 14, 1417]), ("VG", ["2371"])):
        for i, iid in enumerate(ids):
            write_img(tmp_path / f"SparklesDialogue{sub}" / "images" / f"{iid}.jpg", COLORS[i])
    write_json(tmp_path / "SparklesDialogueCC" / "annotations" / "SparklesDialogueCC.json", [
        {"dialogue": [
            {"role": "user", "content": "Compare the bus in IMAGE#804<Img><ImageHere></Img> with the cat in "
                                        "IMAGE#14<Img><ImageHere></Img>.",
             "images": [{"image_id": 804, "caption": "a bus"}, {"image_id": 14, "caption": "a cat"}]},
            {"role": "assistant", "content": "IMAGE#804 shows a bus, while image#14 shows a cat."},
            {"role": "user", "content": "Does IMAGE#1417<Img><ImageHere></Img> fit with #14?",
             "images": [{"image_id": 1417, "caption": "a machine"}]},
            {"role": "assistant", "content": "IMAGE#1417 is a machine; IMAGE#14 and IMAGE#804 are not."},
        ]},
        {"dialogue": [{"role": "user", "content": "odd", "images": [{"image_id": 804}]}]},
    ])
    write_json(tmp_path / "SparklesDialogueVG" / "annotations" / "SparklesDialogueVG.json", [
        [  # a bare message list is accepted too
            {"role": "user", "content": "What is in <Img><ImageHere></Img> IMAGE#2371?",
             "images": [{"image_id": "2371", "caption": "x"}]},
            {"role": "assistant", "content": "A tree."},
        ],
    ])
    return tmp_path


def test_sparkles_numbering_and_text(tmp_path):
    root = sparkles_root(tmp_path)
    stats = {}
    convs = load_dataset("sparkles_dialogue", str(root), stats=stats)
    assert len(convs) == 2 and stats["skipped_malformed"] == 1
    c = convs[0]
    cc = root / "SparklesDialogueCC" / "images"
    assert c.rounds[0].images == [str(cc / "804.jpg"), str(cc / "14.jpg")]
    assert c.rounds[1].images == [str(cc / "1417.jpg")]
    assert c.rounds[0].question == "Compare the bus in Image 1 with the cat in Image 2."
    assert c.rounds[0].answer == "Image 1 shows a bus, while Image 2 shows a cat."
    assert c.rounds[1].question == "Does Image 3 fit with Image 2?"
    assert c.rounds[1].answer == "Image 3 is a machine; Image 2 and Image 1 are not."
    for r in c.rounds:
        assert "<Img>" not in r.question and "IMAGE#" not in r.question and "IMAGE#" not in r.answer
    vg = convs[1]
    assert vg.rounds[0].question == "What is in Image 1?"
    assert vg.rounds[0].images == [str(root / "SparklesDialogueVG" / "images" / "2371.jpg")]


# -- llava_otter_blend -------------------------------------------------------------------------------------
def test_llava_otter_blend(cgd_root):
    convs = load_dataset("llava_otter_blend", str(cgd_root), seed=None)
    # group 0: images [02, 01]; 02 has llava (complex + conversation), 01 has detail -> both via llava
    # group "About other images?": [03, 02]; 03 has llava -> 03, 02 via llava
    # group "Compare them.": [01, 04]; 04 has no llava -> shown with the CGD question
    # group "And these?": [04, 03]: first image without llava -> skipped (plain CGD)
    assert len(convs) == 3
    g = convs[0]
    im = lambda n: coco(cgd_root, f"0000000000{n:02d}.jpg")  # noqa: E731
    assert g.images == [im(2), im(1)]  # Image i is the i-th CGD image
    qs = [r.question for r in g.rounds]
    # every pair of a chosen LLaVA conversation comes along, the image with its first
    assert qs == ["Why is it green?", "Describe the image in detail.", "Second question?",
                  "What differs between the two images?", "Which one is red?"]
    assert [r.images for r in g.rounds] == [[im(2)], [im(1)], [], [], []]
    mixed = convs[2]
    assert mixed.images == [im(1), im(4)]
    assert mixed.rounds[0].images == [im(1)] and mixed.rounds[0].question == "Describe the image in detail."
    assert mixed.rounds[-1].question == "Compare them." and mixed.rounds[-1].images == [im(4)]
    # seeded choice is reproducible
    a = load_dataset("llava_otter_blend", str(cgd_root), seed=3, llava_per_image=2)
    b = load_dataset("llava_otter_blend", str(cgd_root), seed=3, llava_per_image=2)
    assert a == b and a[0].images == [im(2), im(1)]


# -- jsonl -----------------------------------------------------------------------------------------------
def test_jsonl_file_and_folder(tmp_path):
    write_img(tmp_path / "imgs" / "a.png", COLORS[0], "PNG")
    abs_b = write_img(tmp_path / "elsewhere" / "b.png", COLORS[1], "PNG")
    lines = [
        {"system": "Be brief.", "rounds": [{"images": ["imgs/a.png", abs_b], "question": "Q1", "answer": "A1"},
                                            {"question": "Q2", "answer": "A2"}]},
        {"rounds": [{"images": ["base64:AAAA"], "question": "Q", "answer": "A"}]},
    ]
    f = tmp_path / "train.jsonl"
    f.write_text(json.dumps(lines[0]) + "\n\n" + json.dumps(lines[1]) + "\n")
    for src in (f, tmp_path):
        convs = load_dataset("jsonl", str(src))
        assert len(convs) == 2
        assert convs[0].system == "Be brief."
        assert convs[0].rounds[0].images == [str(tmp_path / "imgs" / "a.png"), abs_b]
        assert convs[0].rounds[1].images == [] and convs[0].rounds[1].answer == "A2"
        assert convs[1].system == Conversation().system and convs[1].rounds[0].images == ["base64:AAAA"]


@pytest.mark.parametrize("bad", ['{"rounds": [}', '{"rounds": []}', '{"rounds": [{"question": "Q"}]}',
                                 '[1, 2]', '{"rounds": [{"question": "Q", "answer": "A", "images": [3]}]}'])
def test_jsonl_malformed_line_names_file_and_line(tmp_path, bad):
    f = tmp_path / "d.jsonl"
    ok = json.dumps({"rounds": [{"question": "Q", "answer": "A"}]})
    f.write_text(ok + "\n" + ok + "\n" + bad + "\n")
    with pytest.raises(ValueError) as e:
        load_dataset("jsonl", str(f))
    assert f"{f}:3" in str(e.value)


def test_jsonl_folder_without_file(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_dataset("jsonl", str(tmp_path))
    assert str(tmp_path) in str(e.value)


# -- validation ------------------------------------------------------------------------------------------
def test_validate_skips_missing_and_corrupt_once(tmp_path, caplog):
    good = write_img(tmp_path / "good.jpg", COLORS[0])
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(img_bytes(COLORS[1])[:30])
    missing = str(tmp_path / "missing.jpg")
    good_b64 = "base64:" + base64.b64encode(img_bytes(COLORS[2])).decode()
    bad_b64 = "base64:" + base64.b64encode(b"garbage bytes").decode()
    C = lambda *refs: Conversation(rounds=[Round("q", images=list(refs), answer="a")])  # noqa: E731
    convs = [C(good), C(good, missing), C(str(corrupt)), C(good_b64), C(missing), C(str(truncated)),
             C(bad_b64), C(), C(good, good_b64)]
    calls = []

    def counting_open(ref):
        calls.append(ref)
        return open_image(ref)

    with caplog.at_level(logging.WARNING, logger="visualchat_train.data.validate"):
        kept, skipped = validate_images(convs, open_fn=counting_open)
    assert skipped == 5
    assert kept == [convs[0], convs[3], convs[7], convs[8]]
    assert sorted(map(str, calls)) == sorted(map(str, [good, missing, str(corrupt), good_b64, str(truncated), bad_b64]))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 4  # each bad image logged once, though `missing` is used twice
    assert sum("missing.jpg" in w for w in warnings) == 1
    assert not any(bad_b64[20:] in w for w in warnings)  # no base64 dumps in the log
    # nothing is replaced by a blank image: kept conversations are untouched
    assert kept[0].rounds[0].images == [good]
    # a shared cache opens nothing again
    cache = {}
    validate_images(convs, cache=cache)
    calls.clear()
    kept2, skipped2 = validate_images(convs, cache=cache, open_fn=counting_open, workers=4)
    assert calls == [] and skipped2 == 5 and kept2 == kept


def test_loader_then_validate_skips_conversations_with_bad_images(llava_root):
    os.remove(coco(llava_root, "000000000003.jpg"))
    convs = load_dataset("llava_dial", str(llava_root))
    kept, skipped = validate_images(convs, workers=2)
    assert skipped == 1 and len(kept) == 1 and kept[0].images == [coco(llava_root, "000000000002.jpg")]


# -- packing and trimming ------------------------------------------------------------------------------
class CharTokenizer:
    """One token per character; enough for the template."""
    eos_token_id, bos_token_id, pad_token_id, eos_token = 0, None, None, "</s>"

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def conv_with(tag, n_rounds=1, images_per_round=1):
    return Conversation(rounds=[Round(f"{tag} q{r}", images=[f"{tag}-img{r}-{j}" for j in range(images_per_round)],
                                      answer=f"{tag} a{r}") for r in range(n_rounds)])


def test_pack_paper_counts_and_numbering():
    sets = {"llava": [conv_with(f"L{i}") for i in range(7)], "llava_dial": [conv_with(f"D{i}", 2) for i in range(3)],
            "otter_mimicit_sd": [conv_with(f"S{i}", 1, 2) for i in range(2)]}
    packed = pack(sets)  # PAPER_COUNTS: llava 3, llava_dial 2, others 1
    assert PAPER_COUNTS == {"llava": 3, "llava_dial": 2}
    assert [len(c.rounds) for c in packed["llava"]] == [3, 3, 1]
    assert [len(c.rounds) for c in packed["llava_dial"]] == [4, 2]
    assert packed["otter_mimicit_sd"] == sets["otter_mimicit_sd"]
    first = packed["llava"][0]
    assert first.images == ["L0-img0-0", "L1-img0-0", "L2-img0-0"]
    text = Template(CharTokenizer(), image_tokens=2).render_text(first)
    # the second sample's image is Image 2, shown right before its question
    assert text.index("### Image 2:") < text.index("L1 q0") < text.index("### Image 3:") < text.index("L2 q0")


def test_pack_respects_max_images_and_system():
    convs = [conv_with(f"C{i}", 1, 3) for i in range(5)]
    packed = pack_set(convs, 3, max_images=8)
    assert [len(c.images) for c in packed] == [6, 6, 3]  # 3 + 3 + 3 would exceed 8
    other = Conversation(rounds=[Round("q", images=["x"], answer="a")], system="Other system.")
    packed = pack_set([conv_with("A"), other, conv_with("B")], 3)
    assert [c.system for c in packed] == [Conversation().system, "Other system.", Conversation().system]
    big = conv_with("BIG", 1, 9)
    assert pack_set([big, conv_with("A")], 2) == [conv_with("A")]
    assert concat([conv_with("A"), conv_with("B")]).images == ["A-img0-0", "B-img0-0"]


def test_limit_images_drops_trailing_rounds():
    c = Conversation(rounds=[Round("q1", images=["a", "b"], answer="1"),
                             Round("q2", images=["c", "d", "e"], answer="2"),
                             Round("q3", images=[], answer="3"),
                             Round("q4", images=list("fghi"), answer="4")])
    out = limit_images(c, 8)
    assert [r.question for r in out.rounds] == ["q1", "q2", "q3"] and out.images == list("abcde")
    assert limit_images(c, 9) is c
    assert limit_images(conv_with("X", 1, 9), 8) is None


def test_fit_to_length():
    tpl = Template(CharTokenizer(), image_tokens=5)
    count = lambda conv: len(tpl.render(conv))  # noqa: E731
    c = conv_with("R", 4, 1)
    assert fit_to_length(c, count, 10_000) is c
    two = Conversation(rounds=c.rounds[:2], system=c.system)
    out = fit_to_length(c, count, count(two))
    assert out.rounds == c.rounds[:2]
    assert all(r.answer is not None for r in out.rounds)  # answers stay with their questions
    assert out.images == ["R-img0-0", "R-img1-0"]
    out = fit_to_length(c, count, count(two) + 1)  # a partial third round never fits
    assert len(out.rounds) == 2
    one = Conversation(rounds=c.rounds[:1], system=c.system)
    assert fit_to_length(c, count, count(one)).rounds == c.rounds[:1]
    assert fit_to_length(c, count, count(one) - 1) is None


# -- the original's other sets: minigpt4, aokvqa, coco_caption, ocr_vqa, vqa -------------------------------
def test_minigpt4_cc_sbu_align(tmp_path):
    from visualchat_train.data.vqa import DESCRIBE

    write_img(tmp_path / "cc_sbu_align" / "image" / "2.jpg", COLORS[0])
    write_img(tmp_path / "cc_sbu_align" / "image" / "10.jpg", COLORS[1])
    write_json(tmp_path / "cc_sbu_align" / "filter_cap.json", {"annotations": [
        {"image_id": "2", "caption": " A red square on a plain background. "},
        {"image_id": "10", "caption": "A green one."}, {"image_id": "11"}]})
    stats = {}
    convs = load_dataset("minigpt4", str(tmp_path), stats=stats)
    assert len(convs) == 2 and stats["skipped_malformed"] == 1
    c = convs[0]
    assert len(c.rounds) == 1 and c.rounds[0].question in DESCRIBE
    assert c.rounds[0].answer == "A red square on a plain background."
    assert c.images == [str(tmp_path / "cc_sbu_align" / "image" / "2.jpg")] and near(color_of(c.images[0]), COLORS[0])
    assert load_dataset("minigpt4", str(tmp_path)) == convs  # the question is drawn once, with a seed


def test_aokvqa(tmp_path):
    from visualchat_train.data.vqa import WHY

    write_img(coco(tmp_path, "000000299207.jpg"), COLORS[2])
    write_json(tmp_path / "aokvqa" / "annotations" / "aokvqa_v1p0_train.json", [
        {"split": "train", "image_id": 299207, "question_id": "22MexNkBPpdZGX6sxbxVBH",
         "question": "What is the man by the bags awaiting?", "choices": ["skateboarder", "train", "delivery", "cab"],
         "correct_choice_idx": 3, "direct_answers": ["ride"] * 10,
         "rationales": ["A train would not be on the street.", "He has luggage."]},
        {"image_id": 1, "question": "broken", "choices": ["a"], "correct_choice_idx": 5},
    ])
    stats = {}
    (c,) = load_dataset("aokvqa", str(tmp_path), stats=stats)
    assert stats["skipped_malformed"] == 1
    q = c.rounds[0].question
    assert q.startswith("What is the man by the bags awaiting? ") and q.split("? ", 1)[1] in WHY
    assert c.rounds[0].answer == "The answer is cab. Because A train would not be on the street. He has luggage."
    assert c.images == [coco(tmp_path, "000000299207.jpg")]


def test_coco_caption_karpathy_split(tmp_path):
    root = tmp_path / "coco" / "2014"
    write_img(root / "COCO_train2014_000000000009.jpg", COLORS[0])
    write_img(root / "val2014" / "COCO_val2014_000000000042.jpg", COLORS[1])  # nested by filepath: found too
    write_json(tmp_path / "coco_caption" / "dataset.json", {"dataset": "coco", "images": [
        {"filepath": "train2014", "filename": "COCO_train2014_000000000009.jpg", "split": "train",
         "sentences": [{"raw": "A plate of food.", "tokens": ["a"]}, {"raw": "Food on a plate."}]},
        {"filepath": "val2014", "filename": "COCO_val2014_000000000042.jpg", "split": "restval",
         "sentences": [{"raw": "A cat."}]},
        {"filepath": "val2014", "filename": "COCO_val2014_000000000043.jpg", "split": "test",
         "sentences": [{"raw": "Held out."}]},
    ]})
    stats = {}
    convs = load_dataset("coco_caption", str(tmp_path), stats=stats)
    assert len(convs) == 2 and stats["skipped_other_split"] == 1
    assert convs[0].rounds[0].answer in ("A plate of food.", "Food on a plate.")
    assert convs[0].images == [str(root / "COCO_train2014_000000000009.jpg")]
    assert convs[1].images == [str(root / "val2014" / "COCO_val2014_000000000042.jpg")]
    assert len(load_dataset("coco_caption", str(tmp_path), splits=None)) == 3


def test_ocr_vqa_one_or_all_questions_and_placeholders(tmp_path):
    imgs = tmp_path / "OCR_VQA" / "images"
    write_img(imgs / "1234.jpg", COLORS[0])
    os.makedirs(imgs, exist_ok=True)
    Image.new("RGB", (1, 1)).save(imgs / "999.gif")  # a placeholder cover
    write_json(tmp_path / "OCR_VQA" / "dataset.json", {
        "1234": {"imageURL": "http://images.amazon.com/images/P/1234.01.jpg", "title": "T", "authorName": "A",
                 "genre": "G", "split": 1, "questions": ["Who wrote this book?", "What is the title of this book?"],
                 "answers": ["A", "T"]},
        "999": {"imageURL": "http://x/999.gif", "questions": ["Is this a novel?"], "answers": ["No"]},
        "5": {"imageURL": "http://x/5.jpg", "questions": ["q"], "answers": []},
    })
    stats = {}
    (one,) = load_dataset("ocr_vqa", str(tmp_path), stats=stats)
    assert stats["skipped_placeholder_image"] == 1 and stats["skipped_malformed"] == 1
    assert (one.rounds[0].question, one.rounds[0].answer) in (("Who wrote this book?", "A"),
                                                              ("What is the title of this book?", "T"))
    assert one.images == [str(imgs / "1234.jpg")]
    (both,) = load_dataset("ocr_vqa", str(tmp_path), questions="all")
    assert [r.answer for r in both.rounds] == ["A", "T"] and [r.images for r in both.rounds] == [[str(imgs / "1234.jpg")], []]


def test_generic_vqa_majority_answer(tmp_path):
    write_img(tmp_path / "vqa" / "imgs" / "a.jpg", COLORS[0])
    write_json(tmp_path / "vqa" / "train.json", [
        {"image": "imgs/a.jpg", "question": "<image>\nWhat colour?", "answer": ["red", "blue", "red", "maroon"]},
        {"image": "imgs/a.jpg", "question": "Shape?", "answer": "square"},
        {"image": "imgs/a.jpg", "question": "No answer"},
    ])
    stats = {}
    convs = load_dataset("vqa", str(tmp_path), stats=stats)
    assert [(c.rounds[0].question, c.rounds[0].answer) for c in convs] == [("What colour?", "red"), ("Shape?", "square")]
    assert convs[0].images == [str(tmp_path / "vqa" / "imgs" / "a.jpg")] and stats["skipped_malformed"] == 1
    with pytest.raises(FileNotFoundError, match="vqa.*\\*\\.json"):
        load_dataset("vqa", str(tmp_path / "nothing"))


@pytest.mark.parametrize("name,expected", [("minigpt4", "filter_cap.json"), ("aokvqa", "aokvqa_v1p0_train.json"),
                                           ("coco_caption", "dataset.json"), ("ocr_vqa", "dataset.json")])
def test_other_sets_name_their_missing_files(tmp_path, name, expected):
    with pytest.raises(FileNotFoundError) as e:
        load_dataset(name, str(tmp_path))
    assert expected in str(e.value) and str(tmp_path) in str(e.value)


# -- base64 images files read in place -----------------------------------------------------------------------
def test_base64_index_finds_every_string_without_loading_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("VISUALCHAT_CACHE", str(tmp_path / "cache"))
    a, b = base64.b64encode(img_bytes(COLORS[0])).decode(), base64.b64encode(img_bytes(COLORS[1])).decode()
    f = tmp_path / "SN.json"
    # spacing, an escaped slash, a null, an id with an escaped quote, a data URI
    text = ('{ "SN_IMG_1" : "%s",\n"SN_IMG_2":"%s", "gone": null, "odd\\"id": "%s",'
            ' "uri": "data:image/png;base64,%s"}' % (a, b.replace("/", "\\/"), a, b))
    f.write_text(text)
    assert json.loads(text)["SN_IMG_2"] == b  # the fixture is valid JSON
    idx = scan(str(f))
    assert set(idx) == {"SN_IMG_1", "SN_IMG_2", "gone", 'odd"id', "uri"} and idx["gone"] is None
    sl = {k: Base64Slice(str(f), *v, k) for k, v in idx.items() if v}
    assert sl["SN_IMG_1"].data() == a and sl["SN_IMG_2"].data() == b and sl["uri"].data() == b
    assert near(color_of(sl["SN_IMG_2"]), COLORS[1])
    # cached: a second call reads the index file, not the images file
    assert base64_index(str(f)) == idx
    monkeypatch.setattr("visualchat_train.data.b64index.scan", lambda path: pytest.fail("scanned again"))
    assert base64_index(str(f)) == idx
    for bad in ('["x"]', '{"a": {"b": 1}}', '{"a": "unterminated'):
        f.write_text(bad)
        with pytest.raises(ValueError, match="SN.json"):
            scan(str(f))
