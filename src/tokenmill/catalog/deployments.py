"""`models.yaml`: the models one `tokenmill serve --config` runs and how each appears in the model square.
Everything is checked when the file is loaded, strictly (no "2048" for 2048, no unknown keys), so a typo
stops the server at start with one message naming the file, the model and the field, instead of surfacing
as a wrong price or a missing model hours later."""

from __future__ import annotations

import difflib
import re
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    model_validator,
)
from yaml.constructor import ConstructorError

from tokenmill.catalog.fleet_model import Autoscaling
from tokenmill.config import ConfigError, EngineConfig
from tokenmill.platform.errors import InvalidAmount, InvalidArgument
from tokenmill.platform.money import parse_units
from tokenmill.platform.pricing import MAX_PRICE_MICROS_PER_MTOK, MICROS_PER_UNIT
from tokenmill.platform.validation import text

if TYPE_CHECKING:
    from pydantic_core import ErrorDetails

_Limits = TypeVar("_Limits")

MAX_ID_CHARS = 200
"""As long as a model name the price table accepts."""
MAX_FEE_BPS = 10_000
_SIZE = re.compile(r"^(\d+)\s*([kmgt]?)(i?b)?$", re.IGNORECASE)


class _AtField(ValueError):
    """A rule that spans fields (checked after them), raised with the path of the field to blame, so the
    message points at `shared_with` rather than at the whole listing."""

    def __init__(self, loc: tuple[str | int, ...], message: str) -> None:
        super().__init__(message)
        self.loc = loc


def _text(max_len: int, *, allow_empty: bool = False) -> AfterValidator:
    """The platform's text rules (valid Unicode, no NUL, bounded, stripped): listings end up in its tables."""

    def check(value: str) -> str:
        try:
            return text("value", value, max_len=max_len, allow_empty=allow_empty)
        except InvalidArgument as exc:
            raise ValueError(str(exc).removeprefix("value: ")) from None

    return AfterValidator(check)


def _byte_size(value: object) -> object:
    """512M / 2G / 1GiB (powers of 1024), as `--kv-cache-memory` reads them; integers pass through."""
    if not isinstance(value, str):
        return value
    match = _SIZE.match(value.strip())
    if match is None:
        raise ValueError(f"{value!r} is not a size such as 268435456, 512M or 2G")
    return int(match.group(1)) * 1024 ** " kmgt".index(match.group(2).lower() or " ")


def _amount(value: object) -> object:
    """Currency units per 1M tokens -> its exact decimal text. YAML reads 0.10 as a float, whose shortest
    repr ("0.1") is the number that was typed, so numbers are as exact as strings; anything finer than a
    micro is refused by `parse_units`, never rounded."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return value  # the str type check refuses it with the usual message
    amount = value.strip() if isinstance(value, str) else format(Decimal(repr(value)), "f")
    if amount.startswith("-"):
        raise ValueError("must not be negative")
    try:
        micros = parse_units(amount, "value", allow_zero=True)
    except InvalidAmount as exc:
        raise ValueError(str(exc).removeprefix("value: ")) from None
    if micros > MAX_PRICE_MICROS_PER_MTOK:
        raise ValueError(f"must be at most {MAX_PRICE_MICROS_PER_MTOK // MICROS_PER_UNIT} per 1M tokens")
    return amount


ModelId = Annotated[str, _text(MAX_ID_CHARS)]
Name = Annotated[str, _text(200)]
TagText = Annotated[str, _text(50)]
Amount = Annotated[str, BeforeValidator(_amount)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class EngineSettings(_Strict):
    """The `tokenmill serve` engine flags, per model; unset fields keep the server's (or the engine's)
    value. Their ranges are `tokenmill.config`'s, checked by building the engine config at load time."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = None
    max_model_len: int | None = None
    kv_cache_memory: Annotated[int | None, BeforeValidator(_byte_size)] = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    target_tpot_ms: float | None = None
    block_size: int | None = None
    device: str | None = None
    seed: int | None = None
    quantization: Literal["none", "int8"] | None = None
    chat_template: Annotated[str, _text(65536)] | None = None
    """Jinja text or a file path (config.ModelConfig.chat_template), e.g. for a base model."""


class AutoscalingSettings(_Strict):
    """`fleet_model.Autoscaling`, which checks the bounds against each other."""

    min_replicas: Annotated[int, Field(ge=0)] = 1
    max_replicas: Annotated[int, Field(ge=1)] = 1
    target_in_flight: Annotated[int, Field(ge=1)] = 8
    scale_up_delay_s: Annotated[float, Field(ge=0)] = 0.0
    scale_down_delay_s: Annotated[float, Field(ge=0)] = 60.0

    def policy(self) -> Autoscaling:
        try:
            return Autoscaling(**self.model_dump())
        except ConfigError as exc:
            field, _, message = str(exc).partition(": ")
            raise _AtField(("autoscaling", field), message) from None


