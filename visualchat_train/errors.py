"""The trainer's one error type: a problem found before (or instead of) training, whose message is
for the user (``python -m visualchat_train`` prints it and exits with status 2)."""
from __future__ import annotations


class TrainError(Exception):
    """A problem found before (or instead of) training, with a message for the user."""
