"""``llava_otter_blend``: MIMIC-IT CGD groups with LLaVA conversations about each of their images.

Both data sets use COCO 2017 train images, so a CGD image (``CGD_IMG_000000426149``) and a LLaVA
sample (``"image": "000000426149.jpg"``) can be matched by COCO file name. Each CGD group becomes
one multi-image conversation:

1. for each image of the group, in published order: ``llava_per_image`` LLaVA conversations
   about it (all their rounds; the image comes with the first of them), then
2. the group's CGD questions (``cgd_questions`` of them, default all), the first of which brings
   any images not yet shown.

Image i is therefore the i-th CGD image. As soon as one image has no LLaVA conversation, that
image and all later ones are shown with the first CGD question instead, which keeps the order (the
reference dropped such groups unless only the last image lacked LLaVA data). A group whose first
image has no LLaVA conversation would be plain CGD and is skipped. ``llava_per_image`` and
``cgd_questions`` may be ``"random"``: the reference's draws, 1..all of an image's LLaVA
conversations and 1..all of the group's CGD questions (the chosen ones keep their file order). The
reference drew them on every read; here they are drawn once with ``seed`` (``seed=None`` takes the
first ones in file order), so the data set is reproducible. Files needed: those of ``llava``,
``llava_dial`` and ``otter_mimicit_cgd`` (all three LLaVA files, as the reference).
"""
from __future__ import annotations

import os
import random

from visualchat.template import Conversation, Round

from ._common import DEFAULT_MAX_IMAGES, LoadStats, require_dir
from .llava import ALL_LLAVA_FILES, coco_dir, llava_by_image, llava_files
from .mimicit import cgd_groups, instructions_file


def load_llava_otter_blend(data_path: str, *, llava_per_image: int | str = 1, cgd_questions: int | str | None = None,
                           seed: int | None = 0, max_images: int | None = DEFAULT_MAX_IMAGES,
                           stats: dict | None = None) -> list[Conversation]:
    if llava_per_image != "random" and not (isinstance(llava_per_image, int) and llava_per_image >= 1):
        raise ValueError(f"llava_per_image must be >= 1 or 'random', got {llava_per_image!r}")
    if cgd_questions not in (None, "random") and not (isinstance(cgd_questions, int) and cgd_questions >= 1):
        raise ValueError(f"cgd_questions must be >= 1, None (all) or 'random', got {cgd_questions!r}")
    # check every input before reading any of them
    missing = []
    try:
        llava_files(data_path, ALL_LLAVA_FILES)
    except FileNotFoundError as e:
        missing.append(str(e))
    try:
        instructions_file(data_path, "CGD")
    except FileNotFoundError as e:
        missing.append(str(e))
    if missing:
        raise FileNotFoundError("llava_otter_blend needs the llava, llava_dial and otter_mimicit_cgd files; "
                                + "; ".join(missing))
    images = coco_dir(data_path)
    require_dir(images, what="llava_otter_blend (COCO 2017 train images)")

    st = LoadStats("llava_otter_blend")
    by_image = llava_by_image(data_path)
    rng = random.Random(seed) if seed is not None else None
    draw_rng = rng or random.Random(0)  # "random" counts need a generator even with seed=None
    out = []
    for files, cgd_qa in cgd_groups(data_path, st):
        if max_images is not None and len(files) > max_images:
            st.skip("too_many_images")
            continue
        rounds: list[Round] = []
        shown = 0
        for f in files:
            convs = by_image.get(f)
            if not convs:
                break
            k = draw_rng.randint(1, len(convs)) if llava_per_image == "random" else min(llava_per_image, len(convs))
            chosen = rng.sample(convs, k) if rng is not None else convs[:k]
            first = True
            for qa in chosen:
                for q, a in qa:
                    rounds.append(Round(question=q, answer=a, images=[os.path.join(images, f)] if first else []))
                    first = False
            shown += 1
        if shown == 0:
            st.skip("no_llava_for_first_image")
            continue
        if cgd_questions == "random":
            pick = sorted(draw_rng.sample(range(len(cgd_qa)), draw_rng.randint(1, len(cgd_qa))))
            qa = [cgd_qa[j] for j in pick]
        else:
            qa = cgd_qa if cgd_questions is None else cgd_qa[:cgd_questions]
        cgd_rounds = [Round(question=q, answer=a) for q, a in qa]
        cgd_rounds[0].images = [os.path.join(images, f) for f in files[shown:]]
        out.append(Conversation(rounds=rounds + cgd_rounds))
    return st.finish(out, stats)
