"""Datasets that answered 500 or cost too much (issue 9, A10), uploaded as a user would: each
gets a 400 in OpenAI's error envelope naming the line, and nothing is stored."""

from __future__ import annotations

import json

import pytest

from tests.support import jsonl, sentiment_rows
from tests.test_bad_input import assert_error, changes_nothing
from tests.test_files_api import upload

GOOD = {"text": "the film was great", "label": "positive"}
OTHER = {"text": "the film was awful", "label": "negative"}


def refused(api, content: bytes, name: str, words: str) -> str:
    """Upload ``content`` as ``name``; assert a 400 naming the file and ``words``, with nothing
    stored; return the message."""
    with changes_nothing(api):
        response = upload(api, content, name)
        error = assert_error(response, 400, param="file", words=words)
    assert error["code"] == "invalid_file"
    assert error["type"] == "invalid_request_error"
    message = str(error["message"])
    assert message.startswith(f"Invalid file '{name}': "), message
    assert len(message) < 500, message  # it quotes the user's value, never the line
    return message


def good_lines(*rows: object) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


# ---- JSON the json module cannot read ----------------------------------------------------------

DEEP = 100_000


@pytest.mark.parametrize(
    "line",
    [
        "[" * DEEP + "]" * DEEP,
        '{"a": ' * DEEP + "1" + "}" * DEEP,
        '{"text": "x", "label": ' + "[" * DEEP + "]" * DEEP + "}",
        # Not even closed: still refused by its depth, not by a RecursionError.
        "[" * DEEP,
    ],
    ids=["arrays", "objects", "inside-a-row", "unclosed"],
)
def test_a_deeply_nested_line_is_refused_by_its_line(api, line: str) -> None:
    content = good_lines(GOOD, OTHER) + line.encode() + b"\n" + good_lines(GOOD)
    message = refused(api, content, "train.jsonl", "line 3: the JSON nests deeper than 64 levels")
    assert "64" in message


def test_nesting_within_the_depth_limit_is_read_as_json(api) -> None:
    """Sixty levels are JSON like any other: the row is refused for its shape, not its depth;
    brackets inside strings do not count."""
    content = good_lines(GOOD, {"text": "[" * 5000, "label": "x"}) + (
        b'{"text": "x", "label": ' + b"[" * 60 + b"]" * 60 + b"}\n"
    )
    refused(api, content, "train.jsonl", "line 3: field 'label' must be a string or an integer")


def test_a_deeply_nested_first_line_of_a_text_file(api) -> None:
    """A .txt whose first line looks like JSON is asked whether it is JSONL: that question
    must not fail either. Plain text it is, and its one paragraph is a fine row."""
    content = ("[" * DEEP).encode() + b"\n\nsecond paragraph\n"
    response = upload(api, content, "notes.txt", content_type="text/plain")
    assert response.status_code == 200, response.text
    assert (response.json()["format"], response.json()["stats"]["rows"]) == ("text", 2)


def test_an_integer_of_4301_digits_is_refused_by_its_line(api) -> None:
    huge = "7" * 4301
    content = good_lines(GOOD, OTHER, GOOD) + f'{{"text": "x", "label": {huge}}}\n'.encode()
    message = refused(api, content, "train.jsonl", "line 4: a number has more than 4300 digits")
    assert huge not in message


def test_an_integer_within_the_limit_is_a_label(api) -> None:
    content = good_lines(GOOD, OTHER, {"text": "x", "label": int("7" * 4300)})
    response = upload(api, content, "train.jsonl")
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("cell", "words"),
    [
        ("[" + "7" * 4301 + "]", "line 3: a number has more than 4300 digits"),
        ("[" * DEEP + "]" * DEEP, "line 3: the JSON nests deeper than 64 levels"),
    ],
    ids=["huge-integer", "deep"],
)
def test_a_csv_features_cell_is_read_the_same_way(api, cell: str, words: str) -> None:
    content = f'features,label\n"[1, 2]",a\n"{cell}",b\n"[3, 4]",a\n'.encode()
    refused(api, content, "train.csv", words)


def test_a_csv_number_cell_of_4301_digits_is_a_number_too_large(api) -> None:
    """float() reads any number of digits: the cell is refused as not finite, and the message
    does not quote all of it."""
    content = f"f0,f1,label\n1,2,a\n3,{'9' * 4301},b\n".encode()
    refused(api, content, "train.csv", "line 3: column 'f1' must be a finite number, got inf")


# ---- plain text: a paragraph is a row ----------------------------------------------------------


def test_a_text_file_without_blank_lines_is_not_one_huge_row(api) -> None:
    """3 MB of text with no blank line after a first paragraph: the second paragraph passes
    the row limit (1 MiB, max_dataset_line_bytes) and is refused at the line it starts on."""
    assert api.settings.max_dataset_line_bytes == 1024 * 1024
    line = ("all work and no play makes a dull model " * 2).strip() + "\n"
    content = b"a first short paragraph\nof two lines\n\n" + line.encode() * 40_000
    assert len(content) > 3_000_000
    message = refused(api, content, "book.txt", "line 4: the paragraph starting at this line")
    assert "longer than 1048576 bytes" in message
    assert "max_dataset_line_bytes" in message


def test_paragraphs_within_the_limit_are_rows(api) -> None:
    line = "x" * 999 + "\n"
    paragraph = line.encode() * 1000  # 1,000,000 bytes with its newlines: under 1 MiB
    content = paragraph + b"\n" + paragraph
    response = upload(api, content, "book.txt", content_type="text/plain")
    assert response.status_code == 200, response.text
    assert response.json()["stats"]["rows"] == 2
    assert response.json()["stats"]["text_chars"]["max"] == 999_999


