"""What a route may ask of a loaded model: the servable of each use. No torch here.

A servable may also have ``release()``: the cache calls it once, when the servable has left the
cache and its last user is done (a LoRA adapter leaves its shared base then).
"""

from __future__ import annotations

import threading
from collections.abc import Generator
from typing import Any, Literal, Protocol

from app.inference.sampling import Generation, GenerationParams, Piece

Use = Literal["predict", "generate", "embed"]
# The routes that serve each use, for the message that refuses the wrong kind of model.
USES: dict[Use, str] = {
    "predict": "/v1/predictions",
    "generate": "/v1/chat/completions and /v1/completions",
    "embed": "/v1/embeddings",
}


class Predictor(Protocol):
    def predict(self, inputs: list[Any]) -> tuple[list[dict[str, Any]], int]:
        """One result per input (a label with scores, or text), and the prompt tokens read."""
        ...


class TextGenerator(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def chat_prompt(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        prefill: str = "",
    ) -> list[int]:
        """The conversation with its tools, rendered and encoded, then ``prefill``."""
        ...

    def stream(
        self, prompt_ids: list[int], params: GenerationParams, cancel: threading.Event | None = None
    ) -> Generator[Piece, None, None]:
        """Text pieces as they become final; setting ``cancel`` stops at the next token."""
        ...

    def complete(
        self, prompt_ids: list[int], params: GenerationParams, cancel: threading.Event | None = None
    ) -> Generation: ...

    def generate(
        self,
        prompts: list[tuple[list[int], GenerationParams]],
        cancel: threading.Event | None = None,
    ) -> Generator[tuple[int, Piece], None, None]:
        """All of ``prompts`` at once: ``(index, piece)`` as pieces of any of them are final."""
        ...

    def complete_all(
        self,
        prompts: list[tuple[list[int], GenerationParams]],
        cancel: threading.Event | None = None,
    ) -> list[Generation]:
        """All of ``prompts`` generated at once, in their order."""
        ...


class Embedder(Protocol):
    def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """One unit vector per text, and the tokens read."""
        ...
