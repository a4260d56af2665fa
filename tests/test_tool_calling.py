"""Tool calling (docs/tool-calling.md): chat rows with ``tools``, assistant ``tool_calls`` and
``tool`` messages are validated at upload with line numbers; training renders them and takes loss
on exactly the assistant's content and calls; the server reads calls back from the model's text
(malformed ones come back as content); and a tiny model fine-tuned on tool-call rows answers
held-out prompts with parsed ``tool_calls`` through the official SDK, streamed or not."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from app.inference.templates import DEFAULT_CHAT_TEMPLATE
from app.inference.tool_calls import (
    call_prefix,
    call_text,
    parse_tool_calls,
    render_chat,
    tools_prompt,
)
from app.services.datasets.checks import check_messages
from tests.test_bad_input import assert_error, changes_nothing
from tests.test_datasets_generative import lines, upload
from tests.test_generative_end_to_end import Service

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}
TOOLS = [WEATHER, TIME]


def call(name: str, arguments: Any, call_id: str = "call_1") -> dict[str, Any]:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": text}}


def calls(*tool_calls: dict[str, Any], content: Any = None) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "tool_calls": list(tool_calls)}
    if content is not None:
        message["content"] = content
    return message


def tool_row(*messages: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"messages": list(messages), "tools": TOOLS, **extra}


USER = {"role": "user", "content": "weather in Paris?"}
PARIS = call("get_weather", {"city": "Paris"})
ANSWER = {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}
FINAL = {"role": "assistant", "content": "It is sunny in Paris."}
GOOD = tool_row(USER, calls(PARIS), ANSWER, FINAL)


# ---- upload validation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("row", "words"),
    [
        (
            tool_row(USER, calls(call("get_weather", "{city: Paris}"))),
            "messages[1].tool_calls[0].function.arguments is not valid JSON",
        ),
        (
            tool_row(USER, calls(call("get_weather", "[1, 2]"))),
            "arguments must hold a JSON object, got an array",
        ),
        (
            tool_row(USER, calls(call("get_weather", "7"))),
            "must hold a JSON object, got a number",
        ),
        (
            tool_row(USER, calls(call("get_news", {}))),
            "messages[1].tool_calls[0] calls function 'get_news', which is not a tool",
        ),
        (
            {"messages": [USER, calls(PARIS)]},
            "calls function 'get_weather', which is not a tool (the row has no 'tools')",
        ),
        (
            tool_row(USER, calls(PARIS), {**ANSWER, "tool_call_id": "call_9"}, FINAL),
            "messages[2]: tool_call_id 'call_9' answers no earlier tool call",
        ),
        (
            tool_row(USER, ANSWER, FINAL),
            "messages[1]: tool_call_id 'call_1' answers no earlier tool call",
        ),
        (
            tool_row(USER, {"role": "tool", "content": "sunny"}, FINAL),
            "messages[1]: missing required field 'tool_call_id'",
        ),
        (
            {"messages": [USER, calls(PARIS)], "tools": [WEATHER, WEATHER]},
            "tools[1]: a second tool named 'get_weather'",
        ),
        (
            tool_row(USER, calls(PARIS, call("get_time", {}, "call_1"))),
            "tool_calls[1]: id 'call_1' is used by an earlier call",
        ),
        (
            tool_row(USER, calls(PARIS, call("get_time", {}, "call_2")), parallel_tool_calls=False),
            "makes 2 tool calls, but the row sets 'parallel_tool_calls' to false",
        ),
        (
            {"messages": [USER, calls(PARIS)], "tools": [{"type": "function"}]},
            "tools[0]: missing required field 'function'",
        ),
        (
            {"messages": [USER, calls(PARIS)], "tools": [{"type": "code", "function": {}}]},
            "tools[0]: field 'type' must be \"function\"",
        ),
        (
            {"messages": [USER, calls(PARIS)], "tools": [{**WEATHER, "function": {"name": "a b"}}]},
            "is not a function name",
        ),
        (
            {"messages": [USER, FINAL], "tools": []},
            "field 'tools' is empty",
        ),
        (tool_row(USER, calls()), "messages[1]: field 'tool_calls' is empty"),
        (tool_row(USER, {"role": "assistant"}), "messages[1]: missing required field 'content'"),
        (
            tool_row({**USER, "tool_calls": [PARIS]}, FINAL),
            "messages[0]: unknown field 'tool_calls'",
        ),
        (
            tool_row(USER, FINAL, parallel_tool_calls="yes"),
            "field 'parallel_tool_calls' must be a boolean",
        ),
        (
            {"messages": [USER, FINAL], "functions": [WEATHER["function"]]},
            "legacy function calling is not supported",
        ),
        (
            tool_row(USER, {"role": "assistant", "function_call": PARIS["function"]}),
            "legacy function calling is not supported",
        ),
    ],
)
def test_a_bad_tool_row_is_refused_with_its_line_and_nothing_stored(
    api: Any, row: dict[str, Any], words: str
) -> None:
    content = lines(GOOD, GOOD, row, GOOD).encode()
    with changes_nothing(api):
        error = assert_error(upload(api, content), 400, param="file", words=words)
    assert "line 3: " in error["message"]
    assert error["code"] == "invalid_file"


def test_a_tool_calling_file_is_accepted_with_its_stats(api: Any) -> None:
    parallel = tool_row(
        USER,
        calls(PARIS, call("get_time", {}, "call_2"), content="Let me look."),
        ANSWER,
        {"role": "tool", "tool_call_id": "call_2", "content": "noon"},
        FINAL,
        parallel_tool_calls=True,
    )
    plain = {"messages": [USER, FINAL]}
    response = upload(api, lines(GOOD, parallel, plain).encode())
    assert response.status_code == 200, response.text
    stats = response.json()["stats"]
    assert stats["role_counts"] == {"system": 0, "user": 3, "assistant": 5, "tool": 3}
    assert (stats["rows_with_tools"], stats["tool_calls"]) == (2, 3)


def test_check_messages_checks_a_conversation_and_its_continuation() -> None:
    """The function other row formats (DPO's input and outputs) use for their messages."""
    prompt = check_messages([USER], TOOLS, field="input.messages")
    output = check_messages([calls(PARIS)], TOOLS, field="preferred_output")
    assert output[0]["tool_calls"] == [PARIS] and output[0]["content"] is None
    answered = check_messages([ANSWER, FINAL], TOOLS, earlier=prompt + output)
    assert answered[0]["tool_call_id"] == "call_1"
    with pytest.raises(ValueError, match=r"preferred_output\[0\]\.tool_calls\[0\] calls function"):
        check_messages([calls(call("nope", {}))], TOOLS, field="preferred_output")
    with pytest.raises(ValueError, match=r"messages\[0\]: tool_call_id 'call_1' answers no"):
        check_messages([ANSWER], TOOLS)
    with pytest.raises(ValueError, match=r"input\.tools\[1\]: a second tool named"):
        check_messages([USER], [WEATHER, WEATHER], tools_field="input.tools")


# ---- rendering and the loss mask ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from tests.tiny_models import build_tokenizer

    rendered = json.dumps(GOOD) + " ### system user assistant tool <tool_call> </tool_call>"
    return build_tokenizer([rendered] * 3, vocab_size=400)


# A template that knows nothing of tools (Tunehouse's default before tools): the default
# rendering puts the tools in the system prompt and the calls in the assistant's content.
NO_TOOLS_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<' + message['role'] + '>' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<assistant>' }}{% endif %}"
)
# A template of its own with tools support (Hermes-like): it gets the calls' arguments as
# objects, and writes them itself.
NATIVE_TEMPLATE = (
    "{% if tools %}<|tools|>{% for tool in tools %}{{ tool | tojson }}{% endfor %}{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}<|assistant|>{{ m['content'] or '' }}"
    "{% for c in m['tool_calls'] or [] %}<tool_call>"
    "{{ {'name': c['function']['name'], 'arguments': c['function']['arguments']} | tojson }}"
    "</tool_call>{% endfor %}{{ eos_token }}"
    "{% else %}{{ '<|' + m['role'] + '|>' + m['content'] }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CALL_TEXT = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
TIME_CALL = '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'


@pytest.mark.parametrize(
    ("template", "learnt"),
    [
        (
            DEFAULT_CHAT_TEMPLATE,
            f"Looking.\n{CALL_TEXT}\n{TIME_CALL}<eos>It is sunny in Paris.<eos>",
        ),
        (NO_TOOLS_TEMPLATE, f"Looking.\n{CALL_TEXT}\n{TIME_CALL}<eos>It is sunny in Paris.<eos>"),
        (NATIVE_TEMPLATE, f"Looking.{CALL_TEXT}{TIME_CALL}<eos>It is sunny in Paris.<eos>"),
    ],
    ids=["default", "no-tools", "native"],
)
def test_the_loss_mask_covers_exactly_the_assistants_content_and_calls(
    tokenizer: Any, template: str, learnt: str
) -> None:
    from worker.training.causal_lm import IGNORE_INDEX, Chat

    tokenizer.chat_template = template
    parallel = calls(PARIS, call("get_time", {}, "call_2"), content="Looking.")
    row = tool_row(
        {"role": "system", "content": "be brief"},
        USER,
        parallel,
        ANSWER,
        {"role": "tool", "tool_call_id": "call_2", "content": "noon"},
        FINAL,
    )
    ids, labels = Chat().encode_row(row, tokenizer)
    trained = [token for token, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]
    assert tokenizer.decode(trained) == learnt.replace("<eos>", tokenizer.eos_token)
    text = tokenizer.decode(ids)
    assert '{"type": "function", "function": {"name": "get_weather"' in text  # tools listed
    assert "sunny" in text and "noon" in text  # tool answers seen, not learnt


def test_inference_renders_a_prompt_as_training_did(tokenizer: Any) -> None:
    from worker.training.causal_lm import chat_spans

    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    text, spans = chat_spans(tokenizer, GOOD["messages"], TOOLS)
    prompt = render_chat(tokenizer, GOOD["messages"][:1], TOOLS, add_generation_prompt=True)
    assert text.startswith(prompt) and spans[0][0] == len(prompt)
    assert text[spans[0][0] : spans[0][1]] == CALL_TEXT + tokenizer.eos_token


def test_a_conversation_without_tools_renders_as_before(tokenizer: Any) -> None:
    old_default = (
        "{% for message in messages %}"
        "{{ '### ' + message['role'] + ':\\n' + message['content'] }}"
        "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
        "{{ '\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '### assistant:\\n' }}{% endif %}"
    )
    messages = [{"role": "system", "content": "s"}, USER, FINAL, USER]
    rendered = []
    for template in (old_default, DEFAULT_CHAT_TEMPLATE):
        tokenizer.chat_template = template
        rendered.append(render_chat(tokenizer, messages, add_generation_prompt=True))
    assert rendered[0] == rendered[1]


# ---- parsing the model's answer ----------------------------------------------------------------

NAMES = ["get_weather", "get_time"]


def test_a_single_call_parses() -> None:
    parsed = parse_tool_calls(CALL_TEXT, NAMES)
    assert parsed is not None and parsed.content is None
    (only,) = parsed.tool_calls
    assert (only.name, json.loads(only.arguments)) == ("get_weather", {"city": "Paris"})
    assert only.id.startswith("call_")


def test_parallel_calls_parse_with_the_text_around_them() -> None:
    text = (
        f'Checking.\n{CALL_TEXT}\n<tool_call>{{"name": "get_time", "arguments": {{}}}}</tool_call>'
    )
    parsed = parse_tool_calls(text, NAMES)
    assert parsed is not None and parsed.content == "Checking."
    assert [c.name for c in parsed.tool_calls] == NAMES
    assert len({c.id for c in parsed.tool_calls}) == 2


def test_the_prefills_end_where_the_tokens_of_a_call_split() -> None:
    assert call_prefix(None) == '<tool_call>{"name": "'
    assert call_prefix("get_weather") == '<tool_call>{"name": "get_weather", "arguments":'
    assert CALL_TEXT.startswith(call_prefix("get_weather"))


def test_a_bare_json_call_parses() -> None:
    """Llama 3.1's format: the whole answer is one call, its arguments as "parameters"."""
    parsed = parse_tool_calls('{"name": "get_time", "parameters": {"zone": "UTC"}}', NAMES)
    assert parsed is not None and json.loads(parsed.tool_calls[0].arguments) == {"zone": "UTC"}


@pytest.mark.parametrize(
    "text",
    [
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}</tool_call>',  # bad JSON
        '<tool_call>{"name": "get_news", "arguments": {}}</tool_call>',  # unknown function
        '<tool_call>{"name": "get_weather", "arguments": [1]}</tool_call>',  # not an object
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Par',  # unclosed
        f"{CALL_TEXT}<tool_call>oops</tool_call>",  # one good call, one bad
        "It is sunny.",  # no call at all
        '{"city": "Paris"}',  # JSON, but no call
    ],
)
def test_a_malformed_call_gives_no_calls(text: str) -> None:
    assert parse_tool_calls(text, NAMES) is None


