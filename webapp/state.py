"""What ``gr.State`` holds for one browser tab."""
from __future__ import annotations

from visualchat.chat_session import ChatSession
from visualchat.serving import Server


class TabState:
    """What ``gr.State`` holds for one browser tab: its chat and its comparison, created on first
    use. Gradio deep-copies the initial value for every new tab; that copy is a fresh empty state."""

    def __init__(self):
        self.chat: ChatSession | None = None
        self.compare: tuple[ChatSession, ChatSession] | None = None

    def __deepcopy__(self, memo):
        return TabState()

    def get_chat(self, server: Server) -> ChatSession:
        if self.chat is None:
            self.chat = ChatSession(server, "chat")
        return self.chat

    def get_compare(self, server: Server) -> tuple[ChatSession, ChatSession]:
        if self.compare is None:
            self.compare = (ChatSession(server, "ca"), ChatSession(server, "mmca"))
        return self.compare

    def close(self) -> None:
        for c in [self.chat, *(self.compare or ())]:
            if c is not None:
                c.close()
        self.chat = self.compare = None
