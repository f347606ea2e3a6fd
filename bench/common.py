"""Small helpers shared by the benchmark scripts."""
from __future__ import annotations

import json
import os
import subprocess


def write_json(path: str | None, result: dict) -> None:
    """Write ``result`` as indented JSON to ``path`` (its folder created); nothing when path is None."""
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")


def busy() -> bool:
    """Whether a training run (``python -m visualchat_train --preset ...``) is running on this machine, so a
    benchmark can record that its timings were taken on a busy machine."""
    try:
        return subprocess.run(["pgrep", "-f", "train --preset"], capture_output=True).returncode == 0
    except OSError:
        return False
