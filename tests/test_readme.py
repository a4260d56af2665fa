"""The README's examples, run as written against a real `tunehouse run`.

Every ```python and ```bash block of README.md runs here, in the order the README gives them,
as a user would run them after `make run`: bash blocks with `bash` in a fresh working folder,
python blocks one after another in one namespace (as pasted into one interpreter). The only
things a user fills in come from the environment the README names: `TUNEHOUSE_API_KEY` (the key
`tunehouse run` printed) and `TUNEHOUSE_BASE_URL` (the server's free port), and `HOME`, under
which the chat example's base model is found (`~/models/...`, built here: a tiny Llama, see
tests/tiny_models.py). Blocks that are not meant to run use another info string (```console,
```text, ```json); a block of an unknown kind fails the test.

The PostgreSQL and Redis block is run by bash with a stand-in for `tunehouse` that records each
call: every command line must parse with the real CLI, and the settings exported before it must
build a valid `Settings`. Starting that deployment for real is test_end_to_end's job.

The tables are checked against the code: the Settings table names each `TUNEHOUSE_*` setting
once, the Commands table each command with all its options; and nothing points outside the
repository.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer

from app.cli import cli
from app.core.settings import Settings
from tests.stacks import embedded_stack
from tests.support import ROOT, fact_texts
from tests.tiny_models import build_causal_lm

pytestmark = pytest.mark.slow

README = ROOT / "README.md"
RUNNABLE = ("python", "bash")
NOT_RUN = ("console", "text", "json")

QUICKSTART = "Quickstart with the openai SDK"
CURL = "The same with curl"
CLI = "CLI quickstart"
CHAT = "Chat fine-tuning, LoRA and chat completions"
DPO = "Preference tuning (DPO)"
CONTINUE = "Continuing from a fine-tuned model"
SERVERS = "Running on PostgreSQL and Redis"
TOOLS = "Tool calling"
# Each section with runnable blocks, and the test that runs them.
RUN_BY = {
    QUICKSTART: "test_quickstart",
    CURL: "test_curl",
    CLI: "test_cli_quickstart",
    CHAT: "test_chat_lora_and_completions",
    DPO: "test_preference_tuning",
    CONTINUE: "test_chat_lora_and_completions",
    SERVERS: "test_postgres_and_redis_commands",
    TOOLS: "test_tool_calling",
}
BLOCK_TIMEOUT = 240  # seconds any one block may take (each waits for a job at most once)


@dataclass(frozen=True)
class Block:
    section: str  # the heading the block is under
    info: str  # its info string: python, bash, console...
    code: str
    line: int  # the line of its first line of code in README.md


def readme_blocks() -> list[Block]:
    blocks: list[Block] = []
    section, start, body = "", 0, list[str]()
    fence: str | None = None  # the open block's info string
    for number, line in enumerate(README.read_text().splitlines(), start=1):
        if fence is not None:
            if line.strip() == "```":
                blocks.append(Block(section, fence, "\n".join(body) + "\n", start))
                fence = None
            else:
                body.append(line)
        elif line.startswith("```"):
            fence, start, body = line[3:].strip(), number + 1, []
        elif line.startswith("#"):
            section = line.lstrip("#").strip()
    assert fence is None, f"README.md: the block at line {start} is never closed"
    return blocks


def runnable(section: str) -> list[Block]:
    blocks = [b for b in readme_blocks() if b.section == section and b.info in RUNNABLE]
    assert blocks, f"README.md has no runnable block under '{section}'"
    return blocks


def table(heading: str) -> list[list[str]]:
    """The cells of the first table under ``heading`` (header and rule left out)."""
    text = README.read_text()
    lines = text[text.index(f"\n## {heading}\n") :].splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[first + 2 :]:
        if not line.startswith("|"):
            break
        cells = re.split(r"(?<!\\)\|", line.strip().strip("|"))
        rows.append([cell.strip().replace("\\|", "|") for cell in cells])
    return rows


# ---- running blocks -------------------------------------------------------------------------


@dataclass
class User:
    """Someone following the README: a working folder, an environment, a Python session."""

    workdir: Path
    env: dict[str, str]
    namespace: dict[str, Any]

    def bash(self, block: Block, before: str = "") -> tuple[str, dict[str, str]]:
        """Run ``block`` with bash (errexit, nounset, pipefail: a failing command fails the
        test); ``before`` is the test's own scaffolding, run first. Returns the output and the
        shell's variables after the block."""
        state = self.workdir / ".shell-state"
        dump = (
            "set +u\n"
            'for __name in $(compgen -v); do printf "%s=%s\\0" "$__name" "${!__name}"; done'
            f' > "{state}"\n'
        )
        script = f"set -euo pipefail\n{before}\n{block.code}\n{dump}"
        done = subprocess.run(
            ["bash", "-c", script],
            cwd=self.workdir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=BLOCK_TIMEOUT,
        )
        where = f"README.md:{block.line} ({block.section})"
        assert done.returncode == 0, f"{where} failed:\n{done.stdout}\n{done.stderr}"
        variables = dict(
            entry.split("=", 1) for entry in state.read_text().split("\0") if "=" in entry
        )
        return done.stdout, variables

    def python(self, block: Block) -> None:
        # Blank lines first, so that a traceback names the README's own line numbers.
        code = compile("\n" * (block.line - 1) + block.code, str(README), "exec")
        exec(code, self.namespace)

    def run(self, blocks: list[Block]) -> None:
        for block in blocks:
            if block.info == "bash":
                self.bash(block)
            else:
                self.python(block)


