"""Dataset formats beyond classification (app/services/datasets/): chat, completion, text
(JSONL rows or a plain .txt file) and tabular (JSONL, CSV, Parquet). Each bad row is refused with
its line (or Parquet row) number and, in words, what is wrong; an upload that fails stores
nothing."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

from app.services.datasets import DatasetError, iter_examples, validate_dataset
from tests.test_bad_input import assert_error, changes_nothing


def lines(*rows: object) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def chat(*turns: tuple[str, str], **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": role, "content": content} for role, content in turns], **extra}


CHAT = [
    chat(("system", "be brief"), ("user", "capital of France?"), ("assistant", "Paris")),
    chat(("user", "2+2?"), ("assistant", "4")),
]
COMPLETION = [{"prompt": "Q: 2+2?\nA:", "completion": " 4"}, {"prompt": "", "completion": "hi"}]
TABULAR = [
    {"features": [0.5, 1, -2], "label": "a"},
    {"features": [1.5, 0, 2e3], "label": "b"},
    {"features": [0, 0, 0], "label": "a"},
]


@pytest.fixture
def write(tmp_path: Path):
    def _write(content: bytes | str, name: str = "data.jsonl") -> Path:
        path = tmp_path / name
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return path

    return _write


def error_of(path: Path, **kwargs: Any) -> DatasetError:
    with pytest.raises(DatasetError) as info:
        validate_dataset(path, **kwargs)
    return info.value


def upload(api, content: bytes, name: str = "train.jsonl"):
    return api.client.post(
        "/v1/files",
        headers=api.headers(),
        files={"file": (name, content, "application/octet-stream")},
        data={"purpose": "fine-tune"},
    )


def parquet_bytes(columns: dict[str, list[Any]]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = io.BytesIO()
    pq.write_table(pa.table(columns), sink)
    return sink.getvalue()


# ---- chat: every error class, through the upload route ------------------------------------------

USER = {"role": "user", "content": "hi"}
ASSISTANT = {"role": "assistant", "content": "hello"}


def msgs(*messages: Any) -> dict[str, Any]:
    return {"messages": list(messages)}


def said(**fields: Any) -> dict[str, Any]:
    """An assistant message with some fields replaced (None removes one)."""
    message = {**ASSISTANT, **fields}
    return {k: v for k, v in message.items() if v is not None}


@pytest.mark.parametrize(
    ("row", "words"),
    [
        ([USER, ASSISTANT], "expected a JSON object, got an array"),
        ('"just text"', "expected a JSON object, got a string"),
        ({}, "missing required field 'messages'"),
        ({"conversation": [USER, ASSISTANT]}, "missing required field 'messages'"),
        ({"messages": "hi"}, "field 'messages' must be an array, got a string"),
        (msgs(), "field 'messages' is empty"),
        (msgs("hi", ASSISTANT), "messages[0] must be an object, got a string"),
        (msgs({"content": "hi"}, ASSISTANT), "messages[0]: missing required field 'role'"),
        (msgs(USER, {"role": "assistant"}), "messages[1]: missing required field 'content'"),
        ({**msgs(USER, ASSISTANT), "id": 7}, "unknown field 'id'"),
        (msgs({**USER, "name": "bob"}, ASSISTANT), "messages[0]: unknown field 'name'"),
        (msgs({**USER, "role": "robot"}, ASSISTANT), "messages[0]: unknown role 'robot'"),
        (
            msgs({**USER, "role": "tool"}, ASSISTANT),
            "messages[0]: missing required field 'tool_call_id'",
        ),
        (msgs({**USER, "role": 1}, ASSISTANT), "messages[0]: unknown role a number"),
        (
            msgs(USER, said(content=42)),
            "messages[1]: field 'content' must be a string, got a number",
        ),
        (msgs(USER, {**ASSISTANT, "content": None}), "field 'content' must be a string, got null"),
        (msgs(USER, said(weight=2)), "messages[1]: field 'weight' must be 0 or 1, got 2"),
        (msgs(USER, said(weight=True)), "field 'weight' must be 0 or 1, got True"),
        (msgs(USER, said(weight="1")), "field 'weight' must be 0 or 1, got '1'"),
        (msgs(USER), "no assistant message"),
        (msgs(USER, said(weight=0)), "every assistant message has weight 0"),
        ({"prompt": "a", "completion": "b"}, "a completion row in a file of chat rows"),
        ({"text": "a", "label": "b"}, "a classification row in a file of chat rows"),
    ],
)
def test_bad_chat_row_is_refused_with_line_and_nothing_stored(api, row: Any, words: str) -> None:
    content = lines(*CHAT, "", row, CHAT[0]).encode()
    with changes_nothing(api):
        error = assert_error(upload(api, content), 400, param="file", words=words)
        assert "line 4: " in error["message"]  # blank line 3 still counts
        assert error["code"] == "invalid_file"


def test_bad_first_chat_row(write) -> None:
    error = error_of(write(lines({"messages": [USER]}, *CHAT)))
    assert (error.line, error.reason) == (
        1,
        "no assistant message: a chat row needs one to learn from",
    )


def test_first_row_of_no_known_format(write) -> None:
    error = error_of(write(lines({"question": "a", "answer": "b"})))
    assert error.line == 1
    assert "cannot tell the format" in str(error)
    assert "'messages'" in str(error) and "'features'" in str(error)


# ---- chat: files that validate -----------------------------------------------------------------


def test_chat_file_is_accepted_with_stats(api) -> None:
    weighted = {"messages": [USER, {**ASSISTANT, "weight": 0}, USER, {**ASSISTANT, "weight": 1}]}
    response = upload(api, lines(*CHAT, weighted).encode())
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["format"] == "chat"
    stats = body["stats"]
    assert stats["rows"] == 3
    assert stats["messages_per_row"] == {"min": 2, "mean": 3.0, "max": 4}
    assert stats["role_counts"] == {"system": 1, "user": 4, "assistant": 4}
    assert stats["trained_assistant_turns"] == 3
    assert stats["text_chars"]["max"] >= stats["text_chars"]["min"] > 0


def test_chat_rows_are_normalised_with_default_weight(write) -> None:
    row = {"messages": [USER, {**ASSISTANT, "weight": 0}, {"role": "assistant", "content": "!"}]}
    path = write(lines(row, CHAT[1]))
    assert list(iter_examples(path, fmt="chat"))[0] == {
        "messages": [
            {"role": "user", "content": "hi", "weight": 1},
            {"role": "assistant", "content": "hello", "weight": 0},
            {"role": "assistant", "content": "!", "weight": 1},
        ]
    }
    assert list(iter_examples(path)) == list(iter_examples(path, fmt="chat"))


def test_iter_examples_refuses_rows_of_another_stored_format(write) -> None:
    path = write(lines(*COMPLETION))
    with pytest.raises(DatasetError) as info:
        list(iter_examples(path, fmt="chat"))
    assert info.value.line == 1
    assert "a completion row in a file of chat rows" in str(info.value)


# ---- completion ---------------------------------------------------------------------------------


def test_completion_file(write) -> None:
    path = write(lines(*COMPLETION))
    info = validate_dataset(path)
    assert (info.format, info.rows) == ("completion", 2)
    assert info.stats["prompt_chars"] == {"min": 0, "mean": 5.0, "max": 10}
    assert info.stats["completion_chars"] == {"min": 2, "mean": 2.0, "max": 2}
    assert list(iter_examples(path, fmt="completion")) == COMPLETION


@pytest.mark.parametrize(
    ("row", "words"),
    [
        ({"prompt": "a"}, "missing required field 'completion'"),
        ({"completion": "a"}, "missing required field 'prompt'"),
        ({"prompt": "a", "completion": ""}, "field 'completion' is empty"),
        ({"prompt": "a", "completion": "  "}, "field 'completion' is empty"),
        ({"prompt": 1, "completion": "b"}, "field 'prompt' must be a string, got a number"),
        ({"prompt": "a", "completion": ["b"]}, "field 'completion' must be a string, got an array"),
        ({"prompt": "a", "completion": "b", "weight": 1}, "unknown field 'weight'"),
        ({"messages": [USER, ASSISTANT]}, "a chat row in a file of completion rows"),
    ],
)  # fmt: skip
def test_bad_completion_row(write, row: dict[str, Any], words: str) -> None:
    error = error_of(write(lines(*COMPLETION, row)))
    assert error.line == 3
    assert str(error).startswith(f"line 3: {words}")


# ---- text ---------------------------------------------------------------------------------------


def test_text_rows_and_text_label_rows_stay_apart(write) -> None:
    info = validate_dataset(write(lines({"text": "once upon a time"}, {"text": "the end"})))
    assert (info.format, info.rows) == ("text", 2)
    assert info.stats["text_chars"] == {"min": 7, "mean": 11.5, "max": 16}
    assert info.stats["total_chars"] == 23
    labelled = validate_dataset(
        write(lines({"text": "a", "label": "x"}, {"text": "b", "label": "y"}))
    )
    assert labelled.format == "classification"


@pytest.mark.parametrize(
    ("row", "words"),
    [
        ({"text": 5}, "field 'text' must be a string, got a number"),
        ({"text": " "}, "field 'text' is empty"),
        ({"text": "a", "label": "x"}, "a classification row in a file of text rows"),
        ({"text": "a", "source": "web"}, "unknown field 'source'"),
    ],
)
def test_bad_text_row(write, row: dict[str, Any], words: str) -> None:
    error = error_of(write(lines({"text": "fine"}, row)))
    assert error.line == 2
    assert words in str(error)


SHAKESPEARE = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\n\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n"
)


def test_plain_text_upload_is_one_row_per_paragraph(api, tmp_path: Path) -> None:
    response = upload(api, SHAKESPEARE.encode(), name="input.TXT")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["format"] == "text"
    assert body["filename"] == "input.TXT"
    assert body["stats"]["rows"] == 3
    # The stored bytes are the upload's, under a server-generated name; read back with the
    # stored format, they are the paragraphs.
    stored = api.client.get(f"/v1/files/{body['id']}/content", headers=api.headers()).content
    path = tmp_path / "stored"
    path.write_bytes(stored)
    assert list(iter_examples(path, fmt="text")) == [
        {"text": "First Citizen:\nBefore we proceed any further, hear me speak."},
        {"text": "All:\nSpeak, speak."},
        {"text": "First Citizen:\nYou are all resolved rather to die than to famish?"},
    ]
    assert validate_dataset(path, fmt="text").rows == 3


def test_txt_holding_jsonl_is_read_as_jsonl(write) -> None:
    path = write(lines({"text": "a"}, {"text": "b"}), "rows.txt")
    info = validate_dataset(path, filename_hint="rows.txt")
    assert (info.format, info.rows) == ("text", 2)
    assert list(iter_examples(path, fmt="text")) == [{"text": "a"}, {"text": "b"}]


def test_plain_text_invalid_utf8_names_the_line(api) -> None:
    content = b"fine paragraph\n\nanother\ncaf\xe9 au lait\n"
    with changes_nothing(api):
        assert_error(upload(api, content, name="corpus.txt"), 400, param="file", words="line 4")
        assert_error(upload(api, content, name="corpus.txt"), 400, words="not valid UTF-8")


def test_empty_plain_text(write) -> None:
    assert "empty" in str(error_of(write("\n\n  \n", "a.txt"), filename_hint="a.txt"))


# ---- tabular ------------------------------------------------------------------------------------


def test_tabular_jsonl(write) -> None:
    path = write(lines(*TABULAR, {"features": [1, 2, 3], "label": 7}))
    info = validate_dataset(path)
    assert info.format == "tabular"
    assert info.stats == {
        "rows": 4,
        "features": 3,
        "label_counts": {"7": 1, "a": 2, "b": 1},
        "distinct_labels": 3,
        "label_counts_truncated": False,
    }
    assert info.labels == ["7", "a", "b"]
    rows = list(iter_examples(path, fmt="tabular"))
    assert rows[0] == {"features": [0.5, 1.0, -2.0], "label": "a"}
    assert rows[-1]["label"] == "7"
    assert all(isinstance(v, float) for row in rows for v in row["features"])


@pytest.mark.parametrize(
    ("row", "words"),
    [
        ({"features": "1,2,3", "label": "a"}, "field 'features' must be an array of numbers"),
        ({"features": [], "label": "a"}, "field 'features' is empty"),
        ({"features": [1, True, 3], "label": "a"}, "features[1] must be a number, got a boolean"),
        ({"features": [1, "2", 3], "label": "a"}, "features[1] must be a number, got a string"),
        ({"features": [1, None, 3], "label": "a"}, "features[1] must be a number, got null"),
        ('{"features": [1, 2, NaN], "label": "a"}', "features[2] must be a finite number, got nan"),
        ('{"features": [Infinity, 2, 3], "label": "a"}', "features[0] must be a finite number"),
        ('{"features": [1e999, 2, 3], "label": "a"}', "features[0] must be a finite number"),
        ({"features": [1, 2], "label": "a"}, "expected 3 features as in the first row, got 2"),
        ({"features": [1, 2, 3], "label": 1.5}, "field 'label' must be a string or an integer"),
        ({"features": [1, 2, 3], "label": ""}, "field 'label' is empty"),
        ({"features": [1, 2, 3]}, "missing required field 'label'"),
        ({"features": [1, 2, 3], "label": "a", "id": 3}, "unknown field 'id'"),
        ({"text": "a", "label": "b"}, "a classification row in a file of tabular rows"),
    ],
)  # fmt: skip
def test_bad_tabular_row(write, row: Any, words: str) -> None:
    error = error_of(write(lines(*TABULAR, "", row)))
    assert error.line == 5
    assert str(error).startswith(f"line 5: {words}")


def test_tabular_needs_two_labels(write) -> None:
    rows = [{"features": [i], "label": "only"} for i in range(4)]
    assert "at least 2 distinct labels" in str(error_of(write(lines(*rows))))


def test_csv_with_a_features_array_column(api) -> None:
    content = 'features,label\n"[1, 2.5]",cat\n"[0, -1]",dog\n"[3, 3]",cat\n'
    response = upload(api, content.encode(), name="train.csv")
    assert response.status_code == 200, response.text
    assert response.json()["format"] == "tabular"
    assert response.json()["stats"] == {
        "rows": 3,
        "features": 2,
        "label_counts": {"cat": 2, "dog": 1},
        "distinct_labels": 2,
        "label_counts_truncated": False,
    }


def test_csv_with_numeric_columns(write) -> None:
    path = write("f0,f1,f2,label\n1,2,3,0\n4.5,-5,6e-2,1\n", "train.csv")
    info = validate_dataset(path)
    assert (info.format, info.stats["features"], info.labels) == ("tabular", 3, ["0", "1"])
    assert list(iter_examples(path)) == [
        {"features": [1.0, 2.0, 3.0], "label": "0"},
        {"features": [4.5, -5.0, 0.06], "label": "1"},
    ]


@pytest.mark.parametrize(
    ("content", "line", "words"),
    [
        ("f0,f1,label\n1,2,a\n3,x,b\n", 3, "column 'f1' must be a number, got 'x'"),
        ("f0,f1,label\n1,2,a\n3,,b\n", 3, "column 'f1' must be a number, got ''"),
        ("f0,f1,label\n1,2,a\nnan,1,b\n", 3, "column 'f0' must be a finite number"),
        ('features,label\n"[1, 2]",a\n"[1, 2",b\n', 3, "field 'features' must be a JSON array"),
        ('features,label\n"[1, 2]",a\n"[1]",b\n', 3, "expected 2 features as in the first row"),
        ('features,label\n"[1, 2]",a\n"[1, true]",b\n', 3, "features[1] must be a number"),
    ],
)
def test_bad_tabular_csv(write, content: str, line: int, words: str) -> None:
    error = error_of(write(content, "train.csv"))
    assert error.line == line
    assert words in str(error)


def test_parquet_with_a_list_column(api) -> None:
    content = parquet_bytes(
        {"features": [[0.0, 1.0], [2.0, 3.0], [4.0, 5.5]], "label": ["x", "y", "x"]}
    )
    response = upload(api, content, name="train.parquet")
    assert response.status_code == 200, response.text
    assert response.json()["format"] == "tabular"
    assert response.json()["stats"] == {
        "rows": 3,
        "features": 2,
        "label_counts": {"x": 2, "y": 1},
        "distinct_labels": 2,
        "label_counts_truncated": False,
    }


def test_parquet_with_numeric_columns_read_in_batches(write) -> None:
    n = 2500  # more than one row batch
    content = parquet_bytes(
        {"a": [float(i) for i in range(n)], "b": list(range(n)), "label": [i % 3 for i in range(n)]}
    )
    path = write(content, "no-extension")
    info = validate_dataset(path)
    assert info.format == "tabular"
    assert info.stats["rows"] == n
    assert info.stats["label_counts"] == {"0": 834, "1": 833, "2": 833}
    rows = list(iter_examples(path, fmt="tabular"))
    assert rows[2001] == {"features": [2001.0, 2001.0], "label": "0"}


def test_parquet_errors_name_the_row(api) -> None:
    features = [[1.0, 2.0], [1.0, 2.0], [float("nan"), 1.0]]
    content = parquet_bytes({"features": features, "label": ["a", "b", "a"]})
    with changes_nothing(api):
        response = upload(api, content, name="train.parquet")
        assert_error(response, 400, param="file", words="row 3: features[0] must be a finite")


def test_parquet_ragged_and_missing_values(write) -> None:
    ragged = parquet_bytes({"features": [[1.0, 2.0], [1.0]], "label": ["a", "b"]})
    error = error_of(write(ragged, "r.parquet"))
    assert (error.unit, error.line) == ("row", 2)
    assert "expected 2 features" in str(error)
    missing = parquet_bytes({"f0": [1.0, None], "label": ["a", "b"]})
    assert str(error_of(write(missing, "m.parquet"))) == "row 2: column 'f0' is empty"


def test_not_parquet_after_the_magic(write) -> None:
    assert "not a valid Parquet file" in str(error_of(write(b"PAR1 and then nothing useful")))


def test_classification_parquet(write) -> None:
    path = write(parquet_bytes({"text": ["good", "bad"], "label": ["pos", "neg"]}), "c.parquet")
    info = validate_dataset(path)
    assert (info.format, info.labels) == ("classification", ["neg", "pos"])


def test_unknown_stored_format(write) -> None:
    path = write(lines(*CHAT))
    with pytest.raises(DatasetError, match="unknown dataset format 'csv'"):
        list(iter_examples(path, fmt="csv"))


def test_csv_of_sentences_is_not_mistaken_for_features(write) -> None:
    # SST-2's TSV: the first row's cells are not numbers, so the table is not numeric columns,
    # and the classification checker names the column it lacks.
    error = error_of(write("sentence\tlabel\na charming journey\t1\nflat\t0\n", "dev.tsv"))
    assert (error.line, error.reason) == (2, "missing required field 'text'")