def test_the_route_reads_calls_as_the_request_asks() -> None:
    from app.inference.chat_tools import ToolUse
    from app.inference.sampling import Generation

    two = Generation(text=f"{CALL_TEXT}\n{TIME_CALL}", finish_reason="stop")
    message, finish = ToolUse(TOOLS).answer(two)
    assert finish == "tool_calls" and message.content is None
    assert [c.function.name for c in message.tool_calls or ()] == NAMES
    message, _ = ToolUse(TOOLS, parallel=False).answer(two)  # parallel_tool_calls: false
    assert [c.function.name for c in message.tool_calls or ()] == ["get_weather"]
    # A prefilled call is read with its prefill; the stream ends with one delta per call.
    prefill = call_prefix("get_weather")
    rest = Generation(text=CALL_TEXT.removeprefix(prefill), finish_reason="stop")
    chunks = ToolUse(TOOLS, prefill).stream_ending(rest)
    (delta, none), (last, finish_reason) = chunks
    assert none is None and (last, finish_reason) == ({"delta": {}}, "tool_calls")
    (streamed,) = delta["delta"]["tool_calls"]
    assert streamed["index"] == 0 and streamed["function"] == {
        "name": "get_weather",
        "arguments": '{"city": "Paris"}',
    }
    # Without tools (tool_choice "none"), a call's text is only text.
    message, finish = ToolUse().answer(Generation(text=CALL_TEXT, finish_reason="length"))
    assert (message.content, message.tool_calls, finish) == (CALL_TEXT, None, "length")


