"""The one error type the protocol raises, and the problems it carries.

Callers catch :class:`ProtocolError` and nothing else: whatever bytes arrive, parsing,
verification and validation either succeed or raise it (the property tests hold the code
to that). Each problem names a field path, a stable :class:`~protocol.reasons.Reason` and
a human message, so a rejection can say *every* thing that is wrong at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from protocol.reasons import Reason


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a message: ``lines[1].carats: must be > 0``."""

    path: str
    #: a :class:`Reason`, or the verbatim code of a newer peer's rejection
    reason: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message

    def to_wire(self) -> dict[str, Any]:
        return {"path": self.path, "reason": str(self.reason), "message": self.message}


class ProtocolError(Exception):
    """A frame or message was refused. ``reason`` is the headline code."""

    def __init__(self, reason: Reason, text: str, problems: tuple[Problem, ...] = ()) -> None:
        super().__init__(text)
        self.reason = reason
        self.text = text
        self.problems = problems

    def __str__(self) -> str:
        if not self.problems:
            return f"{self.reason}: {self.text}"
        listed = "; ".join(str(p) for p in self.problems)
        return f"{self.reason}: {self.text}: {listed}"


class FrameError(ProtocolError):
    """The outer frame is unreadable: nothing inside it can be trusted or even read."""


class SignatureError(ProtocolError):
    """The frame parsed but its signature or signing key is not acceptable."""


class ValidationError(ProtocolError):
    """The signed body is not a valid message; ``problems`` lists every fault found."""

    def __init__(self, problems: tuple[Problem, ...], text: str = "message is not valid") -> None:
        super().__init__(Reason.BODY_SCHEMA, text, problems)
