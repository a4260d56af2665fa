"""Text generation for causal LMs, token by token, with stop sequences and streaming.

The tokens come from the model's decode engine (app/inference/engine.py), which decodes the
sequences of every request on the model (and on every LoRA adapter of its base) together. A
``Generator`` submits a request's sequences at once and turns each one's tokens into text: it
decodes the growing sequence and yields text as soon as it is final (not possibly the start of a
stop sequence, not half of a UTF-8 character). A stop sequence found here stops that sequence in
the engine; the sequence leaves the batch at the next step. Nothing here holds a lock: the caller
only waits on its submission's queue.
"""

from __future__ import annotations

import collections.abc as abc
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import AutoModelForCausalLM, AutoTokenizer

from app.inference.engine import DecodeEngine, Run
from app.inference.loading import load_pretrained
from app.inference.sampling import FinishReason, Generation, GenerationParams, Piece
from app.inference.templates import DEFAULT_CHAT_TEMPLATE
from app.inference.tool_calls import render_chat

# One sequence to generate: a prompt's token ids and its parameters.
Prompt = tuple[list[int], GenerationParams]


def load_causal_lm(path: Path) -> Any:
    return load_pretrained(AutoModelForCausalLM, path)


def load_tokenizer(path: Path) -> Any:
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return tokenizer


class Generator:
    """One tokenizer over a (possibly shared) model's decode engine. ``adapter`` names the LoRA
    adapter its sequences use (None: the model itself); ``on_release`` runs when the cache lets
    this generator go (it stops the engine, or takes the adapter off its base)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        engine: DecodeEngine,
        adapter: str | None = None,
        on_release: Callable[[], None] = lambda: None,
    ):
        self.model, self.tokenizer, self.engine, self.adapter = model, tokenizer, engine, adapter
        self.release = on_release
        config = model.config
        self.context_length = int(
            getattr(config, "max_position_embeddings", 0) or getattr(config, "n_positions", 2048)
        )

    # -- prompts ---------------------------------------------------------------------------------

    def chat_prompt(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        prefill: str = "",
    ) -> list[int]:
        """The conversation (OpenAI's messages, with ``tools``) rendered as training did
        (app/inference/tool_calls.py), followed by ``prefill``, the answer's opening."""
        rendered = render_chat(self.tokenizer, messages, tools, add_generation_prompt=True)
        return self.encode(rendered + prefill)

    def encode(self, text: str) -> list[int]:
        # The chat template already holds any special tokens the model expects.
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # -- generation ------------------------------------------------------------------------------

    def generate(
        self, prompts: list[Prompt], cancel: threading.Event | None = None
    ) -> abc.Generator[tuple[int, Piece], None, None]:
        """Generate every one of ``prompts`` at once (they decode together, and prompts that are
        the same are prefilled once); yield ``(index, piece)`` as each piece becomes final, the
        pieces of different sequences interleaved. Each sequence's last piece has its
        finish_reason. Setting ``cancel`` (a client went away) stops them all at the next token;
        closing this generator stops them and waits until they have left the engine."""
        texts = [
            _Text(self.tokenizer, params, self._budget(prompt, params))
            for prompt, params in prompts
        ]
        for index, text in enumerate(texts):
            if text.max_new <= 0:
                yield index, Piece("", "length", 0)
        wanted = [index for index, text in enumerate(texts) if text.max_new > 0]
        if not wanted:
            return
        runs = [Run(prompts[i][0], prompts[i][1], texts[i].max_new) for i in wanted]
        submission = self.engine.submit(
            runs, adapter=self.adapter, eos=self.tokenizer.eos_token_id, cancel=cancel
        )
        open_ = set(range(len(runs)))
        try:
            while open_:
                slot, item = submission.next()
                if slot not in open_:
                    continue  # tokens decoded after this sequence's stop sequence
                index, text = wanted[slot], texts[wanted[slot]]
                if isinstance(item, BaseException):
                    raise item
                pieces = text.end() if item is None else text.feed(item)
                for piece in pieces:
                    yield index, piece
                if text.finish is not None:
                    open_.discard(slot)
                    submission.stops[slot].set()
        finally:
            submission.close()

    def stream(
        self,
        prompt_ids: list[int],
        params: GenerationParams,
        cancel: threading.Event | None = None,
    ) -> abc.Generator[Piece, None, None]:
        """Yield text pieces as they become final; the last piece has the finish_reason.
        Setting ``cancel`` (a client went away) stops the generation at the next token."""
        for _, piece in self.generate([(prompt_ids, params)], cancel):
            yield piece

    def complete(
        self,
        prompt_ids: list[int],
        params: GenerationParams,
        cancel: threading.Event | None = None,
    ) -> Generation:
        return self.complete_all([(prompt_ids, params)], cancel)[0]

    def complete_all(
        self, prompts: list[Prompt], cancel: threading.Event | None = None
    ) -> list[Generation]:
        """Every one of ``prompts`` generated at once, in their order."""
        results = [Generation() for _ in prompts]
        for index, piece in self.generate(prompts, cancel):
            result = results[index]
            result.text += piece.text
            result.completion_tokens = piece.completion_tokens or result.completion_tokens
            if piece.finish_reason:
                result.finish_reason = piece.finish_reason
        return results

    def _budget(self, prompt_ids: list[int], params: GenerationParams) -> int:
        """The tokens this prompt may generate: its max_tokens, within the context."""
        return min(params.max_tokens, max(self.context_length - len(prompt_ids), 0))


class _Text:
    """One sequence's text so far, and what of it is final."""

    def __init__(self, tokenizer: Any, params: GenerationParams, max_new: int):
        self.tokenizer, self.stops, self.max_new = tokenizer, params.stop, max_new
        self.generated: list[int] = []
        self.emitted = ""
        self.finish: FinishReason | None = None

    def feed(self, token: int) -> list[Piece]:
        """The pieces ``token`` makes final; the last one ends the sequence if it is finished
        (the end of sequence, a stop sequence)."""
        if token == self.tokenizer.eos_token_id:
            self.finish = "stop"
        else:
            self.generated.append(token)
        text = self.tokenizer.decode(self.generated, skip_special_tokens=True)
        cut = _first_stop(text, self.stops)
        if cut is not None:
            text, self.finish = text[:cut], "stop"
        final = text if self.finish else _stable_prefix(text, self.stops)
        pieces = []
        if len(final) > len(self.emitted):
            pieces.append(Piece(final[len(self.emitted) :], completion_tokens=len(self.generated)))
            self.emitted = final
        if self.finish:
            pieces.append(Piece("", self.finish, len(self.generated)))
        return pieces

    def end(self) -> list[Piece]:
        """The engine has let the sequence go (its token budget, or a cancel): the rest."""
        text = self.tokenizer.decode(self.generated, skip_special_tokens=True)
        self.finish = "length" if len(self.generated) >= self.max_new else "stop"
        pieces = []
        if len(text) > len(self.emitted):
            pieces.append(Piece(text[len(self.emitted) :], completion_tokens=len(self.generated)))
        pieces.append(Piece("", self.finish, len(self.generated)))
        return pieces


def _first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    positions = [text.find(s) for s in stops if s and s in text]
    return min(positions) if positions else None


def _stable_prefix(text: str, stops: tuple[str, ...]) -> str:
    """The part of ``text`` that can no longer change: not a half-decoded character at the end,
    and not the beginning of a stop sequence."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    for stop in stops:
        for size in range(min(len(stop) - 1, end), 0, -1):
            if text[:end].endswith(stop[:size]):
                end -= size
                break
    return text[:end]