# ---- requests the server refuses ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        ({"tool_choice": "required"}, "tool_choice", "only allowed when tools are given"),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
            "names function 'nope'",
        ),
        ({"tools": [WEATHER, WEATHER]}, "tools", "a second function named 'get_weather'"),
        (
            {"messages": [USER, {"role": "tool", "content": "sunny"}]},
            "messages",
            "a tool message needs tool_call_id",
        ),
        ({"messages": [{"role": "user"}]}, "messages", "content is required"),
    ],
)
def test_a_request_that_cannot_be_honoured_is_refused(
    api: Any, fields: dict[str, Any], param: str, words: str
) -> None:
    body = {"model": "tiny", "messages": [USER], **fields}
    response = api.client.post("/v1/chat/completions", headers=api.headers(), json=body)
    assert_error(response, 400, param=param, words=words)


# ---- end to end: fine-tune on tool calls, call through the SDK ---------------------------------

CITIES = [
    "Paris", "London", "Berlin", "Madrid", "Rome", "Vienna", "Prague", "Lisbon", "Dublin", "Oslo",
    "Helsinki", "Warsaw", "Athens", "Budapest", "Brussels", "Amsterdam", "Zurich", "Geneva",
]  # fmt: skip
ASKS = ["{city} weather?", "{city}: is it raining?", "{city} - how warm is it today?"]
# Each city is asked about in two of the ways in training; the third is held out.
HELD_OUT = [ASKS[i % 3].format(city=city) for i, city in enumerate(CITIES)]
CHATS = [("hello", "Hello! Ask me about the weather."), ("thanks", "You are welcome.")]
SMALL_TOOLS = [WEATHER]
SDK_TOOLS: Any = SMALL_TOOLS  # the SDK's TypedDicts, as plain dicts
HYPERPARAMETERS = {
    "n_epochs": 20, "batch_size": 4, "learning_rate": 3e-3,
    "warmup_ratio": 0.0, "weight_decay": 0.0, "max_seq_length": 256,
}  # fmt: skip


