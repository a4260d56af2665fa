"""Statistics of one file, gathered row by row while it is validated: the ``stats`` of a file
object. One accumulator per format; ``formats.py`` pairs each with its checker.

``stats`` is shown in every file listing, so it stays small whatever the file holds: label
counts list the STATS_MAX_LABELS most frequent labels (and no more than STATS_MAX_LABEL_BYTES
of their names) beside ``distinct_labels`` and ``label_counts_truncated``. The full label set
is ``DatasetInfo.labels``, from a fresh validation, for the checks that need it."""

from __future__ import annotations

from collections import Counter
from typing import Any

from app.services.datasets.checks import CHAT_ROLES, shown
from app.services.datasets.errors import DatasetError
from app.services.datasets.limits import DatasetLimits

# What a file's stats list of its labels: the most frequent, this many at most...
STATS_MAX_LABELS = 100
# ...and no more than this many bytes of their names (a label may be as long as a row).
STATS_MAX_LABEL_BYTES = 16 * 1024


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

    def __init__(self, limits: DatasetLimits) -> None:
        self.limits = limits
        self.rows = 0

    def add(self, row: dict[str, Any], number: int) -> None:
        self.rows += 1
        self._add(row, number)

    def result(self) -> dict[str, Any]:
        return {"rows": self.rows, **self._result()}

    def labels(self) -> list[str]:
        """Every label of the file, sorted (none for a format without labels)."""
        return []

    def _add(self, row: dict[str, Any], number: int) -> None:
        pass

    def _result(self) -> dict[str, Any]:
        return {}


class LabelCounts:
    """How often each label occurs, and the line where it first does; refuses the label past
    ``limits.max_labels`` at its line."""

    def __init__(self, limits: DatasetLimits) -> None:
        self.limits = limits
        self.counts: Counter[str] = Counter()
        self.first_seen: dict[str, int] = {}

    def add(self, label: str, number: int) -> None:
        most = self.limits.max_labels
        if most is not None and label not in self.counts and len(self.counts) >= most:
            raise ValueError(
                f"label {shown(label)} is one label too many: a file may hold at most {most} "
                "distinct labels (max_dataset_labels)"
            )
        self.counts[label] += 1
        self.first_seen.setdefault(label, number)

    def labels(self) -> list[str]:
        return sorted(self.counts)

    def check(self) -> dict[str, Any]:
        """The stats of the labels; raises when fewer than 2 labels, or a label with fewer
        examples than ``limits.min_examples_per_label`` (at the line it first occurs)."""
        if len(self.counts) < 2:
            only = ", ".join(shown(label) for label in self.counts)
            raise ValueError(
                f"a classifier needs at least 2 distinct labels, found {len(self.counts)} ({only})"
            )
        needed = self.limits.min_examples_per_label
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
        shown_counts = self._most_frequent()
        return {
            "label_counts": dict(sorted(shown_counts.items())),
            "distinct_labels": len(self.counts),
            "label_counts_truncated": len(shown_counts) < len(self.counts),
        }

    def _most_frequent(self) -> dict[str, int]:
        """The most frequent labels (ties in label order) that fit in the stats' bounds."""
        kept: dict[str, int] = {}
        name_bytes = 0
        for label, count in sorted(self.counts.items(), key=lambda item: (-item[1], item[0])):
            name_bytes += len(label.encode("utf-8"))
            if len(kept) == STATS_MAX_LABELS or name_bytes > STATS_MAX_LABEL_BYTES:
                break
            kept[label] = count
        return kept


class ClassificationStats(FormatStats):
    def __init__(self, limits: DatasetLimits) -> None:
        super().__init__(limits)
        self.label_counts = LabelCounts(limits)
        self.text_chars = Summary()

    def _add(self, row: dict[str, Any], number: int) -> None:
        self.label_counts.add(row["label"], number)
        self.text_chars.add(len(row["text"]))

    def _result(self) -> dict[str, Any]:
        return {**self.label_counts.check(), "text_chars": self.text_chars.as_dict()}

    def labels(self) -> list[str]:
        return self.label_counts.labels()


class ChatStats(FormatStats):
    def __init__(self, limits: DatasetLimits) -> None:
        super().__init__(limits)
        self.messages = Summary()
        self.roles: Counter[str] = Counter()
        self.trained_turns = 0
        self.chars = Summary()
        self.tool_calls = 0
        self.rows_with_tools = 0

    def _add(self, row: dict[str, Any], number: int) -> None:
        messages = row["messages"]
        self.messages.add(len(messages))
        self.roles.update(m["role"] for m in messages)
        self.trained_turns += sum(m["role"] == "assistant" and m["weight"] == 1 for m in messages)
        self.chars.add(sum(len(m["content"] or "") for m in messages))
        self.tool_calls += sum(len(m.get("tool_calls") or ()) for m in messages)
        self.rows_with_tools += "tools" in row

    def _result(self) -> dict[str, Any]:
        result: dict[str, Any] = {
            "messages_per_row": self.messages.as_dict(),
            "role_counts": {role: self.roles[role] for role in CHAT_ROLES},
            "trained_assistant_turns": self.trained_turns,
            "text_chars": self.chars.as_dict(),
        }
        if self.rows_with_tools or self.tool_calls:  # tool-calling data (docs/tool-calling.md)
            result["role_counts"]["tool"] = self.roles["tool"]
            result["rows_with_tools"] = self.rows_with_tools
            result["tool_calls"] = self.tool_calls
        return result


class CompletionStats(FormatStats):
    def __init__(self, limits: DatasetLimits) -> None:
        super().__init__(limits)
        self.prompt_chars = Summary()
        self.completion_chars = Summary()

    def _add(self, row: dict[str, Any], number: int) -> None:
        self.prompt_chars.add(len(row["prompt"]))
        self.completion_chars.add(len(row["completion"]))

    def _result(self) -> dict[str, Any]:
        return {
            "prompt_chars": self.prompt_chars.as_dict(),
            "completion_chars": self.completion_chars.as_dict(),
        }


class TextStats(FormatStats):
    def __init__(self, limits: DatasetLimits) -> None:
        super().__init__(limits)
        self.text_chars = Summary()

    def _add(self, row: dict[str, Any], number: int) -> None:
        self.text_chars.add(len(row["text"]))

    def _result(self) -> dict[str, Any]:
        return {"text_chars": self.text_chars.as_dict(), "total_chars": self.text_chars.total}


class TabularStats(FormatStats):
    def __init__(self, limits: DatasetLimits) -> None:
        super().__init__(limits)
        self.features: int | None = None
        self.label_counts = LabelCounts(limits)

    def _add(self, row: dict[str, Any], number: int) -> None:
        size = len(row["features"])
        if self.features is None:
            self.features = size
        elif size != self.features:
            raise ValueError(f"expected {self.features} features as in the first row, got {size}")
        self.label_counts.add(row["label"], number)

    def _result(self) -> dict[str, Any]:
        return {"features": self.features, **self.label_counts.check()}

    def labels(self) -> list[str]:
        return self.label_counts.labels()
