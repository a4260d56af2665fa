"""Cursor pagination the way the SDK pages: ``after=<id of the last item>``, ``has_more``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

from sqlalchemy import Select, tuple_
from sqlalchemy.orm import InstrumentedAttribute, Session

T = TypeVar("T")


def page(
    session: Session,
    stmt: Select[Any],
    *,
    sort: InstrumentedAttribute[Any],
    tiebreak: InstrumentedAttribute[Any],
    after: Any | None,
    limit: int,
    descending: bool = True,
) -> tuple[Sequence[Any], bool]:
    """Rows after the cursor row ``after`` (an ORM object or None), and whether more follow."""
    if after is not None:
        # One row-value comparison, (sort, tiebreak) < (the cursor's): an index on
        # (..., sort, tiebreak) starts the page at the cursor instead of filtering every row
        # before it, as "sort < key OR (sort = key AND tiebreak < tie)" would.
        row = tuple_(sort, tiebreak)
        cursor = (getattr(after, sort.key), getattr(after, tiebreak.key))  # bound as the columns
        stmt = stmt.where(row < cursor if descending else row > cursor)
    order = (sort.desc(), tiebreak.desc()) if descending else (sort.asc(), tiebreak.asc())
    rows = session.scalars(stmt.order_by(*order).limit(limit + 1)).all()
    return rows[:limit], len(rows) > limit