class ResourceSettings(_Strict):
    """What each replica asks of a Ray node, when `tokenmill serve --ray-address` places replicas as Ray
    actors (`cluster.ray_engine.ReplicaResources`)."""

    num_cpus: Annotated[float, Field(gt=0)] = 1
    num_gpus: Annotated[float, Field(ge=0)] = 0
    memory: Annotated[int | None, BeforeValidator(_byte_size), Field(gt=0)] = None
    """Default: the engine's estimate of its weights plus KV cache."""


class LimitSettings(_Strict):
    """Per-model `CompletionLimits`. A field left out keeps the server's value; an explicit null means what
    None means there (OpenAI's behaviour / only the context window limits)."""

    default_max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None

    def apply_to(self, server_limits: _Limits) -> _Limits:
        """`server_limits` (the server's `CompletionLimits`) with the fields this file sets replaced."""
        return replace(server_limits, **{name: getattr(self, name) for name in self.model_fields_set})


class PriceSettings(_Strict):
    """Currency units per 1M tokens, kept as the exact decimal text; zero is allowed (free one way)."""

    input: Amount
    output: Amount


def _price_form(value: object) -> str | None:
    """The union's tag: from the YAML when validating, from the model when serializing."""
    if value == "free":
        return "free"
    return "amounts" if isinstance(value, dict | PriceSettings) else None


_PRICE_TAGS = ("free", "amounts")
PriceField = Annotated[
    Annotated[Literal["free"], Tag("free")] | Annotated[PriceSettings, Tag("amounts")],
    Discriminator(
        _price_form,
        custom_error_type="price_form",
        custom_error_message="must be free or {input: ..., output: ...} (currency units per 1M tokens)",
    ),
]


class ListingSettings(_Strict):
    """How the model appears in the model square; every field has a default, so a bare deployment is
    listed publicly under its id."""

    display_name: Name | None = None
    """None: the model id."""
    description: Annotated[str, _text(4000, allow_empty=True)] = ""
    provider: Name | None = None
    """The organization that sells the model; None: the platform itself."""
    tags: list[TagText] = []
    license: Annotated[str, _text(100, allow_empty=True)] = ""
    price: PriceField | None = None
    """None: keep the price already stored (a new model starts free); set it here to make the file the
    source of truth."""
    visibility: Literal["public", "private", "shared"] = "public"
    shared_with: list[Name] = []
    status: Literal["draft", "published"] = "published"
    platform_fee_bps: Annotated[int, Field(ge=0, le=MAX_FEE_BPS)] | None = None
    """The platform's share of each sale in basis points; None: the server's default."""

    @model_validator(mode="after")
    def _sharing(self) -> ListingSettings:
        if self.visibility == "shared" and not self.shared_with:
            raise _AtField(("shared_with",), "must name at least one organization when visibility is shared")
        if self.visibility != "shared" and self.shared_with:
            raise _AtField(
                ("shared_with",), f"only with visibility: shared (visibility is {self.visibility})"
            )
        return self

    def price_micros(self) -> tuple[int, int] | None:
        """(input, output) micros per 1M tokens, or None when the file leaves the price alone."""
        if self.price is None:
            return None
        if self.price == "free":
            return 0, 0
        return (
            parse_units(self.price.input, "listing.price.input", allow_zero=True),
            parse_units(self.price.output, "listing.price.output", allow_zero=True),
        )


class Deployment(_Strict):
    id: ModelId
    source: Annotated[str, _text(4096)]
    """A Hugging Face directory, a .gguf file or a built-in name."""
    task: Literal["chat", "embedding"] = "chat"
    pinned: bool = False
    """Never unloaded; otherwise loaded on demand and unloaded (least recently used first) when idle and
    its memory is needed."""
    replicas: Annotated[int, Field(ge=1)] = 1
    """With autoscaling: how many each load starts with (default: min_replicas, at least 1)."""
    autoscaling: AutoscalingSettings | None = None
    resources: ResourceSettings = ResourceSettings()
    max_queue: Annotated[int, Field(ge=0)] | None = None
    """Requests that may wait per replica beyond the ones running; more get 503 at once. None: the
    server's --max-queue."""
    engine: EngineSettings = EngineSettings()
    limits: LimitSettings | None = None
    listing: ListingSettings = ListingSettings()

    @model_validator(mode="after")
    def _fits_task(self) -> Deployment:
        if self.task == "embedding":
            for name in ("engine", "limits", "replicas", "autoscaling", "resources"):
                if name in self.model_fields_set:
                    raise _AtField((name,), "only chat models take it; remove it from this embedding model")
            return self
        try:
            EngineConfig.from_kwargs(self.source, **self.engine_kwargs())
        except ConfigError as exc:
            field, _, message = str(exc).partition(": ")
            raise _AtField(("engine", field), message) from None
        policy = self.autoscaling_policy()
        if policy is not None:
            if self.pinned and policy.min_replicas == 0:
                raise _AtField(
                    ("autoscaling", "min_replicas"), "0 unloads an idle model; a pinned one never is"
                )
            if not max(1, policy.min_replicas) <= self.num_replicas <= policy.max_replicas:
                raise _AtField(("replicas",), "must lie between autoscaling's min_replicas and max_replicas")
        return self

    def autoscaling_policy(self) -> Autoscaling | None:
        return None if self.autoscaling is None else self.autoscaling.policy()

    @property
    def num_replicas(self) -> int:
        """Replicas each load starts: `replicas`, or with autoscaling and no `replicas`, its minimum."""
        if self.autoscaling is None or "replicas" in self.model_fields_set:
            return self.replicas
        return max(1, self.autoscaling.min_replicas)

    @property
    def max_replicas(self) -> int:
        return self.num_replicas if self.autoscaling is None else self.autoscaling.max_replicas

    def engine_kwargs(self) -> dict[str, object]:
        """The settings this file sets, as `AsyncLLM(model, **kwargs)` / `EngineConfig.from_kwargs` take
        them; merge them over the server's flags."""
        return self.engine.model_dump(exclude_none=True)


