"""Cursor pagination the way the SDK pages: ``after=<id of the last item>``, ``has_more``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

from sqlalchemy import Select, and_, or_
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
        key, tie = getattr(after, sort.key), getattr(after, tiebreak.key)
        if descending:
            stmt = stmt.where(or_(sort < key, and_(sort == key, tiebreak < tie)))
        else:
            stmt = stmt.where(or_(sort > key, and_(sort == key, tiebreak > tie)))
    order = (sort.desc(), tiebreak.desc()) if descending else (sort.asc(), tiebreak.asc())
    rows = session.scalars(stmt.order_by(*order).limit(limit + 1)).all()
    return rows[:limit], len(rows) > limit
