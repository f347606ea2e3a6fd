"""Small helpers shared by the benchmark scripts."""
from __future__ import annotations

import json
import os


def write_json(path: str | None, result: dict) -> None:
    """Write ``result`` as indented JSON to ``path`` (its folder created); nothing when path is None."""
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
