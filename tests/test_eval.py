import csv
import json

from tests.conftest import color_image
from train.eval import normalise, run_conversations, score_shapes


class ScriptedVC:
    """Answers from a script, in order: lets the test know the right score in advance."""

    def __init__(self, script, wrong_types=()):
        self.script, self.wrong, self.path = list(script), wrong_types, None

    def new_session(self, system=None):
        vc = self

        class S:
            def ask(self, q, images, max_new_tokens):
                question, ans, tag = vc.script.pop(0)
                assert question == q
                return "WRONG" if tag.split("/")[0] in vc.wrong else ans.upper() + "."

        return S()


def test_shapes_scoring_counts_exact_matches():
    from train.data.shapes import generate

    script = [(r.question, r.answer, t) for s in generate("test", 6)
              for r, t in zip(s.conversation.rounds, s.round_types)]
    res = score_shapes(ScriptedVC(script), n=6, progress=False)
    assert res["accuracy"]["all"]["accuracy"] == 1.0  # case and final full stop are normalised
    res = score_shapes(ScriptedVC(script, wrong_types=("single",)), n=6, progress=False)
    assert res["accuracy"]["single"]["accuracy"] == 0.0
    n_single = res["accuracy"]["single"]["n"]
    assert res["accuracy"]["all"]["accuracy"] == 1 - n_single / res["accuracy"]["all"]["n"]


def test_normalise():
    assert normalise("  Image 2. ") == "image 2" and normalise("top  left") == "top left"


def test_reference_format_runner_reports_missing_images(tiny_vc, tmp_path):
    color_image((255, 0, 0)).save(tmp_path / "a.png")
    convs = {
        "ok": [["Describe the image.", "./eval/eval_data/images/a.png"], ["And again?"]],
        "missing": [["Describe.", "./eval/eval_data/images/zootopia/z1.png"]],
    }
    (tmp_path / "c.json").write_text(json.dumps(convs))
    out = tmp_path / "answers.csv"
    counts = run_conversations(tiny_vc, convs, str(tmp_path), str(out), max_new_tokens=3, progress=False)
    assert counts == {"conversations": 1, "failed": 1}
    rows = list(csv.DictReader(open(out)))
    assert [r["test_name"] for r in rows] == ["ok", "ok", "missing"]
    assert "image not found" in rows[2]["error"] and "z1.png" in rows[2]["error"]