@dataclass(frozen=True)
class Server:
    base_url: str  # with /v1, as TUNEHOUSE_BASE_URL holds it
    key: str
    home: Path
    base_models: dict[str, str]  # TUNEHOUSE_BASE_MODELS, as the README's export gave it

    def get(self, path: str) -> httpx.Response:
        return httpx.get(
            f"{self.base_url}{path}", headers={"Authorization": f"Bearer {self.key}"}, timeout=30
        )


def shell_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEHOUSE_")}
    return {**env, "HOME": str(home), **extra}


def base_models_env(home: Path, workdir: Path) -> dict[str, str]:
    """Run the chat section's `export TUNEHOUSE_BASE_MODELS=...` block as a user would, build
    a tiny causal LM where it says the model is, and return the settings it exported."""
    (export,) = [b for b in runnable(CHAT) if "TUNEHOUSE_BASE_MODELS" in b.code]
    _, variables = User(workdir, shell_env(home), {}).bash(export)
    exported = {k: v for k, v in variables.items() if k.startswith("TUNEHOUSE_")}
    for directory in json.loads(exported["TUNEHOUSE_BASE_MODELS"]).values():
        assert directory.startswith("~/"), "the README's base model lives in the user's home"
        build_causal_lm(home / directory.removeprefix("~/"), fact_texts())
    return exported


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("readme")
    home = tmp / "home"
    home.mkdir()
    exported = base_models_env(home, tmp)
    # The server sees the same HOME as the user, so `~` in TUNEHOUSE_BASE_MODELS means the same.
    with embedded_stack(tmp, {**exported, "HOME": str(home)}) as (stack, key):
        base_models = json.loads(exported["TUNEHOUSE_BASE_MODELS"])
        yield Server(f"{stack.base_url}/v1", key, home, base_models)


