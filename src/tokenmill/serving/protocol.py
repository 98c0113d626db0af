"""OpenAI's request and response bodies as pydantic models: field names, types, defaults and ranges as in
OpenAI's API reference. Requests allow extra fields (SDKs send fields we do not use; the engine's own knobs
arrive the same way) but are strict about types, as OpenAI is (`"max_tokens": "4"` is refused), and every
number has bounds that the engine, the database and the standard library can hold; responses are built here
and nowhere else. These models are also the OpenAPI schema's, so they are the documentation."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

MAX_INT32 = 2**31 - 1
"""Upper bound of token counts and similar integers: far above any context window, far below overflow."""
MIN_INT64, MAX_INT64 = -(2**63), 2**63 - 1

# -- requests --------------------------------------------------------------------------------------


class OpenAIRequest(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)


TokenId = Annotated[int, Field(ge=0, le=MAX_INT32)]
"""A prompt given as token ids; whether an id is in the model's vocabulary is checked against the model."""


class StreamOptions(OpenAIRequest):
    include_usage: bool = False


class ContentPart(OpenAIRequest):
    """One element of a content array. Only "text" parts can be served; others get a 400 naming them."""

    type: str
    text: str | None = None


FunctionName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
"""OpenAI's rule for function names; it also keeps them safe inside prompts and grammars."""


class FunctionCall(OpenAIRequest):
    name: str
    arguments: str
    """The arguments object as JSON text, as the model wrote it."""


class ToolCall(OpenAIRequest):
    """A call an earlier assistant turn made, sent back in the conversation history."""

    id: str
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(OpenAIRequest):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    """Assistant messages only: the calls that turn made (its content is then usually null)."""
    tool_call_id: str | None = None
    """Tool messages only (and required there): which call this message answers."""


class FunctionDefinition(OpenAIRequest):
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None
    """A JSON schema for the arguments object; None: a function without arguments."""
    strict: bool | None = None
    """Accepted for OpenAI's clients; the arguments always match the schema, strict or not."""


class ChatTool(OpenAIRequest):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(OpenAIRequest):
    name: str


class NamedToolChoice(OpenAIRequest):
    type: Literal["function"]
    function: NamedFunction


class JSONSchemaFormat(OpenAIRequest):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    """None: any JSON object."""
    strict: bool | None = None
    """Accepted for OpenAI's clients; the output always matches the schema, strict or not."""


class TextFormat(OpenAIRequest):
    type: Literal["text"]


class JSONObjectFormat(OpenAIRequest):
    type: Literal["json_object"]


class JSONSchemaResponseFormat(OpenAIRequest):
    type: Literal["json_schema"]
    json_schema: JSONSchemaFormat


ResponseFormat = Annotated[
    TextFormat | JSONObjectFormat | JSONSchemaResponseFormat, Field(discriminator="type")
]

MAX_GUIDE_CHARS = 100_000
"""Bounds a regex or a choice; a JSON schema's size is bounded by the request body limit."""


class GenerationRequest(OpenAIRequest):
    """The fields chat and completions share, including the engine's extra knobs (top_k, min_p,
    repetition_penalty) and vLLM's `guided_*` fields that OpenAI clients send as extra body fields."""

    model: str
    n: int = Field(1, ge=1, le=128)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    stop: str | list[str] | None = None
    max_tokens: int | None = Field(None, ge=1, le=MAX_INT32)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    seed: int | None = Field(None, ge=MIN_INT64, le=MAX_INT64)
    user: str | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    top_k: int | None = Field(None, ge=-1, le=MAX_INT32)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None
    """A JSON schema (as an object or as JSON text) the output must match."""
    guided_regex: str | None = Field(None, min_length=1, max_length=MAX_GUIDE_CHARS)
    guided_choice: list[Annotated[str, Field(min_length=1, max_length=MAX_GUIDE_CHARS)]] | None = Field(
        None, min_length=1, max_length=1024
    )


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_INT32)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[ChatTool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    """None: "auto" when tools are given, else "none"."""
    parallel_tool_calls: bool | None = None
    """None: true, as OpenAI."""
    functions: list[dict[str, Any]] | None = None
    """OpenAI's legacy function calling: refused (use `tools`)."""


class CompletionRequest(GenerationRequest):
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    max_tokens: int | None = Field(None, ge=1, le=MAX_INT32)
    """None: the server's default for the model (`CompletionLimits`)."""
    echo: bool | None = False
    suffix: str | None = None
    logprobs: int | None = Field(None, ge=0, le=20)
    best_of: int | None = Field(None, ge=1, le=128)


class EmbeddingRequest(OpenAIRequest):
    model: str
    input: str | list[str] | list[TokenId] | list[list[TokenId]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, le=MAX_INT32)
    user: str | None = None


# -- responses -------------------------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobEntry(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprobEntry] | None
    refusal: None = None


class ResponseFunctionCall(BaseModel):
    name: str
    arguments: str
    """The arguments object as compact JSON text (the client parses it)."""


class ResponseToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ResponseFunctionCall


def _is_none(value: object) -> bool:
    return value is None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    """None when the answer is tool calls and nothing else."""
    refusal: None = None
    tool_calls: list[ResponseToolCall] | None = Field(None, exclude_if=_is_none)
    """Omitted when the model called no tool, as OpenAI does."""


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class DeltaFunctionCall(BaseModel):
    name: str | None = Field(None, exclude_if=_is_none)
    arguments: str | None = Field(None, exclude_if=_is_none)


class DeltaToolCall(BaseModel):
    """A piece of one tool call: the first carries `id`, `type` and the name (with arguments ""), the
    following ones only argument fragments; a client joins them by `index`."""

    index: int
    id: str | None = Field(None, exclude_if=_is_none)
    type: Literal["function"] | None = Field(None, exclude_if=_is_none)
    function: DeltaFunctionCall


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # OpenAI's deltas carry only what changed: {"role": ..., "content": ""} first, then {"content": ...}.
        return {key: value for key, value in handler(self).items() if value is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    """The legacy (completions) logprobs shape: parallel lists, one entry per token."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class Completion(BaseModel):
    """Both the response and (with `usage` None and deltas in `text`) each streamed chunk."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage | None = None


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "tokenmill"
    type: Literal["chat", "embedding"]
    """Not in OpenAI's schema (clients ignore it): which endpoints the model serves."""
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# -- errors ----------------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    message: str
    type: str
    """invalid_request_error, authentication_error, permission_error, rate_limit_error, insufficient_quota
    or server_error."""
    param: str | None
    """The request field the error is about, e.g. "messages[0].content"."""
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error body: every 4xx and 5xx answer of the API has this shape."""

    error: ErrorDetail


# -- probes ----------------------------------------------------------------------------------------


class HealthStatus(BaseModel):
    status: Literal["ok"] = "ok"


class ReadyStatus(BaseModel):
    status: Literal["ready", "loading", "failed"]
    models: list[str]
    error: str | None = None
    """Which models failed to load, and why."""
