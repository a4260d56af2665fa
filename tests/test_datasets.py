"""Dataset validation (app/services/datasets/): the formats a user uploads, and for every bad
row the line number and, in words, what is wrong with it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.services.datasets import DatasetError, iter_examples, validate_dataset


@pytest.fixture
def write(tmp_path: Path):
    def _write(content: bytes | str, name: str = "data.jsonl") -> Path:
        path = tmp_path / name
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return path

    return _write


def lines(*rows: object) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


GOOD = [
    {"text": "the movie was great", "label": "positive"},
    {"text": "what an awful meal", "label": "negative"},
    {"text": "a lovely hotel", "label": "positive"},
]


BAD_LABEL = "field 'label' must be a string or an integer"


def error_of(path: Path) -> DatasetError:
    with pytest.raises(DatasetError) as info:
        validate_dataset(path)
    return info.value


# ---- files that validate ----------------------------------------------------------------------


def test_jsonl_classification(write) -> None:
    info = validate_dataset(write(lines(*GOOD)))
    assert info.format == "classification"
    assert info.rows == 3
    assert info.stats["rows"] == 3
    assert info.stats["label_counts"] == {"negative": 1, "positive": 2}
    assert info.labels == ["negative", "positive"]
    lengths = [len(r["text"]) for r in GOOD]
    assert info.stats["text_chars"]["min"] == min(lengths)
    assert info.stats["text_chars"]["max"] == max(lengths)


def test_csv_classification(write) -> None:
    content = (
        'text,label\nthe movie was great,positive\n"awful, truly awful",negative\nok,positive\n'
    )
    info = validate_dataset(write(content, "data.csv"))
    assert info.format == "classification"
    assert info.rows == 3
    assert info.stats["label_counts"] == {"negative": 1, "positive": 2}
    rows = list(iter_examples(write(content, "data.csv")))
    assert rows[1] == {"text": "awful, truly awful", "label": "negative"}


def test_tsv_header(write) -> None:
    content = "text\tlabel\na great trip\tpos\na dreadful show, sadly\tneg\n"
    path = write(content, "data.tsv")
    info = validate_dataset(path)
    assert info.format == "classification"
    assert info.rows == 2
    assert info.stats["label_counts"] == {"neg": 1, "pos": 1}
    assert list(iter_examples(path))[1] == {"text": "a dreadful show, sadly", "label": "neg"}


def test_csv_with_quoted_header_and_cells(write) -> None:
    # What pandas (quoting=QUOTE_ALL) and spreadsheet exports write: it is CSV, not JSON.
    content = '"text","label"\n"good, really","pos"\n"bad ""one""","neg"\n'
    path = write(content, "data.csv")
    info = validate_dataset(path)
    assert (info.format, info.rows) == ("classification", 2)
    assert list(iter_examples(path)) == [
        {"text": "good, really", "label": "pos"},
        {"text": 'bad "one"', "label": "neg"},
    ]


def test_csv_with_blank_lines_before_the_header(write) -> None:
    path = write("\n\ntext,label\ngood,pos\nbad,neg,extra\n", "data.csv")
    error = error_of(path)
    assert error.line == 5
    assert "expected 2 columns as in the header, got 3" in str(error)
    assert validate_dataset(write("\ntext,label\ngood,pos\nbad,neg\n", "ok.csv")).rows == 2


def test_csv_header_repeating_a_column(write) -> None:
    error = error_of(write("\ntext,text\na,b\n", "data.csv"))
    assert error.line == 2
    assert "repeats a column name" in str(error)


def test_json_string_line_is_not_an_object(write) -> None:
    error = error_of(write(lines(json.dumps("just a sentence"), *GOOD)))
    assert error.line == 1
    assert "expected a JSON object, got a string" in str(error)


def test_integer_labels_become_strings(write) -> None:
    path = write(lines({"text": "good", "label": 1}, {"text": "bad", "label": 0}))
    info = validate_dataset(path)
    assert info.stats["label_counts"] == {"0": 1, "1": 1}
    assert list(iter_examples(path)) == [
        {"text": "good", "label": "1"},
        {"text": "bad", "label": "0"},
    ]


def test_crlf_line_endings(write) -> None:
    jsonl_path = write(lines(*GOOD).replace("\n", "\r\n"))
    assert validate_dataset(jsonl_path).rows == 3
    assert [r["label"] for r in iter_examples(jsonl_path)] == ["positive", "negative", "positive"]
    csv_path = write("text,label\r\ngood one,pos\r\nbad one,neg\r\n", "data.csv")
    assert validate_dataset(csv_path).stats["label_counts"] == {"neg": 1, "pos": 1}
    # No carriage return survives in a label or a text.
    assert list(iter_examples(csv_path)) == [
        {"text": "good one", "label": "pos"},
        {"text": "bad one", "label": "neg"},
    ]


