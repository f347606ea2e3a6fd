"""Write requirements.txt and tests/requirements.txt from pyproject.toml, which holds the one list of
dependencies: requirements.txt is the core dependencies with the app and train extras (what the
README's `pip install -r requirements.txt` then `python app.py` needs, and a Hugging Face Space
installs), tests/requirements.txt the test extra. Edit pyproject.toml, then run

    python .ci/requirements.py          # rewrite both files
    python .ci/requirements.py --check  # exit 1 if either differs (tests/test_packaging.py runs this)
"""
import pathlib
import sys
import tomllib

ROOT = pathlib.Path(__file__).resolve().parent.parent
HEADER = ("# Written from pyproject.toml by `python .ci/requirements.py`: edit pyproject.toml, not this file.\n"
          "{note}")
FILES = {
    "requirements.txt": (("app", "train"), "# CPU users: install torch first with `pip install torch==2.13.0` "
                         "(the README does); GPU users get CUDA builds.\n"),
    "tests/requirements.txt": (("test",), "# The test-only extras: the README's test command installs these "
                               "after requirements.txt.\n"),
}


def expected() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    out = {}
    for name, (extras, note) in FILES.items():
        deps = [] if extras == ("test",) else list(project["dependencies"])
        for extra in extras:
            deps += project["optional-dependencies"][extra]
        out[name] = HEADER.format(note=note) + "".join(f"{d}\n" for d in deps)
    return out


def main(argv: list[str]) -> int:
    stale = []
    for name, text in expected().items():
        path = ROOT / name
        if path.exists() and path.read_text() == text:
            continue
        if "--check" in argv:
            stale.append(name)
        else:
            path.write_text(text)
            print(f"wrote {name}")
    if stale:
        print(f"{', '.join(stale)} differ from pyproject.toml: run `python .ci/requirements.py`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
