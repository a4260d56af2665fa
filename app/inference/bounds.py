"""The work one inference request may ask for, bounded by the server's settings: how many
completions (prompts × n) and how many tokens they may generate in all. A request over a bound
gets a 400 naming the parameter; one that leaves ``max_tokens`` out gets a default that fits."""

from __future__ import annotations

from app.core.errors import InvalidRequest
from app.core.settings import Settings

DEFAULT_MAX_TOKENS = 256


def check_choices(settings: Settings, prompts: int, n: int, *, prompt_param: str) -> int:
    """The number of completions asked for, within ``max_choices_per_request``."""
    choices, limit = prompts * n, settings.max_choices_per_request
    if choices > limit:
        raise InvalidRequest(
            f"This request asks for {choices} completions ({prompts} prompt(s) × n={n}); this "
            f"server generates at most {limit} per request.",
            param=prompt_param if prompts > limit or n == 1 else "n",
            code="too_many_completions",
        )
    return choices


def tokens_per_choice(
    settings: Settings, choices: int, max_tokens: int | None, *, param: str = "max_tokens"
) -> int:
    """The tokens each of ``choices`` completions may generate: ``max_tokens`` when it is
    within the bounds, else a 400; when it is left out, a default that fits them."""
    limit, budget = settings.max_new_tokens, settings.max_tokens_per_request
    if max_tokens is None:
        return max(1, min(DEFAULT_MAX_TOKENS, limit, budget // choices))
    if max_tokens > limit:
        raise InvalidRequest(f"{param} is at most {limit} on this server.", param=param)
    check_tokens(settings, choices, max_tokens, param=param)
    return max_tokens


def check_tokens(settings: Settings, choices: int, max_tokens: int, *, param: str) -> None:
    budget = settings.max_tokens_per_request
    if choices * max_tokens > budget:
        raise InvalidRequest(
            f"This request may generate {choices} × {max_tokens} = {choices * max_tokens} "
            f"tokens; this server generates at most {budget} per request.",
            param=param,
            code="too_many_tokens",
        )
