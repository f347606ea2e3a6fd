"""The single-image sets of the original code beyond the paper's blend: ``minigpt4`` (cc_sbu_align),
``aokvqa``, ``coco_caption``, ``ocr_vqa`` and the generic ``vqa`` format. Each sample becomes a
one-round conversation with its image in that round; pack them with ``--dataset_concatenate_samples``
like LLaVA.

Published layouts under ``data_path`` (the original's paths)::

    cc_sbu_align/filter_cap.json          {"annotations": [{"image_id": "2", "caption": "..."}, ...]}
    cc_sbu_align/image/<image_id>.jpg                                         (MiniGPT-4's second stage)
    aokvqa/annotations/aokvqa_v1p0_train.json   [{"image_id": 299207, "question": "...", "choices": [...],
                                                  "correct_choice_idx": 1, "rationales": ["...", ...]}, ...]
    coco/train2017/<image_id:012d>.jpg                                        (A-OKVQA's images)
    coco_caption/dataset.json             Karpathy's split: {"images": [{"filepath": "train2014",
                                          "filename": "COCO_train2014_....jpg", "sentences": [{"raw": "..."}]}]}
    coco/2014/<filename>                  (or coco/2014/<filepath>/<filename>)
    OCR_VQA/dataset.json                  {"<id>": {"imageURL": "http://.../x.jpg", "questions": [...],
                                          "answers": [...]}, ...}
    OCR_VQA/images/<id><extension of imageURL>
    vqa/*.json                            generic: [{"image": "rel/path.jpg", "question": "...",
                                          "answer": "..." or ["...", ...]}, ...]; images relative to the file

Where the original drew something at random on every read (which caption question, which caption,
which OCR question, the reason follow-up), we draw it once per sample with ``seed`` so a data set
is reproducible. The instruction wordings are ours. A generic VQA answer given as a list takes its
most frequent entry (the first of equals), as the original. OCR-VQA's placeholder images (1 x 1
pixels; the original removed them once) are skipped and counted, from the image header alone.
"""
from __future__ import annotations

import glob
import os
import random
from collections import Counter
from typing import Any

from visualchat.template import Conversation, Round

from ._common import DEFAULT_MAX_IMAGES, LoadStats, find_first, limit_images, read_json, require_dir, strip_marker

#: Ways of asking for a description (minigpt4, coco_caption).
DESCRIBE = (
    "Describe the image.",
    "What does this image show?",
    "Give a short description of the picture.",
    "Write a caption for this image.",
    "What can you see in the image?",
    "Summarise the content of the picture.",
    "Tell me about this image.",
    "What is happening in this picture?",
)
#: Follow-ups that ask for the reason (aokvqa: the answer carries the rationale).
WHY = ("Why?", "Explain why.", "What is the reason?", "Can you say why?", "And why is that?")


def _one(convs: list[Conversation], st: LoadStats, image: str, question: str, answer: str,
         max_images: int | None) -> None:
    conv = limit_images(Conversation(rounds=[Round(question=question, answer=answer, images=[image])]), max_images)
    if conv is None:
        st.skip("too_many_images")
    else:
        convs.append(conv)


def load_minigpt4(data_path: str, *, seed: int = 0, max_images: int | None = DEFAULT_MAX_IMAGES,
                  stats: dict | None = None) -> list[Conversation]:
    """cc_sbu_align (MiniGPT-4's 3.5k detailed captions): a description question, the caption."""
    ann = find_first([os.path.join(data_path, "cc_sbu_align", "filter_cap.json")],
                     what="minigpt4 (https://huggingface.co/datasets/Vision-CAIR/cc_sbu_align)")
    images = os.path.join(data_path, "cc_sbu_align", "image")
    require_dir(images, what="minigpt4 (cc_sbu_align images)")
    raw = read_json(ann)
    items = raw.get("annotations") if isinstance(raw, dict) else None
    if not isinstance(items, list):
        raise ValueError(f"{ann}: expected {{\"annotations\": [{{\"image_id\", \"caption\"}}, ...]}}")
    st, rng, out = LoadStats("minigpt4"), random.Random(seed), []
    for a in items:
        iid, cap = (a.get("image_id"), a.get("caption")) if isinstance(a, dict) else (None, None)
        if iid in (None, "") or not isinstance(cap, str) or not cap.strip():
            st.skip("malformed")
            continue
        _one(out, st, os.path.join(images, f"{iid}.jpg"), rng.choice(DESCRIBE), cap.strip(), max_images)
    return st.finish(out, stats)