@pytest.fixture
def user(server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> User:
    workdir = tmp_path / "work"
    workdir.mkdir()
    filled_in = {"TUNEHOUSE_API_KEY": server.key, "TUNEHOUSE_BASE_URL": server.base_url}
    for name, value in filled_in.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(workdir)
    return User(workdir, shell_env(server.home, **filled_in), {})


def training_data_blocks() -> list[Block]:
    """The quickstart's bash blocks: the files its examples (and the curl ones) read."""
    return [b for b in runnable(QUICKSTART) if b.info == "bash"]


# ---- the examples ---------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_quickstart(user: User, server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    """The quickstart and the predictions example: upload, a job paused, resumed and cancelled,
    another followed to the end, its model predicting, then everything deleted."""
    user.run(runnable(QUICKSTART))
    ns, printed = user.namespace, capsys.readouterr().out

    spare = ns["spare"]
    assert spare.status == "cancelled"
    events = server.get(f"/fine_tuning/jobs/{spare.id}/events?limit=100").json()["data"]
    said = " | ".join(e["message"] for e in events)
    assert "Pause requested" in said or "Fine-tuning job paused" in said, said
    assert "Fine-tuning job resumed" in said and "Fine-tuning job cancelled" in said, said
    job = ns["job"]
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model.startswith("ft:sentence-transformers/all-MiniLM-L6-v2:default:")
    assert job.fine_tuned_model in printed
    assert "The job has successfully completed" in printed  # the events loop

    response = ns["r"]
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert [p["index"] for p in data] == [0, 1]
    assert all(p["label"] in ("negative", "positive") for p in data)
    assert all(abs(sum(p["scores"].values()) - 1) < 1e-3 for p in data)

    # The last block deleted the model and both files.
    assert server.get(f"/models/{job.fine_tuned_model}").status_code == 404
    for file in (ns["train"], ns["valid"]):
        assert server.get(f"/files/{file.id}").status_code == 404


def sse_and_json(output: str) -> Iterator[tuple[str, Any]]:
    """What curl printed: server-sent events ("sse", payload) and JSON documents ("json",
    value), which curl prints one after another with no newline between them."""
    decoder, position = json.JSONDecoder(), 0
    while True:
        while position < len(output) and output[position].isspace():
            position += 1
        if position == len(output):
            return
        if output.startswith(": ", position):  # an SSE comment (the stream's keep-alive)
            position = output.index("\n", position)
        elif output.startswith("data: ", position):
            end = output.index("\n", position)
            payload = output[position + len("data: ") : end]
            yield "sse", payload if payload == "[DONE]" else json.loads(payload)
            position = end
        else:
            value, position = decoder.raw_decode(output, position)
            yield "json", value


@pytest.mark.timeout(300)
def test_curl(user: User, server: Server) -> None:
    """The curl examples, after the quickstart's block that writes train.jsonl."""
    assert shutil.which("jq"), "the README's curl examples need jq (e.g. apt-get install jq)"
    user.run(training_data_blocks())
    (block,) = runnable(CURL)
    output, variables = user.bash(block)
    printed = list(sse_and_json(output))
    documents = [value for kind, value in printed if kind == "json"]
    assert not [d for d in documents if isinstance(d, dict) and "error" in d], output

    events = [value for kind, value in printed if kind == "sse"]
    assert events[-1] == "[DONE]"
    assert "The job has successfully completed" in [e["message"] for e in events[:-1]]

    job, model = variables["JOB"], variables["MODEL"]
    assert server.get(f"/fine_tuning/jobs/{job}").json()["fine_tuned_model"] == model
    (prediction,) = [d for d in documents if isinstance(d, dict) and d.get("model") == model]
    assert [p["index"] for p in prediction["data"]] == [0]
    # The file's content, as uploaded: the rows of train.jsonl, in order.
    rows = [json.loads(line) for line in (user.workdir / "train.jsonl").read_text().splitlines()]
    assert rows and any(documents[i : i + len(rows)] == rows for i in range(len(documents)))
    assert {"id": model, "object": "model", "deleted": True} in documents
    assert server.get(f"/models/{model}").status_code == 404
    assert server.get(f"/files/{variables['FILE']}").status_code == 404


@pytest.mark.timeout(300)
def test_cli_quickstart(user: User, server: Server) -> None:
    """The CLI examples, after the quickstart's block that writes the files, with `tunehouse`
    on the PATH as the virtualenv of `make run` has it."""
    user.env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{user.env['PATH']}"
    user.run(training_data_blocks())
    (block,) = runnable(CLI)
    output, variables = user.bash(block)

    job, model = variables["JOB"], variables["MODEL"]
    assert server.get(f"/fine_tuning/jobs/{job}").json()["status"] == "succeeded"
    assert model.startswith("ft:sentence-transformers/all-MiniLM-L6-v2:default:cli:")
    assert "The job has successfully completed" in output  # jobs follow, in plain lines
    assert f"Job {job} succeeded: {model}" in output
    assert re.search(r"what a lovely film +│ (positive|negative) +│ 0\.\d{4}", output), output
    assert f"Deleted {model}" in output
    assert server.get(f"/models/{model}").status_code == 404


@pytest.mark.timeout(300)
def test_chat_lora_and_completions(
    user: User, server: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    """The chat example on the base model the fixture registered as the README says: the
    quickstart's client, then a LoRA fine-tune, a chat completion, a streamed one and a text
    completion of its model, and a job that continues from its model."""
    (setup, *_) = [b for b in runnable(QUICKSTART) if b.info == "python"]
    assert "client = OpenAI(" in setup.code, "the chat example uses the quickstart's client"
    user.run([setup, *runnable(CHAT), *runnable(CONTINUE)])
    ns, printed = user.namespace, capsys.readouterr().out

    job = ns["job"]
    assert job.status == "succeeded", job.error
    (base,) = server.base_models
    assert job.fine_tuned_model.startswith(f"ft:{base}:default:")
    model = server.get(f"/models/{job.fine_tuned_model}").json()
    assert model["id"] == job.fine_tuned_model

    reply = ns["reply"].choices[0]
    assert reply.finish_reason in ("stop", "length") and isinstance(reply.message.content, str)
    assert reply.message.content in printed
    assert ns["chunk"].model == job.fine_tuned_model  # the stream sent chunks
    completion = ns["completion"].choices[0]
    assert completion.finish_reason in ("stop", "length") and isinstance(completion.text, str)

    # Continued from the LoRA model: the name keeps the root base.
    more = ns["more"]
    assert more.status == "succeeded", more.error
    assert more.model == job.fine_tuned_model
    assert more.fine_tuned_model.startswith(f"ft:{base}:default:more:")


@pytest.mark.timeout(300)
def test_preference_tuning(user: User, server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    """The DPO example on the registered base model, with the quickstart's client."""
    (setup, *_) = [b for b in runnable(QUICKSTART) if b.info == "python"]
    user.run([setup, *runnable(DPO)])
    ns, printed = user.namespace, capsys.readouterr().out

    job = ns["dpo_job"]
    assert job.status == "succeeded", job.error
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.1
    assert f"succeeded {job.fine_tuned_model} 0.1" in printed
    events = server.get(f"/fine_tuning/jobs/{job.id}/events?limit=100").json()["data"]
    metrics = [e["data"] for e in events if e["type"] == "metrics"]
    assert metrics and all("train_reward_accuracy" in data for data in metrics)


@pytest.mark.timeout(300)
def test_tool_calling(user: User, server: Server) -> None:
    """The tool-calling example on the chat example's base: its rows upload and train, and the
    named tool_choice comes back through the SDK as a call (or, from a model this small, as the
    text of a call that does not parse: never an error)."""
    (setup, *_) = [b for b in runnable(QUICKSTART) if b.info == "python"]
    user.run([setup, *runnable(TOOLS)])
    ns = user.namespace
    assert ns["tool_job"].status == "succeeded", ns["tool_job"].error
    choice = ns["called"].choices[0]
    if choice.finish_reason == "tool_calls":
        (call,) = choice.message.tool_calls
        assert call.function.name == "get_weather" and call.id.startswith("call_")
        assert isinstance(json.loads(call.function.arguments), dict)
        assert ns["final"].choices[0].finish_reason in ("stop", "length", "tool_calls")
    else:
        assert isinstance(choice.message.content, str)


def test_postgres_and_redis_commands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The PostgreSQL and Redis block, with `tunehouse` standing in for itself: each command
    line parses with the real CLI, and the settings exported for it are valid."""
    (block,) = runnable(SERVERS)
    calls = tmp_path / "calls.jsonl"
    record = (
        "import json, os, sys; print(json.dumps({'args': sys.argv[1:], 'env': {k: v for k, v"
        " in os.environ.items() if k.startswith('TUNEHOUSE_')}}))"
    )
    python, out = shlex.quote(sys.executable), shlex.quote(str(calls))
    stand_in = f'tunehouse() {{ {python} -c "{record}" "$@" >> {out}; }}'
    User(tmp_path, shell_env(tmp_path), {}).bash(block, before=stand_in)

    recorded = [json.loads(line) for line in calls.read_text().splitlines()]
    commands = [line for line in block.code.splitlines() if line.startswith("tunehouse ")]
    assert len(recorded) == len(commands) >= 1
    for call in recorded:
        parse_command(call["args"])
        for name in [n for n in os.environ if n.startswith("TUNEHOUSE_")]:
            monkeypatch.delenv(name)
        for name, value in call["env"].items():
            assert name.removeprefix("TUNEHOUSE_").lower() in Settings.model_fields, name
            monkeypatch.setenv(name, value)
        settings = Settings(_env_file=None)
        assert settings.sqlalchemy_url.startswith("postgresql+psycopg://")
        assert settings.celery_broker_url.startswith("redis://")


# ---- what the README says about the code ----------------------------------------------------


def parse_command(args: list[str]) -> Any:
    """The `tunehouse` command ``args`` name, parsed by the real CLI (an unknown command,
    option or value raises click's usage error)."""
    command: Any = typer.main.get_command(cli)
    words = list(args)
    while getattr(command, "commands", None):
        assert words, f"`tunehouse {' '.join(args)}` names no command"
        command = command.commands[words.pop(0)]
    command.make_context(command.name, words)
    return command


def cli_commands(command: Any = None, path: tuple[str, ...] = ()) -> dict[str, Any]:
    """Every leaf command of the CLI by its words ("keys create")."""
    command = command or typer.main.get_command(cli)
    subcommands: dict[str, Any] = getattr(command, "commands", None) or {}
    if not subcommands:
        return {" ".join(path): command}
    found: dict[str, Any] = {}
    for name, sub in subcommands.items():
        found |= cli_commands(sub, (*path, name))
    return found


def test_every_runnable_block_is_run() -> None:
    blocks = readme_blocks()
    unknown = [(b.line, b.info) for b in blocks if b.info not in RUNNABLE + NOT_RUN]
    assert not unknown, f"README.md blocks of no known kind (line, info string): {unknown}"
    sections = {b.section for b in blocks if b.info in RUNNABLE}
    assert sections == set(RUN_BY), "a new runnable block needs a test here"


def test_console_blocks_name_what_exists() -> None:
    """`make` targets, `tunehouse` commands and `pip install`ed packages in console blocks."""
    makefile = (ROOT / "Makefile").read_text()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + project["optional-dependencies"]["test"]
    installable = {re.split(r"[\[<>=~ ]", r)[0].lower() for r in requirements}
    prompts = [
        line[2:].split("#")[0].split()
        for block in readme_blocks()
        if block.info == "console"
        for line in block.code.splitlines()
        if line.startswith("$ ")
    ]
    assert prompts
    for words in prompts:
        if words[0] == "make":
            target = words[1]
            assert re.search(rf"^{target}:", makefile, re.M), f"no make target {target!r}"
        elif words[0].endswith("tunehouse"):
            parse_command(words[1:])
        elif words[:2] == ["pip", "install"]:
            assert set(words[2:]) <= installable, "the README says the test extras have them"


def test_settings_table_documents_each_setting_once() -> None:
    documented = Counter(
        name.removeprefix("TUNEHOUSE_").lower()
        for row in table("Settings")
        for name in re.findall(r"TUNEHOUSE_[A-Z_]+", row[0])
    )
    assert {k: n for k, n in documented.items() if n > 1} == {}
    assert set(documented) == set(Settings.model_fields)


def test_commands_table_matches_the_cli() -> None:
    commands = cli_commands()
    documented: dict[str, str] = {}
    for row in table("Commands"):
        words = row[0].strip("`").split()
        assert words[0] == "tunehouse", row
        path = []
        for word in words[1:]:
            if word.startswith(("[", "-")) or word.isupper():
                break
            path.append(word)
        documented[" ".join(path)] = " ".join(words[1 + len(path) :])
    assert set(documented) == set(commands)
    for name, usage in documented.items():
        options = {o for p in commands[name].params for o in p.opts + p.secondary_opts}
        named = {o for o in options if o.startswith("--")}
        assert set(re.findall(r"--[a-z-]+", usage)) == named, name
        arguments = {
            p.name.upper() for p in commands[name].params if p.param_type_name == "argument"
        }
        assert arguments <= set(usage.replace("[", " ").replace("]", " ").split()), name


def test_the_docs_point_nowhere_outside_the_repository() -> None:
    for page in [README, *sorted((ROOT / "docs").glob("*.md"))]:
        text = page.read_text()
        assert not re.findall(r"(?<!\.)\.\./", text), f"{page.name} points outside the repository"
        for path in re.findall(
            r"`((?:app|bench|docs|migrations|tests|worker|\.ci)/[\w./-]*)`", text
        ):
            assert (ROOT / path).exists(), f"{page.name} names {path}, which does not exist"
