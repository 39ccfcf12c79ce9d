"""Token labels that stay visible on an axis: whitespace drawn, never a blank tick."""

from __future__ import annotations

__all__ = ["token_label"]

_MARKS = {"\n": "⏎", "\r": "␍", "\t": "⇥", " ": "·"}


def token_label(token: str) -> str:
    """``token`` with its whitespace made visible: ``"\\n"`` → ``"⏎"``, tabs ``"⇥"``, spaces ``"·"``
    (``" Paris"`` → ``"·Paris"``); the empty token becomes ``"∅"``. Hover text keeps the raw ``repr``."""
    if not token:
        return "∅"
    return "".join(_MARKS.get(ch, ch) for ch in token)
