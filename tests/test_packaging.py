"""`pip install .`: the wheel holds every package, the web app, the shipped assets and four commands; the
requirements files are written from pyproject.toml's one list of dependencies."""
import configparser
import importlib
import importlib.util
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
COMMANDS = {"visualchat-chat", "visualchat-train", "visualchat-eval", "visualchat-app"}


def test_requirements_files_are_written_from_pyproject():
    r = subprocess.run([sys.executable, str(ROOT / ".ci" / "requirements.py"), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def backend_ready() -> bool:
    """setuptools >= 68 (pyproject.toml's build-system) with its bdist_wheel: its own from 70.1, else the
    ``wheel`` package's."""
    if importlib.util.find_spec("setuptools") is None:
        return False
    from importlib.metadata import version

    v = tuple(int(x) for x in version("setuptools").split(".")[:2] if x.isdigit())
    return v >= (70, 1) or (v >= (68, 0) and importlib.util.find_spec("wheel") is not None)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel `pip install .` builds, from a copy of the sources (a build writes into its tree)."""
    if not backend_ready():
        pytest.skip("no setuptools >= 68 able to build wheels here (pyproject.toml's build backend)")
    src = tmp_path_factory.mktemp("src")
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "screenshots")
    for name in ("pyproject.toml", "README.md", "app.py"):
        shutil.copy(ROOT / name, src / name)
    for name in ("visualchat", "visualchat_train", "train", "webapp", "assets"):  # train: the checkout's shim
        shutil.copytree(ROOT / name, src / name, ignore=skip)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(src)], check=True, capture_output=True)
    (path,) = out.glob("*.whl")
    return zipfile.ZipFile(path)


def test_the_wheel_has_every_package_the_app_and_the_assets(wheel):
    names = set(wheel.namelist())
    packages = {str(p.parent.relative_to(ROOT)) for top in ("visualchat", "visualchat_train", "webapp")
                for p in (ROOT / top).rglob("__init__.py") if "__pycache__" not in p.parts}
    assert {f"{p}/__init__.py" for p in packages} <= names  # pyproject lists them by name: none forgotten
    assert "visualchat_app/app.py" in names and "webapp/panel.py" in names
    for ckpt in ("shapes-mmca", "shapes-ca"):  # every file of each checkpoint (one, or shards and their index)
        files = {f"visualchat/_assets/checkpoints/{ckpt}/{f.name}" for f in (ROOT / "assets" / "checkpoints" / ckpt).iterdir()}
        assert f"visualchat/_assets/checkpoints/{ckpt}/config.json" in files and files <= names
    assert {f"visualchat/_assets/examples/{p.name}" for p in (ROOT / "assets" / "examples").glob("*.png")} <= names
    tops = {n.split("/")[0] for n in names}
    assert tops == {"visualchat", "visualchat_train", "webapp", "visualchat_app",
                    next(n.split("/")[0] for n in names if ".dist-info/" in n)}
    # the checkout's train/ (`python -m train` forwards to visualchat_train) is not installed, not even
    # under visualchat_app (the root folder): an installed `train` would collide with anything else so named
    assert "train" not in tops and not any(n.startswith("visualchat_app/train/") for n in names)


def test_the_wheel_installs_the_four_commands(wheel):
    (entry,) = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    cp = configparser.ConfigParser()
    cp.read_string(wheel.read(entry).decode())
    scripts = dict(cp["console_scripts"])
    assert set(scripts) == COMMANDS
    for target in scripts.values():
        module, func = target.split(":")
        module = "app" if module == "visualchat_app.app" else module  # app.py, as the wheel installs it
        assert callable(getattr(importlib.import_module(module), func)), target
