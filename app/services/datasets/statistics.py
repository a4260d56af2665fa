"""Statistics of one file, gathered row by row while it is validated: the ``stats`` of a file
object. One accumulator per format; ``formats.py`` pairs each with its checker."""

from __future__ import annotations

from collections import Counter
from typing import Any

from app.services.datasets.checks import CHAT_ROLES, shown
from app.services.datasets.errors import DatasetError
from app.services.datasets.limits import DatasetLimits


class Summary:
    """Min, mean and max of a series seen one value at a time."""

    def __init__(self) -> None:
        self.count = 0
        self.total = 0
        self.low: int | None = None
        self.high: int | None = None

    def add(self, value: int) -> None:
        self.count += 1
        self.total += value
        self.low = value if self.low is None else min(self.low, value)
        self.high = value if self.high is None else max(self.high, value)

    def as_dict(self) -> dict[str, Any]:
        mean = round(self.total / self.count, 1) if self.count else 0.0
        return {"min": self.low or 0, "mean": mean, "max": self.high or 0}


class FormatStats:
    """Statistics of one file, fed its normalised rows in order with their line (or row)
    numbers. ``add`` may raise ValueError for a row that disagrees with earlier ones (reported
    at that row); ``result`` may raise ValueError for a problem of the whole file, or
    DatasetError for one it can place at a line."""

    def __init__(self) -> None:
        self.rows = 0

    def add(self, row: dict[str, Any], number: int) -> None:
        self.rows += 1
        self._add(row, number)

    def result(self, limits: DatasetLimits) -> dict[str, Any]:
        return {"rows": self.rows, **self._result(limits)}

    def _add(self, row: dict[str, Any], number: int) -> None:
        pass

    def _result(self, limits: DatasetLimits) -> dict[str, Any]:
        return {}


class LabelCounts:
    """How often each label occurs, and the line where it first does."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.first_seen: dict[str, int] = {}

    def add(self, label: str, number: int) -> None:
        self.counts[label] += 1
        self.first_seen.setdefault(label, number)

    def check(self, limits: DatasetLimits) -> dict[str, int]:
        """The counts, sorted by label; raises when fewer than 2 labels, or a label with fewer
        examples than ``limits.min_examples_per_label`` (at the line it first occurs)."""
        if len(self.counts) < 2:
            only = ", ".join(shown(label) for label in self.counts)
            raise ValueError(
                f"a classifier needs at least 2 distinct labels, found {len(self.counts)} ({only})"
            )
        needed = limits.min_examples_per_label
        rare = [label for label, count in self.counts.items() if count < needed]
        if rare:
            label = min(rare, key=self.first_seen.__getitem__)
            count = self.counts[label]
            seen = "only once" if count == 1 else f"only {count} times"
            raise DatasetError(
                f"label {shown(label)} is seen {seen} in the file; each label needs at least "
                f"{needed} examples (min_examples_per_label)",
                self.first_seen[label],
            )
        return dict(sorted(self.counts.items()))


class ClassificationStats(FormatStats):
    def __init__(self) -> None:
        super().__init__()
        self.labels = LabelCounts()
        self.text_chars = Summary()

    def _add(self, row: dict[str, Any], number: int) -> None:
        self.labels.add(row["label"], number)
        self.text_chars.add(len(row["text"]))

    def _result(self, limits: DatasetLimits) -> dict[str, Any]:
        return {
            "label_counts": self.labels.check(limits),
            "text_chars": self.text_chars.as_dict(),
        }


class ChatStats(FormatStats):
    def __init__(self) -> None:
        super().__init__()
        self.messages = Summary()
        self.roles: Counter[str] = Counter()
        self.trained_turns = 0
        self.chars = Summary()

    def _add(self, row: dict[str, Any], number: int) -> None:
        messages = row["messages"]
        self.messages.add(len(messages))
        self.roles.update(m["role"] for m in messages)
        self.trained_turns += sum(m["role"] == "assistant" and m["weight"] == 1 for m in messages)
        self.chars.add(sum(len(m["content"]) for m in messages))

    def _result(self, limits: DatasetLimits) -> dict[str, Any]:
        return {
            "messages_per_row": self.messages.as_dict(),
            "role_counts": {role: self.roles[role] for role in CHAT_ROLES},
            "trained_assistant_turns": self.trained_turns,
            "text_chars": self.chars.as_dict(),
        }


class CompletionStats(FormatStats):
    def __init__(self) -> None:
        super().__init__()
        self.prompt_chars = Summary()
        self.completion_chars = Summary()

    def _add(self, row: dict[str, Any], number: int) -> None:
        self.prompt_chars.add(len(row["prompt"]))
        self.completion_chars.add(len(row["completion"]))

    def _result(self, limits: DatasetLimits) -> dict[str, Any]:
        return {
            "prompt_chars": self.prompt_chars.as_dict(),
            "completion_chars": self.completion_chars.as_dict(),
        }


class TextStats(FormatStats):
    def __init__(self) -> None:
        super().__init__()
        self.text_chars = Summary()

    def _add(self, row: dict[str, Any], number: int) -> None:
        self.text_chars.add(len(row["text"]))

    def _result(self, limits: DatasetLimits) -> dict[str, Any]:
        return {"text_chars": self.text_chars.as_dict(), "total_chars": self.text_chars.total}


class TabularStats(FormatStats):
    def __init__(self) -> None:
        super().__init__()
        self.features: int | None = None
        self.labels = LabelCounts()

    def _add(self, row: dict[str, Any], number: int) -> None:
        size = len(row["features"])
        if self.features is None:
            self.features = size
        elif size != self.features:
            raise ValueError(f"expected {self.features} features as in the first row, got {size}")
        self.labels.add(row["label"], number)

    def _result(self, limits: DatasetLimits) -> dict[str, Any]:
        return {"features": self.features, "label_counts": self.labels.check(limits)}
