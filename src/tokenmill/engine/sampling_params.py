"""Per-request sampling settings, validated once at the edge so the engine never meets a bad value."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # engine.lora imports torch; this module stays light for the CLI and the HTTP layer
    from tokenmill.engine.lora import LoRARequest


class InvalidRequestError(ValueError):
    """A request the engine refuses before doing any work; `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


def _check(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise InvalidRequestError(f"{param}: {message}", param=param)


class Priority(StrEnum):
    """Who a request is served for. Live API calls are interactive: someone is waiting on each token. Batch-API
    lines are batch: they only fill the capacity interactive work leaves, and are the first to give memory
    back. The class changes when a sequence runs, never what it generates."""

    INTERACTIVE = "interactive"
    BATCH = "batch"


GUIDANCE_KINDS = ("json_schema", "json_object", "regex", "choice", "lark")


@dataclass(frozen=True, slots=True)
class Guidance:
    """What the output must match, enforced token by token: a constrained sequence can only sample tokens
    that keep its text a prefix of a match, and it ends ("stop") as soon as the match is complete.

    `spec` is plain text so that equal constraints compare (and cache) equal whatever their origin; the
    grammar itself is compiled by the engine (`check_guidance`), which knows the tokenizer.
    """

    kind: str
    """One of GUIDANCE_KINDS."""
    spec: str
    """json_schema: the schema as canonical JSON text; json_object: ""; regex: the pattern; choice: a JSON
    array of the allowed strings; lark: a grammar in llguidance's Lark dialect."""
    param: str = field(default="response_format", compare=False)
    """The API field the constraint came from, named in errors."""

    def __post_init__(self) -> None:
        _check(self.kind in GUIDANCE_KINDS, self.param, f"unknown guidance kind {self.kind!r}")
        _check(isinstance(self.spec, str), self.param, "the guidance spec must be text")

    @classmethod
    def json_schema(cls, schema: dict, param: str = "response_format") -> Guidance:
        """Compact JSON text, so equal schemas share one compiled grammar. Keys keep their order: the
        order of "properties" is the order the fields are generated in (a "reasoning" field placed
        before "answer" must come first), so schemas that differ only in it are different constraints."""
        _check(isinstance(schema, dict), param, "the JSON schema must be a JSON object")
        try:
            spec = json.dumps(schema, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as error:
            raise InvalidRequestError(
                f"{param}: the JSON schema is not valid JSON ({error})", param=param, code="invalid_grammar"
            ) from error
        return cls("json_schema", spec, param)

    @classmethod
    def json_object(cls, param: str = "response_format") -> Guidance:
        return cls("json_object", "", param)

    @classmethod
    def regex(cls, pattern: str, param: str) -> Guidance:
        _check(isinstance(pattern, str), param, "the regular expression must be a string")
        return cls("regex", pattern, param)

    @classmethod
    def choice(cls, options: list[str], param: str) -> Guidance:
        _check(
            isinstance(options, list | tuple)
            and len(options) > 0
            and all(isinstance(option, str) and option for option in options),
            param,
            "must be a non-empty list of non-empty strings",
        )
        return cls("choice", json.dumps(list(options), ensure_ascii=False), param)

    @classmethod
    def lark(cls, grammar: str, param: str) -> Guidance:
        """A whole grammar, for constraints no schema can say: tool calling is free text that must turn
        into a schema-checked call once the model writes the call tag (tokenmill.serving.tool_format)."""
        _check(
            isinstance(grammar, str) and bool(grammar.strip()),
            param,
            "the grammar must be a non-empty string",
        )
        return cls("lark", grammar, param)


@dataclass(frozen=True, slots=True)
class SamplingParams:
    n: int = 1
    """Independent samples per prompt; they share the prompt's KV blocks through the prefix cache."""
    temperature: float = 1.0
    """0 means greedy (argmax)."""
    top_p: float = 1.0
    top_k: int = 0
    """0 (or -1) disables top-k."""
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    """Multiplicative, over prompt and output tokens (as transformers does); 1 disables it."""
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    """Makes the request's samples reproducible, independent of what else is in the batch."""
    max_tokens: int = 16
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    """Strings that end generation; they are not part of the output text."""
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    """None: no logprobs; k >= 0: the sampled token's logprob plus the k most likely tokens."""
    skip_special_tokens: bool = True
    guidance: Guidance | None = None
    """Constrain the output to a JSON schema, a regex or a choice (structured output)."""
    lora: LoRARequest | None = None
    """The LoRA adapter to generate with; None: the base model. Validated by the engine at submission."""
    priority: Priority = Priority.INTERACTIVE
    """The scheduling class (a Priority or its string value): batch work yields to interactive work."""
    extra: dict[str, object] = field(default_factory=dict, compare=False)
    """Free-form caller data that travels with the request (never read by the engine)."""

    def __post_init__(self) -> None:
        # Accept lists/strings from callers but keep the object immutable and hashable-friendly.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop or ()))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        _check(isinstance(self.n, int) and 1 <= self.n <= 128, "n", "must be an integer from 1 to 128")
        _check(0.0 <= self.temperature <= 100.0, "temperature", "must be between 0 and 100")
        _check(0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]")
        _check(
            isinstance(self.top_k, int) and self.top_k >= 0, "top_k", "must be 0, -1 or a positive integer"
        )
        _check(0.0 <= self.min_p <= 1.0, "min_p", "must be in [0, 1]")
        _check(0.0 < self.repetition_penalty <= 10.0, "repetition_penalty", "must be in (0, 10]")
        _check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", "must be between -2 and 2")
        _check(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", "must be between -2 and 2")
        _check(isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens", "must be at least 1")
        _check(
            isinstance(self.min_tokens, int) and 0 <= self.min_tokens <= self.max_tokens,
            "min_tokens",
            "must be between 0 and max_tokens",
        )
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings")
        _check(len(self.stop) <= 16, "stop", "at most 16 stop strings")
        _check(
            self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20),
            "logprobs",
            "must be an integer from 0 to 20",
        )
        _check(
            self.guidance is None
            or (isinstance(self.guidance, Guidance) and self.guidance.kind in GUIDANCE_KINDS),
            "guidance",
            f"must be a Guidance of one of the kinds {', '.join(GUIDANCE_KINDS)}",
        )
        _check(self.seed is None or isinstance(self.seed, int), "seed", "must be an integer")
        _check(
            self.priority in tuple(Priority),
            "priority",
            f"must be one of {', '.join(Priority)}",
        )
        object.__setattr__(self, "priority", Priority(self.priority))
        if self.lora is not None:
            from tokenmill.engine.lora import LoRARequest

            _check(isinstance(self.lora, LoRARequest), "model", "the adapter must be a LoRARequest")
        if self.logit_bias:
            _check(
                all(isinstance(t, int) and t >= 0 and -100 <= b <= 100 for t, b in self.logit_bias.items()),
                "logit_bias",
                "maps token ids to biases between -100 and 100",
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
