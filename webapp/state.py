"""What ``gr.State`` holds for one browser tab: the conversations of its panels."""
from __future__ import annotations

from visualchat.served import ServedConversation


class TabState:
    """A browser tab's chats: per panel (``"chat"``, ``"compare"``) one ServedConversation per model, created on
    first use. Gradio deep-copies the initial value for every new tab; that copy is a fresh empty state."""

    def __init__(self):
        self.panels: dict[str, list[ServedConversation]] = {}

    def __deepcopy__(self, memo):
        return TabState()

    def chats(self, server, panel: str, models: tuple[str, ...]) -> list[ServedConversation]:
        """The panel's conversations, one per model name (created on first use)."""
        if panel not in self.panels:
            self.panels[panel] = [ServedConversation(server, name) for name in models]
        return self.panels[panel]

    @property
    def chat(self) -> ServedConversation | None:
        """The Chat tab's conversation (None before its first use)."""
        return self.panels["chat"][0] if "chat" in self.panels else None

    @property
    def compare(self) -> tuple[ServedConversation, ...] | None:
        """The Compare tab's (CA, MMCA) conversations (None before their first use)."""
        return tuple(self.panels["compare"]) if "compare" in self.panels else None

    def close(self) -> None:
        for chats in self.panels.values():
            for c in chats:
                c.close()
        self.panels = {}