def load_aokvqa(data_path: str, *, seed: int = 0, max_images: int | None = DEFAULT_MAX_IMAGES,
                stats: dict | None = None) -> list[Conversation]:
    """A-OKVQA train: the question and a follow-up asking why; "The answer is X. Because <rationales>"."""
    ann = find_first([os.path.join(data_path, "aokvqa", "annotations", "aokvqa_v1p0_train.json"),
                      os.path.join(data_path, "aokvqa", "aokvqa_v1p0_train.json")],
                     what="aokvqa (https://allenai.org/project/a-okvqa/home)")
    images = os.path.join(data_path, "coco", "train2017")
    require_dir(images, what="aokvqa (COCO 2017 train images)")
    items = read_json(ann)
    if not isinstance(items, list):
        raise ValueError(f"{ann}: expected a JSON list of questions, got {type(items).__name__}")
    st, rng, out = LoadStats("aokvqa"), random.Random(seed), []
    for a in items:
        try:
            q, choices, idx, why = a["question"], a["choices"], a["correct_choice_idx"], a.get("rationales") or []
            image = f"{int(a['image_id']):012d}.jpg"
            answer = choices[idx]
            ok = isinstance(q, str) and isinstance(answer, str) and all(isinstance(r, str) for r in why)
        except (KeyError, TypeError, ValueError, IndexError):
            ok = False
        if not ok:
            st.skip("malformed")
            continue
        text = f"The answer is {answer.strip()}."
        if why:
            text += " Because " + " ".join(r.strip() for r in why)
        _one(out, st, os.path.join(images, image), f"{q.strip()} {rng.choice(WHY)}", text, max_images)
    return st.finish(out, stats)


def load_coco_caption(data_path: str, *, seed: int = 0, splits=("train", "restval"),
                      max_images: int | None = DEFAULT_MAX_IMAGES, stats: dict | None = None) -> list[Conversation]:
    """COCO captions in Karpathy's split file: a description question, one of the image's captions.
    ``splits``: which of the file's splits to read (None: all, as the original)."""
    ann = find_first([os.path.join(data_path, "coco_caption", "dataset.json"),
                      os.path.join(data_path, "coco_caption", "dataset_coco.json")],
                     what="coco_caption (https://cs.stanford.edu/people/karpathy/deepimagesent/coco.zip)")
    root = os.path.join(data_path, "coco", "2014")
    require_dir(root, what="coco_caption (COCO 2014 train and val images)")
    raw = read_json(ann)
    items = raw.get("images") if isinstance(raw, dict) else None
    if not isinstance(items, list):
        raise ValueError(f"{ann}: expected {{\"images\": [{{\"filename\", \"sentences\"}}, ...]}}")
    st, rng, out = LoadStats("coco_caption"), random.Random(seed), []
    for a in items:
        if not isinstance(a, dict):
            st.skip("malformed")
            continue
        if splits is not None and a.get("split") is not None and a.get("split") not in splits:
            st.skip("other_split")
            continue
        fn, sents = a.get("filename"), a.get("sentences")
        if isinstance(sents, dict):
            sents = [sents]
        caps = [s["raw"].strip() for s in sents or [] if isinstance(s, dict) and isinstance(s.get("raw"), str)
                and s["raw"].strip()] if isinstance(sents, list) else []
        if not isinstance(fn, str) or not fn or not caps:
            st.skip("malformed")
            continue
        flat = os.path.join(root, fn)
        nested = os.path.join(root, str(a.get("filepath", "")), fn)
        image = nested if not os.path.exists(flat) and a.get("filepath") and os.path.exists(nested) else flat
        _one(out, st, image, rng.choice(DESCRIBE), rng.choice(caps), max_images)
    return st.finish(out, stats)