def training_rows() -> list[dict[str, Any]]:
    def asked(question: str, answer: dict[str, Any]) -> dict[str, Any]:
        messages = [{"role": "user", "content": question}, answer]
        return {"messages": messages, "tools": SMALL_TOOLS}

    questions = [
        (ask.format(city=city), city)
        for city in CITIES
        for ask in ASKS
        if ask.format(city=city) not in HELD_OUT
    ]
    calling = [asked(q, calls(call("get_weather", {"city": city}))) for q, city in questions]
    chatting = [asked(q, {"role": "assistant", "content": a}) for q, a in CHATS]
    return calling + chatting * 4


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """`tunehouse run` with a tiny random Llama whose tokenizer knows the task's words."""
    from tests.stacks import embedded_stack
    from tests.tiny_models import build_causal_lm

    tmp = tmp_path_factory.mktemp("tools")
    # Tokens for the rendered prompt's words (the tools listing, the calls), so rows are short.
    prompts = [ask.format(city=city) for city in CITIES for ask in ASKS]
    calls_made = [call_text("get_weather", {"city": city}) for city in CITIES]
    texts = [tools_prompt(SMALL_TOOLS), *prompts, *calls_made, *(a for _, a in CHATS)]
    base = build_causal_lm(tmp / "tiny", texts * 2)
    env = {"TUNEHOUSE_BASE_MODELS": json.dumps({"tiny-llama": str(base)})}
    with embedded_stack(tmp, env) as (stack, key):
        yield Service(stack.base_url, key)


