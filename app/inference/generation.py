"""Text generation for causal LMs, token by token, with stop sequences and streaming.

``model.generate`` runs in a thread and hands each new token to a queue; the caller decodes the
growing sequence and yields text as soon as it is final (not possibly the start of a stop
sequence, not half of a UTF-8 character). A stop sequence ends generation at once through a
stopping criterion. One lock per loaded model serialises generations, so several LoRA adapters
can share one base model: the adapter is switched inside the lock.
"""

from __future__ import annotations

import collections.abc as abc
import logging
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteria
from transformers.generation.streamers import BaseStreamer

from app.inference.loading import load_pretrained
from app.inference.sampling import FinishReason, Generation, GenerationParams, Piece
from app.inference.templates import DEFAULT_CHAT_TEMPLATE

log = logging.getLogger(__name__)


class _QueueStreamer(BaseStreamer):
    def __init__(self) -> None:
        self.tokens: queue.Queue[list[int] | None] = queue.Queue()
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate() first pushes the prompt
            self._prompt_seen = True
            return
        self.tokens.put(value.reshape(-1).tolist())

    def end(self) -> None:
        self.tokens.put(None)


class _StopWhenSet(StoppingCriteria):
    """Stops the generation once any of ``events`` is set."""

    def __init__(self, *events: threading.Event):
        self.events = events

    def __call__(
        self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any
    ) -> torch.Tensor:
        stop = any(event.is_set() for event in self.events)
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool)


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
    """One tokenizer over a (possibly shared) model. ``activate`` runs inside the model's lock
    before each generation (it selects a LoRA adapter, or does nothing); ``on_release`` runs
    when the cache lets this generator go (a LoRA adapter leaves its base)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        lock: threading.Lock,
        activate: Callable[[], None] = lambda: None,
        on_release: Callable[[], None] = lambda: None,
    ):
        self.model, self.tokenizer, self.lock, self.activate = model, tokenizer, lock, activate
        self.release = on_release
        config = model.config
        self.context_length = int(
            getattr(config, "max_position_embeddings", 0) or getattr(config, "n_positions", 2048)
        )

    # -- prompts ---------------------------------------------------------------------------------

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        rendered = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        return self.encode(rendered)

    def encode(self, text: str) -> list[int]:
        # The chat template already holds any special tokens the model expects.
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # -- generation ------------------------------------------------------------------------------

    def stream(
        self,
        prompt_ids: list[int],
        params: GenerationParams,
        cancel: threading.Event | None = None,
    ) -> abc.Generator[Piece, None, None]:
        """Yield text pieces as they become final; the last piece has the finish_reason.
        Setting ``cancel`` (a client went away) stops the generation at the next token."""
        max_new = min(params.max_tokens, max(self.context_length - len(prompt_ids), 0))
        if max_new <= 0:
            yield Piece("", "length", 0)
            return
        # This sequence's own stop (a stop sequence, the end), apart from the caller's cancel,
        # which may go on to the request's next sequence.
        streamer, stop_event = _QueueStreamer(), threading.Event()
        stops = (stop_event,) if cancel is None else (stop_event, cancel)
        failure: list[BaseException] = []
        thread = threading.Thread(
            target=self._generate,
            args=(prompt_ids, params, max_new, streamer, stops, failure),
            daemon=True,
        )
        thread.start()
        generated: list[int] = []
        emitted = ""
        finish: FinishReason | None = None
        eos = self.tokenizer.eos_token_id
        try:
            while True:
                tokens = streamer.tokens.get()
                if tokens is None:
                    break
                if eos is not None and eos in tokens:
                    generated += tokens[: tokens.index(eos)]
                    finish = "stop"
                    stop_event.set()
                else:
                    generated += tokens
                text = self.tokenizer.decode(generated, skip_special_tokens=True)
                cut = _first_stop(text, params.stop)
                if cut is not None:
                    text, finish = text[:cut], "stop"
                    stop_event.set()
                final = text if finish else _stable_prefix(text, params.stop)
                if len(final) > len(emitted):
                    yield Piece(final[len(emitted) :], completion_tokens=len(generated))
                    emitted = final
                if finish:
                    break
        finally:
            stop_event.set()
            thread.join()
        if failure:
            raise failure[0]
        if finish is None:
            text = self.tokenizer.decode(generated, skip_special_tokens=True)
            finish = "length" if len(generated) >= max_new else "stop"
            if len(text) > len(emitted):
                yield Piece(text[len(emitted) :], completion_tokens=len(generated))
        yield Piece("", finish, len(generated))

    def _generate(
        self,
        prompt_ids: list[int],
        params: GenerationParams,
        max_new: int,
        streamer: _QueueStreamer,
        stops: tuple[threading.Event, ...],
        failure: list[BaseException],
    ) -> None:
        try:
            input_ids = torch.tensor([prompt_ids], dtype=torch.long)
            kwargs: dict[str, Any] = {
                "input_ids": input_ids,
                "attention_mask": torch.ones_like(input_ids),
                "max_new_tokens": max_new,
                "streamer": streamer,
                "stopping_criteria": [_StopWhenSet(*stops)],
                "pad_token_id": self.tokenizer.pad_token_id,
                "eos_token_id": self.tokenizer.eos_token_id,
            }
            if params.temperature > 0:
                kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p)
            else:
                kwargs.update(do_sample=False)
            with self.lock, torch.inference_mode():
                if any(stop.is_set() for stop in stops):  # stopped while waiting for the lock
                    streamer.end()
                    return
                self.activate()
                if params.seed is not None:
                    torch.manual_seed(params.seed)
                self.model.generate(**kwargs)
        except BaseException as exc:  # surfaced to the caller's thread
            log.exception("generation failed")
            failure.append(exc)
            streamer.end()

    def complete(
        self,
        prompt_ids: list[int],
        params: GenerationParams,
        cancel: threading.Event | None = None,
    ) -> Generation:
        result = Generation()
        for piece in self.stream(prompt_ids, params, cancel):
            result.text += piece.text
            result.completion_tokens = piece.completion_tokens or result.completion_tokens
            if piece.finish_reason:
                result.finish_reason = piece.finish_reason
        return result


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
