"""LoRA adapters served beside their base model: reading and validating PEFT adapters, and the bounded slot
cache that holds the ones in use.

A request names its adapter with a `LoRARequest` in its SamplingParams. The adapter is validated when the
request is submitted (cached per adapter), loaded into a slot when the scheduler admits the request (the
least recently used idle adapter is evicted when the slots are full), and pinned while any running sequence
uses it. The per-row math lives in `tokenmill.models.lora_layers`.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tokenmill.engine.sampling_params import InvalidRequestError
from tokenmill.models.lora_layers import PARENT, PEFT_TARGETS, LoRAStack, LoRAStep, target_shapes

logger = logging.getLogger(__name__)

_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$"
)
# adapter_config.json settings that change the math in ways this engine does not implement.
_UNSUPPORTED_SETTINGS = {
    "use_dora": "DoRA",
    "modules_to_save": "modules_to_save (fully trained extra modules)",
    "trainable_token_indices": "trainable tokens",
    "layer_replication": "layer_replication",
    "target_parameters": "target_parameters",
    "lora_bias": "lora_bias",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "fan_in_fan_out": "fan_in_fan_out (transposed Conv1D weights)",
}


@dataclass(frozen=True, slots=True)
class LoRARequest:
    name: str
    """Unique adapter id, e.g. "ft:smollm2:acme:support:ftjob_ab12" or a --lora name."""
    path: str
    """A PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors)."""


@dataclass(frozen=True, slots=True)
class AdapterModule:
    layer: int
    target: str
    rank: int
    scale: float
    key_a: str
    key_b: str


@dataclass(frozen=True, slots=True)
class AdapterSpec:
    """A validated adapter: where each A/B pair goes and how it is scaled (no weights)."""

    weights_file: Path
    rank: int
    modules: tuple[AdapterModule, ...]


def _refuse(lora: LoRARequest, reason: str) -> InvalidRequestError:
    return InvalidRequestError(f"model: LoRA adapter {lora.name!r}: {reason}", param="model")


def _pattern_value(patterns: dict, module_key: str, default: float) -> float:
    """PEFT's rank_pattern/alpha_pattern: a key matches a module name that ends with it (a regex)."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module_key):
            return value
    return default


def read_adapter(
    lora: LoRARequest, shapes: dict[str, tuple[int, int]], num_layers: int, max_rank: int
) -> AdapterSpec:
    """Validate a PEFT adapter directory against the base model without reading its weights."""
    from safetensors import safe_open

    directory = Path(lora.path)
    if not directory.is_dir():
        raise _refuse(lora, f"no adapter directory at {lora.path!r}")
    try:
        config = json.loads((directory / "adapter_config.json").read_text())
    except (OSError, ValueError) as error:
        raise _refuse(lora, f"cannot read adapter_config.json ({error})") from error
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        peft_type = config.get("peft_type") if isinstance(config, dict) else None
        raise _refuse(lora, f"peft_type {peft_type!r} is not LORA; only LoRA adapters are served")
    for setting, what in _UNSUPPORTED_SETTINGS.items():
        if config.get(setting):
            raise _refuse(lora, f"{what} is not supported")
    if config.get("bias", "none") != "none":
        raise _refuse(lora, f"bias={config['bias']!r} is not supported (only 'none')")
    targets = config.get("target_modules")
    if isinstance(targets, list | tuple):
        unsupported = sorted(set(targets) - set(PEFT_TARGETS))
        if unsupported:
            raise _refuse(
                lora,
                f"target modules {', '.join(unsupported)} are not supported "
                f"(supported: {', '.join(PEFT_TARGETS)})",
            )
    weights_file = directory / "adapter_model.safetensors"
    if not weights_file.is_file():
        raise _refuse(lora, "adapter_model.safetensors is missing (only the safetensors format is read)")
    try:
        with safe_open(str(weights_file), framework="pt") as handle:
            tensor_shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
    except Exception as error:  # noqa: BLE001 - any unreadable file is the adapter's fault
        raise _refuse(lora, f"cannot read adapter_model.safetensors ({error})") from error
    pairs: dict[tuple[int, str], dict[str, str]] = {}
    for key in tensor_shapes:
        match = _KEY.match(key)
        if match is None or match.group(3) not in PEFT_TARGETS or PARENT[match.group(3)] != match.group(2):
            raise _refuse(
                lora, f"tensor {key!r} adapts a module this engine cannot (only {', '.join(PEFT_TARGETS)})"
            )
        pairs.setdefault((int(match.group(1)), match.group(3)), {})[match.group(4)] = key
    if not pairs:
        raise _refuse(lora, "the adapter holds no LoRA weights")
    r = config.get("r", 8)  # PEFT's defaults
    alpha = config.get("lora_alpha", 8)
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    modules = []
    for (layer, target), keys in sorted(pairs.items()):
        if set(keys) != {"A", "B"}:
            raise _refuse(lora, f"layer {layer} {target}: lora_A and lora_B must both be present")
        if layer >= num_layers:
            raise _refuse(lora, f"layer {layer} does not exist; the base model has {num_layers} layers")
        shape_a, shape_b = tensor_shapes[keys["A"]], tensor_shapes[keys["B"]]
        rank = shape_a[0] if len(shape_a) == 2 else -1
        in_features, out_features = shapes[target]
        if shape_a != (rank, in_features) or shape_b != (out_features, rank):
            raise _refuse(
                lora,
                f"layer {layer} {target}: shapes {shape_a} and {shape_b} do not fit the base model "
                f"({in_features} -> {out_features}); was it trained for another model?",
            )
        module_key = f"model.layers.{layer}.{PARENT[target]}.{target}"
        module_r = _pattern_value(rank_pattern, module_key, r)
        if rank != module_r:
            raise _refuse(lora, f"layer {layer} {target}: rank {rank} differs from the configured {module_r}")
        if rank > max_rank:
            raise _refuse(lora, f"rank {rank} exceeds this engine's max_lora_rank {max_rank}")
        module_alpha = _pattern_value(alpha_pattern, module_key, alpha)
        scale = module_alpha / math.sqrt(rank) if config.get("use_rslora") else module_alpha / rank
        modules.append(AdapterModule(layer, target, rank, scale, keys["A"], keys["B"]))
    return AdapterSpec(weights_file, max(m.rank for m in modules), tuple(modules))


