import csv
import json

from tests.conftest import color_image
import pytest

from visualchat_train.eval import (described_objects, normalise, object_f1, prefix_accuracy, print_table, run_conversations,
                        score_shapes)


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
    from visualchat_train.data.shapes import generate

    script = [(r.question, r.answer, t) for s in generate("test", 6)
              for r, t in zip(s.conversation.rounds, s.round_types)]
    res = score_shapes(ScriptedVC(script), n=6, progress=False)
    assert res["accuracy"]["all"]["accuracy"] == 1.0  # case and final full stop are normalised
    res = score_shapes(ScriptedVC(script, wrong_types=("single",)), n=6, progress=False)
    assert res["accuracy"]["single"]["accuracy"] == 0.0
    n_single = res["accuracy"]["single"]["n"]
    assert res["accuracy"]["all"]["accuracy"] == 1 - n_single / res["accuracy"]["all"]["n"]


def test_a_longer_result_is_rescored_on_its_first_conversations():
    """prefix_accuracy re-scores a saved result on its first n conversations from its answers: the same
    figures as scoring those n conversations directly (learning-curve points from longer evaluations)."""
    from visualchat_train.data.shapes import generate

    script = [(r.question, r.answer, t) for s in generate("test", 8)
              for r, t in zip(s.conversation.rounds, s.round_types)]
    wrong = ("cross", "refer_back")
    long = score_shapes(ScriptedVC(script, wrong_types=wrong), n=8, progress=False)
    short = score_shapes(ScriptedVC(script, wrong_types=wrong), n=5, progress=False)
    assert prefix_accuracy(long, 5) == short["accuracy"] != long["accuracy"]
    assert prefix_accuracy(long, 8) == long["accuracy"]
    with pytest.raises(ValueError, match="needs at least"):
        prefix_accuracy(short, 8)
    with pytest.raises(ValueError, match="needs at least"):
        prefix_accuracy({**long, "answers": None}, 5)


def test_the_table_says_which_goals_are_met(capsys):
    acc = {"all": {"accuracy": 0.5, "n": 10}, "single": {"accuracy": 0.96, "n": 5},
           "cross": {"accuracy": 0.25, "n": 4}, "single/color": {"accuracy": 1.0, "n": 2}}
    print_table({"accuracy": acc})
    rows = {line.split(" | ")[0][2:]: line for line in capsys.readouterr().out.splitlines()[2:]}
    assert rows["single"].endswith("| >= 95%: met |") and rows["cross"].endswith("| >= 80%: short by 55.0 points |")
    assert rows["all"].endswith("|  |") and rows["single/color"].endswith("|  |")


def test_describe_questions_get_an_object_f1():
    from visualchat_train.data.shapes import generate

    script = [(r.question, r.answer, t) for s in generate("test", 30)
              for r, t in zip(s.conversation.rounds, s.round_types)]
    res = score_shapes(ScriptedVC(script), n=30, progress=False)
    described = [k for k in res["accuracy"] if k.endswith("/describe")]
    assert described and all(res["accuracy"][k]["object_f1"] == 1.0 for k in described)
    assert all("object_f1" not in v for k, v in res["accuracy"].items() if not k.endswith("/describe"))


def test_object_f1_gives_partial_credit():
    assert described_objects("A red circle, a blue star and a red circle.") == {("red", "circle"): 2, ("blue", "star"): 1}
    assert object_f1("a red circle and a green square", "a red circle, a blue star and a green square") == 0.8
    assert object_f1("a blue circle", "a red circle") == 0.0 and object_f1("The answer is 1", "a red circle") == 0.0
    assert object_f1("a red circle, a red circle", "a red circle") == 2 * 0.5 * 1 / 1.5  # repeats are not free


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


def test_a_round_may_list_several_images_separated_by_spaces(tiny_vc, tmp_path, monkeypatch):
    """eval_comprehensive.json's zootopia_adventures2: three images in the first round's field."""
    from visualchat_train.eval import image_paths

    for i, rgb in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)], 1):
        (tmp_path / "zootopia").mkdir(exist_ok=True)
        color_image(rgb).save(tmp_path / "zootopia" / f"z{i}.png")
    color_image((9, 9, 9)).save(tmp_path / "with space.png")
    field = " ".join(f"./eval/eval_data/images/zootopia/z{i}.png" for i in (1, 2, 3))
    assert image_paths(field, str(tmp_path)) == [str(tmp_path / "zootopia" / f"z{i}.png") for i in (1, 2, 3)]
    assert image_paths("with space.png", str(tmp_path)) == [str(tmp_path / "with space.png")]
    seen = []
    ask = type(tiny_vc.new_session()).ask

    def spy(self, q, images, **kw):
        seen.append(len(images))
        return ask(self, q, images, **kw)

    monkeypatch.setattr(type(tiny_vc.new_session()), "ask", spy)
    convs = {"zootopia_adventures2": [["Create an engaging story strictly based on the images.", field],
                                      ["Name the movie."]]}
    out = tmp_path / "answers.csv"
    counts = run_conversations(tiny_vc, convs, str(tmp_path), str(out), max_new_tokens=2, progress=False)
    assert counts == {"conversations": 1, "failed": 0} and seen == [3, 0]
    rows = list(csv.DictReader(open(out)))
    assert rows[0]["image_path"] == field and rows[0]["error"] == ""
