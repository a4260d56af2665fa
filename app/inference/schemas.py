"""OpenAI's Completions, Chat Completions and Embeddings shapes, plus our predictions route.

Requests accept (and ignore) OpenAI parameters that do not change what a local model does, like
``user``; parameters that would change the output but are not supported are refused by name.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.core.settings import Quantization

# Bounds of our own (OpenAI's where it has them): the characters of one text (tokenizers
# truncate to the model's context, but only after reading it all), the messages of a chat, the
# prompts of a completion request and the samples of each. The server's settings bound the
# work further: prompts × n, and the tokens generated in all (app/inference/bounds.py).
MAX_TEXT_CHARS = 100_000
MAX_MESSAGES = 1024
MAX_PROMPTS = 64
MAX_N = 16
# torch.manual_seed takes a 64-bit seed; n samples use seed, seed + 1, ...
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1

Text = Annotated[str, Field(max_length=MAX_TEXT_CHARS)]
# Tunehouse's extension of /v1/predictions and /v1/embeddings: the precision of the forward pass.
QUANTIZATION = Field(
    default=None,
    description=(
        "Tunehouse extension: 'int8' runs a classifier or an encoder with int8 linear layers "
        "(faster on CPU, scores change slightly), 'none' in full precision; default: the "
        "server's TUNEHOUSE_INFERENCE_QUANTIZATION."
    ),
)


class StreamOptions(BaseModel):
    include_usage: bool = False


class TextPart(BaseModel):
    type: Literal["text"]
    text: Text


# Tool calling (docs/tool-calling.md): OpenAI's function tools and calls, with bounds of ours.
MAX_TOOLS = 128
FunctionName = Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
CallId = Annotated[str, Field(min_length=1, max_length=256)]


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: FunctionName
    description: Text | None = None
    parameters: dict[str, Any] | None = Field(default=None, description="a JSON schema object")
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: FunctionName


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class CalledFunction(BaseModel):
    name: FunctionName
    arguments: Text = Field(description="the arguments, a string holding a JSON object")


class ToolCall(BaseModel):
    id: CallId
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    # None only for an assistant message that calls tools.
    content: Text | Annotated[list[TextPart], Field(max_length=MAX_MESSAGES)] | None = None
    name: str | None = Field(default=None, max_length=256)
    tool_calls: list[ToolCall] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_call_id: CallId | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def as_template_message(self) -> dict[str, Any]:
        """The message as app/inference/tool_calls.py renders it (OpenAI's shape)."""
        message: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            message["tool_calls"] = [call.model_dump() for call in self.tool_calls]
            message["content"] = self.text() or None
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str = Field(min_length=1, max_length=320)
    # At most the server's max_new_tokens, and within max_tokens_per_request for all the
    # choices together, checked by the route.
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    stop: Text | list[Text] | None = None
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Accepted but not supported when set to something that would change the answer.
    logprobs: bool | int | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes at most 4 non-empty sequences")
        return value

    def stop_sequences(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[Tool] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: ToolChoice | None = Field(
        default=None,
        description=(
            "'none', 'auto' (the default with tools), 'required', or a named function: "
            "'required' and a named function prefill the call's opening (docs/tool-calling.md)"
        ),
    )
    parallel_tool_calls: bool | None = Field(
        default=None, description="false: only the first of the model's calls is returned"
    )


class CompletionRequest(_Sampling):
    prompt: Text | Annotated[list[Text], Field(min_length=1, max_length=MAX_PROMPTS)]
    echo: bool = False
    suffix: Text | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


class ChatCompletionMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatCompletionMessage
    finish_reason: Literal["stop", "length", "tool_calls"]
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=320)
    input: Text | list[Text] = Field(description="one text or a list of texts")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1, le=65536)
    quantization: Quantization | None = QUANTIZATION


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


class PredictionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str = Field(min_length=1, max_length=320)
    # How many inputs: at most the server's max_prediction_inputs, checked by the route.
    input: Text | list[Text] | list[Annotated[list[float], Field(max_length=65536)]] = Field(
        description="one text, a list of texts, or rows of numbers for a tabular model"
    )
    quantization: Quantization | None = QUANTIZATION


class Prediction(BaseModel):
    index: int
    label: str | None = None
    score: float | None = None
    scores: dict[str, float] | None = None
    text: str | None = None


class PredictionUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class PredictionResponse(BaseModel):
    object: Literal["list"] = "list"
    model: str
    data: list[Prediction]
    usage: PredictionUsage
