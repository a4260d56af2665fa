"""The bad-dataset corpus (tests/data/bad_datasets): every file is uploaded through the API as a
user would. A bad one gets a 400 in OpenAI's error envelope naming the line (or Parquet row) and
what is wrong with it in words, and nothing is stored; a fine one (CRLF line ends, a UTF-8
byte-order mark, ...) is accepted. expected.json gives each file's expected answer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

CORPUS = Path(__file__).parent / "data" / "bad_datasets"
EXPECTED: dict[str, dict[str, Any]] = json.loads((CORPUS / "expected.json").read_text("utf-8"))
BAD = sorted(name for name, case in EXPECTED.items() if case["status"] != 200)
GOOD = sorted(name for name, case in EXPECTED.items() if case["status"] == 200)
# The corpus runs with a 64 KiB line limit (so the over-long line stays a small file) and with
# labels seen once refused (the default accepts them: an upload may be a validation file).
LINE_LIMIT = 64 * 1024


@pytest.fixture(autouse=True)
def corpus_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    # Autouse: set before the `api` fixture builds its settings from the environment.
    monkeypatch.setenv("TUNEHOUSE_MAX_DATASET_LINE_BYTES", str(LINE_LIMIT))
    monkeypatch.setenv("TUNEHOUSE_MIN_EXAMPLES_PER_LABEL", "2")


def stored(api) -> tuple[list[str], dict[str, int]]:
    """The organization's files as the API lists them, and every file in storage with its size."""
    listed = api.client.get("/v1/files", headers=api.headers()).json()["data"]
    root = api.settings.storage_root
    tree = {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}
    return [f["id"] for f in listed], tree


def upload(api, name: str):
    return api.client.post(
        "/v1/files",
        headers=api.headers(),
        files={"file": (name, (CORPUS / name).read_bytes(), "application/octet-stream")},
        data={"purpose": "fine-tune"},
    )


def test_the_corpus_covers_every_problem() -> None:
    assert len(BAD) >= 25
    assert {path.name for path in CORPUS.iterdir()} == {
        *EXPECTED,
        "expected.json",
        ".gitattributes",
    }
    suffixes = {Path(name).suffix for name in BAD}
    assert suffixes == {".jsonl", ".csv", ".tsv", ".txt", ".parquet"}


@pytest.mark.parametrize("name", BAD)
def test_a_bad_dataset_is_refused_with_line_and_reason(api, name: str) -> None:
    case = EXPECTED[name]
    before = stored(api)
    response = upload(api, name)
    assert response.status_code == case["status"], response.text
    assert set(response.json()) == {"error"}
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == "file"
    assert error["code"] == "invalid_file"
    message = error["message"]
    assert message.startswith(f"Invalid file '{name}': ")
    assert case["words"] in message
    where = f"{case.get('unit', 'line')} {case['line']}: "
    if case["line"] is None:
        assert not any(f"{unit} " in message.split(": ")[1] for unit in ("line", "row")), message
    else:
        assert f": {where}" in message, message
    assert stored(api) == before


@pytest.mark.parametrize("name", GOOD)
def test_a_fine_dataset_is_accepted(api, name: str) -> None:
    case = EXPECTED[name]
    response = upload(api, name)
    assert response.status_code == 200, response.text
    file = response.json()
    assert (file["format"], file["stats"]["rows"]) == (case["format"], case["rows"])
    assert stored(api)[0] == [file["id"]]


def test_the_line_limit_is_the_setting(api) -> None:
    """The over-long line is refused by its length, not its content: with a higher limit the
    same file is fine."""
    from app.core.settings import Settings
    from app.services.datasets import DatasetLimits, validate_dataset

    path = CORPUS / "23-line-too-long.jsonl"
    assert validate_dataset(path).rows == 4  # the default limit, 1 MiB
    assert Settings.model_fields["max_dataset_line_bytes"].default == 1024 * 1024
    assert api.settings.max_dataset_line_bytes == LINE_LIMIT
    with pytest.raises(ValueError, match="line 2: the line is longer than 65536 bytes"):
        validate_dataset(path, limits=DatasetLimits(max_line_bytes=LINE_LIMIT))