def _tiny_image(path: str) -> bool:
    """Whether an image's header says 1 pixel wide or high (OCR-VQA's placeholders). Unreadable: False
    (the image check reports it)."""
    try:
        from PIL import Image

        with Image.open(path) as im:
            return im.size[0] <= 1 or im.size[1] <= 1
    except Exception:
        return False


def load_ocr_vqa(data_path: str, *, seed: int = 0, questions: str = "one",
                 max_images: int | None = DEFAULT_MAX_IMAGES, stats: dict | None = None) -> list[Conversation]:
    """OCR-VQA (book covers): ``questions="one"`` takes one of a cover's questions (the original's),
    ``"all"`` makes each of them a round."""
    if questions not in ("one", "all"):
        raise ValueError(f"questions must be 'one' or 'all', got {questions!r}")
    ann = find_first([os.path.join(data_path, "OCR_VQA", "dataset.json")], what="ocr_vqa (https://ocr-vqa.github.io/)")
    images = os.path.join(data_path, "OCR_VQA", "images")
    require_dir(images, what="ocr_vqa (OCR_VQA/images, downloaded with the data set's script)")
    raw = read_json(ann)
    if not isinstance(raw, dict):
        raise ValueError(f"{ann}: expected a JSON object {{id: {{imageURL, questions, answers}}}}")
    st, rng, out = LoadStats("ocr_vqa"), random.Random(seed), []
    for k, a in raw.items():
        qs, ans = (a.get("questions"), a.get("answers")) if isinstance(a, dict) else (None, None)
        url = a.get("imageURL") if isinstance(a, dict) else None
        if (not isinstance(qs, list) or not isinstance(ans, list) or not qs or len(qs) != len(ans)
                or not all(isinstance(x, str) for x in qs + ans) or not isinstance(url, str)):
            st.skip("malformed")
            continue
        image = os.path.join(images, k + os.path.splitext(url)[1])
        if _tiny_image(image):
            st.skip("placeholder_image")
            continue
        pairs = list(zip(qs, ans))
        if questions == "one":
            pairs = [rng.choice(pairs)]
        rounds = [Round(question=q.strip(), answer=str(x).strip()) for q, x in pairs]
        rounds[0].images = [image]
        conv = limit_images(Conversation(rounds=rounds), max_images)
        if conv is None:
            st.skip("too_many_images")
        else:
            out.append(conv)
    return st.finish(out, stats)


def majority(answers: Any) -> str | None:
    """The most frequent answer of a list (the first of equals), a string as is, else None."""
    if isinstance(answers, str):
        return answers
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        return None
    counts = Counter(answers)
    best = max(counts.values())
    return next(a for a in answers if counts[a] == best)


def load_vqa(data_path: str, *, max_images: int | None = DEFAULT_MAX_IMAGES,
             stats: dict | None = None) -> list[Conversation]:
    """The generic VQA format: ``data_path/vqa/*.json`` (or ``data_path`` itself a .json file), each a
    list of ``{"image", "question", "answer"}``; image paths relative to the file's folder."""
    if os.path.isfile(data_path):
        files = [data_path]
    else:
        files = sorted(glob.glob(os.path.join(data_path, "vqa", "*.json")))
        if not files:
            raise FileNotFoundError(f"vqa: missing data file(s): no {os.path.join(data_path, 'vqa', '*.json')} "
                                    "(the expected data_path layout is described in visualchat_train/data/vqa.py)")
    st, out = LoadStats("vqa"), []
    for path in files:
        items = read_json(path)
        if not isinstance(items, list):
            raise ValueError(f"{path}: expected a JSON list of {{image, question, answer}}, got {type(items).__name__}")
        base = os.path.dirname(os.path.abspath(path))
        for a in items:
            image, q = (a.get("image"), a.get("question")) if isinstance(a, dict) else (None, None)
            ans = majority(a.get("answer")) if isinstance(a, dict) else None
            if not isinstance(image, str) or not image or not isinstance(q, str) or not q.strip() or ans is None:
                st.skip("malformed")
                continue
            ref = image if os.path.isabs(image) or image.startswith("base64:") else os.path.join(base, image)
            _one(out, st, ref, strip_marker(q), ans.strip(), max_images)
    return st.finish(out, stats)