class LoRASlots:
    """At most `max_loras` adapters in memory; the least recently used idle one makes room for a new one.

    `can_pin` / `pin` / `unpin` are the scheduler's (it pins an adapter for each running sequence);
    `check` is thread-safe, so the serving layer can validate from a worker thread while the engine runs.
    """

    def __init__(
        self, model: nn.Module, max_loras: int, max_lora_rank: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.max_loras = max_loras
        self.max_lora_rank = max_lora_rank
        self.shapes = target_shapes(model)
        self.num_layers = len(model.layers)
        self.stack = LoRAStack(model, max_loras, dtype, device)
        self.loaded: OrderedDict[LoRARequest, int] = OrderedDict()
        """Adapter -> slot, least recently used first."""
        self.pins: dict[LoRARequest, int] = {}
        self.num_loads = 0
        self._specs: dict[LoRARequest, AdapterSpec] = {}
        self._lock = threading.Lock()

    def check(self, lora: LoRARequest) -> AdapterSpec:
        """Raises InvalidRequestError(param="model") for an adapter this engine cannot serve."""
        if not isinstance(lora, LoRARequest):
            raise InvalidRequestError("model: the adapter must be a LoRARequest", param="model")
        with self._lock:
            spec = self._specs.get(lora)
        if spec is None:
            spec = read_adapter(lora, self.shapes, self.num_layers, self.max_lora_rank)
            with self._lock:
                self._specs[lora] = spec
        return spec

    def can_pin(self, lora: LoRARequest) -> bool:
        return lora in self.loaded or len(self.loaded) < self.max_loras or self._victim() is not None

    def pin(self, lora: LoRARequest) -> None:
        if lora not in self.loaded:
            self._load(lora)
        self.loaded.move_to_end(lora)
        self.pins[lora] = self.pins.get(lora, 0) + 1

    def unpin(self, lora: LoRARequest) -> None:
        count = self.pins[lora] - 1
        if count:
            self.pins[lora] = count
        else:
            del self.pins[lora]

    def slot(self, lora: LoRARequest) -> int:
        return self.loaded[lora]

    def step(self, segments: list[tuple[int, int, LoRARequest]]) -> LoRAStep:
        """The step's grouping for (first token, number of tokens, adapter) of each adapted sequence."""
        return self.stack.step([(first, num, self.loaded[lora]) for first, num, lora in segments])

    def _victim(self) -> LoRARequest | None:
        return next((lora for lora in self.loaded if lora not in self.pins), None)

    def _load(self, lora: LoRARequest) -> None:
        from safetensors import safe_open

        spec = self.check(lora)
        victim = None
        if len(self.loaded) < self.max_loras:
            slot = next(s for s in range(self.max_loras) if s not in self.loaded.values())
        else:
            victim = self._victim()
            if victim is None:
                raise RuntimeError("no LoRA slot is free; the scheduler should have checked can_pin")
            slot = self.loaded.pop(victim)
        self.stack.ensure_rank(spec.rank)
        self.stack.clear(slot)
        with safe_open(str(spec.weights_file), framework="pt", device="cpu") as handle:
            for module in spec.modules:
                lora_a = handle.get_tensor(module.key_a).float()
                lora_b = handle.get_tensor(module.key_b).float() * module.scale
                self.stack.write(slot, module.layer, module.target, lora_a, lora_b)
        self.loaded[lora] = slot
        self.num_loads += 1
        evicted = f", evicting {victim.name!r}" if victim is not None else ""
        logger.info("LoRA adapter %r (rank %d) loaded into slot %d%s", lora.name, spec.rank, slot, evicted)
