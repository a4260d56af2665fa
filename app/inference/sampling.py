"""What a generation is asked for and what it gives back (no torch here: the routes use these
before any model is loaded)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class Piece:
    """A piece of generated text; the last piece of a sequence carries its finish_reason."""

    text: str
    finish_reason: FinishReason | None = None
    completion_tokens: int = 0


@dataclass
class Generation:
    text: str = ""
    finish_reason: FinishReason = "stop"
    completion_tokens: int = 0
