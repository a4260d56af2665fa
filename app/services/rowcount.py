"""How many rows a conditional UPDATE matched, the answer every state change turns on."""

from __future__ import annotations

from typing import Any

from sqlalchemy import CursorResult, Result


def rowcount(result: Result[Any]) -> int:
    """``Session.execute`` is typed to return a plain ``Result``, but an UPDATE always comes back
    as the ``CursorResult`` that carries ``rowcount``."""
    assert isinstance(result, CursorResult)
    return result.rowcount