def test_blank_lines_are_skipped(write) -> None:
    content = "\n" + lines(GOOD[0]) + "\n   \n" + lines(GOOD[1]) + "\n\n"
    assert validate_dataset(write(content)).rows == 2
    csv_content = "text,label\n\ngood,pos\n\nbad,neg\n\n"
    assert validate_dataset(write(csv_content, "data.csv")).rows == 2


def test_utf8_bom_is_accepted(write) -> None:
    assert validate_dataset(write(b"\xef\xbb\xbf" + lines(*GOOD).encode())).rows == 3


def test_iter_examples_yields_normalised_rows(write) -> None:
    path = write(lines({"text": "café au lait", "label": 7}, "", {"text": "x", "label": "b"}))
    assert list(iter_examples(path)) == [
        {"text": "café au lait", "label": "7"},
        {"text": "x", "label": "b"},
    ]


# ---- files that do not --------------------------------------------------------------------------


def test_not_json(write) -> None:
    error = error_of(write(lines(*GOOD, '{"text": "oops", "label": "a"')))
    assert error.line == 4
    assert "line 4" in str(error)
    assert "not valid JSON" in str(error)


def test_array_line_is_not_an_object(write) -> None:
    error = error_of(write(lines(GOOD[0], ["text", "label"], GOOD[1])))
    assert error.line == 2
    assert "expected a JSON object, got an array" in str(error)


def test_array_on_first_line(write) -> None:
    error = error_of(write(lines(["a", "b"], *GOOD)))
    assert error.line == 1
    assert "an array" in str(error)


@pytest.mark.parametrize(
    ("row", "words"),
    [
        ({"label": "positive"}, "missing required field 'text'"),
        ({"text": "fine"}, "missing required field 'label'"),
        ({"text": "fine", "label": "a", "extra": 1}, "unknown field 'extra'"),
        ({"text": 42, "label": "a"}, "field 'text' must be a string, got a number"),
        ({"text": ["a"], "label": "a"}, "field 'text' must be a string, got an array"),
        ({"text": "   ", "label": "a"}, "field 'text' is empty"),
        ({"text": "", "label": "a"}, "field 'text' is empty"),
        ({"text": "fine", "label": True}, f"{BAD_LABEL}, got a boolean"),
        ({"text": "fine", "label": 1.5}, f"{BAD_LABEL}, got a number"),
        ({"text": "fine", "label": None}, f"{BAD_LABEL}, got null"),
        ({"text": "fine", "label": ""}, "field 'label' is empty"),
    ],
)  # fmt: skip
def test_bad_row_names_line_and_reason(write, row: dict[str, object], words: str) -> None:
    error = error_of(write(lines(*GOOD, "", row, GOOD[0])))
    assert error.line == 5  # blank line 4 still counts
    assert str(error).startswith(f"line 5: {words}")
    assert error.reason.startswith(words)


def test_csv_row_with_wrong_number_of_columns(write) -> None:
    content = "text,label\ngood,pos\nbad,neg,extra\nfine,pos\n"
    error = error_of(write(content, "data.csv"))
    assert error.line == 3
    assert "expected 2 columns as in the header, got 3" in str(error)
    short = error_of(write("text,label\ngood,pos\nbad,neg\nlonely\n", "data.csv"))
    assert short.line == 4
    assert "got 1" in str(short)


def test_csv_without_label_column(write) -> None:
    error = error_of(write("text,category\ngood,pos\nbad,neg\n", "data.csv"))
    assert error.line == 2
    assert "label" in str(error)


def test_invalid_utf8(write) -> None:
    content = lines(*GOOD).encode() + b'{"text": "caf\xe9", "label": "a"}\n'
    error = error_of(write(content))
    assert error.line == 4
    assert "not valid UTF-8" in str(error)
    first = error_of(write(b'\xff{"text": "a", "label": "b"}\n'))
    assert first.line == 1
    assert "UTF-8" in str(first)


@pytest.mark.parametrize("content", [b"", b"\n\n  \n", b"\r\n"])
def test_empty_file(write, content: bytes) -> None:
    error = error_of(write(content))
    assert "empty" in str(error)


def test_csv_with_only_a_header_has_no_rows(write) -> None:
    error = error_of(write("text,label\n", "data.csv"))
    assert "no rows" in str(error)


def test_only_one_distinct_label(write) -> None:
    rows = [{"text": f"sentence {i}", "label": "positive"} for i in range(5)]
    error = error_of(write(lines(*rows)))
    assert "at least 2 distinct labels" in str(error)
    assert "'positive'" in str(error)