def test_a_jsonl_of_sentiment_rows_is_untouched(api) -> None:
    response = upload(
        api, jsonl(sentiment_rows(20, seed=3)), "t.jsonl", content_type="application/json"
    )
    assert response.status_code == 200, response.text


def test_a_csv_row_spanning_lines_keeps_to_the_row_limit(api) -> None:
    """A quoted cell may span lines; the row it makes is refused past the row limit, at the
    line it starts on (a quote left open used to take up to 16 MiB into one row)."""
    long_cell = "\n".join(["a line of a very long review"] * 80_000)  # ~2.3 MB
    content = f'text,label\n"fine",a\n"{long_cell}",b\n"also fine",a\n'.encode()
    message = refused(api, content, "train.csv", "line 3: the row starting at this line")
    assert "longer than 1048576 bytes" in message


def test_a_csv_row_spanning_a_few_lines_is_fine(api) -> None:
    content = b'text,label\n"two\nlines",a\n"one line",b\n'
    response = upload(api, content, "train.csv", content_type="text/csv")
    assert response.status_code == 200, response.text
    assert response.json()["stats"]["rows"] == 2


# ---- labels: a file object stays small ---------------------------------------------------------


def labelled(labels: list[str]) -> bytes:
    return jsonl({"text": f"example {i}", "label": label} for i, label in enumerate(labels))


def test_stats_list_the_most_frequent_labels_and_count_the_rest(api) -> None:
    """5,000 distinct labels: the file object lists 100 of them (the most frequent) with the
    number of distinct labels, and stays a few kilobytes in the listing too."""
    labels = [f"label-{i:04d}" for i in range(5000)] + ["label-4999"] * 3 + ["label-2500"] * 2
    response = upload(api, labelled(labels), "train.jsonl")
    assert response.status_code == 200, response.text
    assert len(response.content) < 8 * 1024, len(response.content)
    stats = response.json()["stats"]
    assert (stats["rows"], stats["distinct_labels"], stats["label_counts_truncated"]) == (
        5005,
        5000,
        True,
    )
    counts = stats["label_counts"]
    assert len(counts) == 100
    # The most frequent first, then ties in label order.
    assert counts["label-4999"] == 4 and counts["label-2500"] == 3
    assert list(counts) == sorted(counts)
    assert set(counts) == {"label-4999", "label-2500"} | {f"label-{i:04d}" for i in range(98)}
    listing = api.client.get("/v1/files", headers=api.headers())
    assert len(listing.content) < 8 * 1024
    assert listing.json()["data"][0]["stats"] == stats


def test_long_labels_are_listed_within_a_byte_budget(api) -> None:
    labels = [f"{i:03d}" + "x" * 2000 for i in range(40)]
    response = upload(api, labelled(labels), "train.jsonl")
    assert response.status_code == 200, response.text
    stats = response.json()["stats"]
    assert (stats["distinct_labels"], stats["label_counts_truncated"]) == (40, True)
    assert len(stats["label_counts"]) == 8  # 8 names of 2,003 bytes fit in 16 KiB
    assert len(response.content) < 20 * 1024


def test_few_labels_are_all_listed(api) -> None:
    response = upload(api, labelled(["a", "b", "b", "c"]), "t.jsonl")
    assert response.status_code == 200, response.text
    stats = response.json()["stats"]
    assert stats["label_counts"] == {"a": 1, "b": 2, "c": 1}
    assert (stats["distinct_labels"], stats["label_counts_truncated"]) == (3, False)


def test_300k_distinct_labels_are_refused_at_the_label_past_the_limit(api) -> None:
    """The issue's file: 300,000 distinct labels put 4.5 MB of stats into every listing. A
    file may hold max_dataset_labels (10,000) distinct labels: the next is refused at its
    line."""
    content = labelled([f"l{i}" for i in range(300_000)])
    refused(
        api,
        content,
        "train.jsonl",
        "line 10001: label 'l10000' is one label too many: a file may hold at most 10000 "
        "distinct labels (max_dataset_labels)",
    )


def test_the_label_limit_applies_to_tabular_files(api, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [{"features": [i, i + 1], "label": i % 7} for i in range(20)]
    content = jsonl(rows)
    from app.core.settings import Settings
    from app.services.datasets import DatasetLimits, validate_dataset

    monkeypatch.setenv("TUNEHOUSE_MAX_DATASET_LABELS", "5")
    limits = DatasetLimits.from_settings(Settings(_env_file=None))
    assert limits.max_labels == 5
    path = api.settings.data_dir / "tabular.jsonl"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"^line 6: label '5' is one label too many"):
        validate_dataset(path, limits=limits)


def test_a_job_checks_validation_labels_against_every_training_label(api) -> None:
    """The stats list 100 labels, but the job's check compares the full sets (read afresh):
    a validation label past the first 100 is known; one the training file lacks fails the
    job."""
    from tests.test_jobs_api import create, retrieve

    def uploaded(labels: list[str]) -> str:
        response = upload(api, labelled(labels), "t.jsonl")
        assert response.status_code == 200, response.text
        return str(response.json()["id"])

    training = uploaded([f"label-{i:03d}" for i in range(150)] * 2)
    late = uploaded(["label-120", "label-149"])
    unseen = uploaded(["label-120", "label-150"])
    fine = retrieve(api, create(api, training, validation_file=late).json()["id"])
    assert fine["status"] == "queued", fine
    failed = retrieve(api, create(api, training, validation_file=unseen).json()["id"])
    assert failed["status"] == "failed"
    assert failed["error"]["code"] == "invalid_validation_file"
    assert "['label-150']" in failed["error"]["message"]