class DeploymentsFile(_Strict):
    models: list[Deployment]

    @model_validator(mode="after")
    def _ids_unique(self) -> DeploymentsFile:
        if not self.models:
            raise _AtField(("models",), "must declare at least one model")
        first_index: dict[str, int] = {}
        for index, deployment in enumerate(self.models):
            seen = first_index.setdefault(deployment.id, index)
            if seen != index:
                raise _AtField(
                    ("models", index, "id"), f"{deployment.id!r} is already the id of models[{seen}]"
                )
        return self


def load_deployments(path: Path) -> DeploymentsFile:
    """Raises one `ConfigError` listing every problem found, one per line, each naming the file."""
    data = _read_yaml(path)
    if data is None:
        raise ConfigError(f"{path}: the file is empty; it must declare a `models:` list")
    try:
        return DeploymentsFile.model_validate(data)
    except ValidationError as exc:
        raise ConfigError("\n".join(_describe(path, data, error) for error in exc.errors())) from None


# -- reading ---------------------------------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys; a repeated `price:` is a mistake to report, not resolve."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if duplicate:
                raise ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> object:
    try:
        source = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    try:
        return yaml.load(source, Loader=_UniqueKeyLoader)  # a SafeLoader: no arbitrary objects
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise ConfigError(f"{path}: {where}YAML syntax error: {exc.problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: YAML syntax error: {exc}") from None


# -- messages --------------------------------------------------------------------------------------


def _describe(path: Path, data: object, error: ErrorDetails) -> str:
    """'models.yaml: models[1] (id 'qwen'): listing.price.input: must not be negative'."""
    cause = (error.get("ctx") or {}).get("error")
    loc = list(error["loc"]) + list(cause.loc if isinstance(cause, _AtField) else ())
    loc = [part for i, part in enumerate(loc) if not (part in _PRICE_TAGS and i and loc[i - 1] == "price")]
    parts = [f"{path}:"]
    root: type[BaseModel] = DeploymentsFile
    if len(loc) >= 2 and loc[0] == "models" and isinstance(loc[1], int):
        parts.append(f"models[{loc[1]}]{_id_note(data, loc[1])}:")
        root, loc = Deployment, loc[2:]
    if loc:
        field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
        parts.append(f"{field}:")
    parts.append(_message(error, cause, root, loc))
    return " ".join(parts)


def _id_note(data: object, index: int) -> str:
    models = data.get("models") if isinstance(data, dict) else None
    item = models[index] if isinstance(models, list) and index < len(models) else None
    model_id = item.get("id") if isinstance(item, dict) else None
    return f" (id {_short(model_id)})" if isinstance(model_id, str) else ""


def _message(error: ErrorDetails, cause: object, root: type[BaseModel], loc: list[str | int]) -> str:
    kind = error["type"]
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        return f"unknown field{_suggestion(root, loc)}"
    if kind == "value_error" and cause is not None:
        return str(cause)
    if kind in ("model_type", "dict_type"):
        return f"must be a mapping (key: value lines), not {_short(error['input'])}"
    if kind == "price_form":
        return f"{error['msg']}, not {_short(error['input'])}"
    if kind == "literal_error":
        return f"must be {error.get('ctx', {}).get('expected')}, not {_short(error['input'])}"
    message = error["msg"].replace("Input should be", "must be", 1)
    return f"{message}, not {_short(error['input'])}"


def _suggestion(root: type[BaseModel], loc: list[str | int]) -> str:
    """The field an unknown one is probably a typo of, or the fields allowed there."""
    model: type[BaseModel] | None = root
    for part in loc[:-1]:
        if model is None or isinstance(part, int):
            continue
        info = model.model_fields.get(part)
        model = _model_in(info.annotation) if info is not None else None
    if model is None or not loc:
        return ""
    allowed = list(model.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
    return f"; did you mean {close[0]!r}?" if close else f"; expected one of: {', '.join(allowed)}"


def _model_in(annotation: object) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) + getattr(annotation, "__metadata__", ()):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _short(value: object) -> str:
    shown = repr(value)
    return shown if len(shown) <= 60 else shown[:57] + "..."