def ask_weather(service: Service, model: str, question: str, **options: Any) -> Any:
    return service.client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": question}],
        tools=SDK_TOOLS,
        temperature=0,
        max_tokens=48,
        **options,
    ).choices[0]


@pytest.mark.slow
def test_a_model_fine_tuned_on_tool_calls_calls_them_through_the_sdk(service: Service) -> None:
    held_out = HELD_OUT[:6]  # questions asked in a way training never asked about that city
    before = [ask_weather(service, "tiny-llama", q) for q in held_out[:2]]
    assert all(c.finish_reason != "tool_calls" and not c.message.tool_calls for c in before)
    # The untrained model, made to start a call, writes a malformed one: its text comes back.
    malformed = ask_weather(service, "tiny-llama", held_out[0], tool_choice="required")
    assert malformed.finish_reason in ("stop", "length") and not malformed.message.tool_calls
    assert malformed.message.content.startswith('<tool_call>{"name": "')

    job = service.train(
        model="tiny-llama",
        training_file=service.upload(training_rows(), "tools.jsonl"),
        seed=0,
        method={"type": "supervised", "supervised": {"hyperparameters": HYPERPARAMETERS}},
    )
    model = job.fine_tuned_model
    for question in held_out:
        choice = ask_weather(service, model, question)
        assert choice.finish_reason == "tool_calls", choice
        assert choice.message.content is None
        (tool_call,) = choice.message.tool_calls
        assert tool_call.id.startswith("call_") and tool_call.type == "function"
        assert tool_call.function.name == "get_weather"
        arguments = json.loads(tool_call.function.arguments)
        assert isinstance(arguments.get("city"), str), arguments

    # Streamed: the same call, as OpenAI streams it (tool_calls deltas, then the finish).
    question = held_out[0]
    chunks: list[Any] = list(
        service.client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": question}],
            tools=SDK_TOOLS,
            temperature=0,
            max_tokens=48,
            stream=True,
        )
    )
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    streamed = [tc for d in deltas for tc in d.tool_calls or ()]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    unstreamed = ask_weather(service, model, question).message.tool_calls
    assert [(tc.function.name, tc.function.arguments) for tc in streamed] == [
        (tc.function.name, tc.function.arguments) for tc in unstreamed
    ]

    # A named tool_choice makes even small talk a call of that function.
    named = {"type": "function", "function": {"name": "get_weather"}}
    for choice in (named, "required"):
        forced = ask_weather(service, model, "hello", tool_choice=choice)
        assert forced.finish_reason == "tool_calls", forced
        assert forced.message.tool_calls[0].function.name == "get_weather"
    # tool_choice "none": no tools in the prompt, no calls read from the answer.
    unforced = ask_weather(service, model, question, tool_choice="none")
    assert unforced.message.tool_calls is None and unforced.finish_reason != "tool_calls"
