"""VisualChat: multi-round, multi-image visual chat with multi-modal causal attention (MMCA)."""
__version__ = "0.1.0"

from .template import Conversation, Round, Template, DEFAULT_SYSTEM  # noqa: F401


def __getattr__(name):  # lazy: importing the package must not load torch models
    if name == "VisualChat":
        from .model import VisualChat

        return VisualChat
    raise AttributeError(name)
