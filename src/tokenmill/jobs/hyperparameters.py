"""A fine-tuning job's hyperparameters, as OpenAI's API names them (n_epochs, batch_size,
learning_rate_multiplier, each a number or "auto") plus the LoRA settings, and the rule that turns "auto" into
numbers once the training set's size is known.

The auto rule is tuned for small data sets on CPU (a 135M-parameter model taught a new fact from ~20 examples
in well under two minutes on two cores), the common case of a self-hosted first fine-tune:

- batch_size: a fifth of the examples, between 1 and 8: a small set still gets five optimizer steps an
  epoch, and 8 keeps a step's memory and time modest on CPU.
- n_epochs: 3, or more for a tiny set, so the run makes at least MIN_AUTO_STEPS optimizer steps (enough
  for LoRA to learn a short answer by heart); never more than 10.
- learning_rate = BASE_LEARNING_RATE x learning_rate_multiplier (auto: 1.0).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Literal

AUTO = "auto"
Auto = Literal["auto"]

BASE_LEARNING_RATE = 1e-3
"""LoRA adapters tolerate (and small data sets need) a far larger rate than full fine-tuning."""
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""Every linear layer of a Llama/Mistral/Qwen2 block: the modules the serving engine can adapt."""
MAX_LORA_RANK = 64
"""The serving engine's default `max_lora_rank`: a larger adapter could not be served."""
MIN_AUTO_STEPS = 15
MAX_AUTO_EPOCHS = 10
MIN_AUTO_EPOCHS = 3
MAX_AUTO_BATCH_SIZE = 8


class InvalidHyperparameters(ValueError):
    """A hyperparameter is out of range; `field` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"hyperparameters.{field}: {message}")
        self.field = field


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True, slots=True)
class Hyperparameters:
    n_epochs: int | Auto = AUTO
    batch_size: int | Auto = AUTO
    learning_rate_multiplier: float | Auto = AUTO
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = TARGET_MODULES
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_epochs != AUTO and not (_is_int(self.n_epochs) and 1 <= self.n_epochs <= 50):
            raise InvalidHyperparameters("n_epochs", 'must be "auto" or an integer from 1 to 50')
        if self.batch_size != AUTO and not (_is_int(self.batch_size) and 1 <= self.batch_size <= 256):
            raise InvalidHyperparameters("batch_size", 'must be "auto" or an integer from 1 to 256')
        multiplier = self.learning_rate_multiplier
        if multiplier != AUTO and not (_is_number(multiplier) and 0 < multiplier <= 10):
            raise InvalidHyperparameters(
                "learning_rate_multiplier", 'must be "auto" or a number above 0 and at most 10'
            )
        if not (_is_int(self.lora_rank) and 1 <= self.lora_rank <= MAX_LORA_RANK):
            raise InvalidHyperparameters("lora_rank", f"must be an integer from 1 to {MAX_LORA_RANK}")
        if not (_is_number(self.lora_alpha) and self.lora_alpha > 0):
            raise InvalidHyperparameters("lora_alpha", "must be a number above 0")
        if not (_is_number(self.lora_dropout) and 0 <= self.lora_dropout < 1):
            raise InvalidHyperparameters("lora_dropout", "must be a number from 0 up to (not including) 1")
        targets = self.target_modules
        if isinstance(targets, str) or not isinstance(targets, tuple | list) or not targets:
            raise InvalidHyperparameters("target_modules", f"must be a non-empty list among {TARGET_MODULES}")
        unknown = [name for name in targets if name not in TARGET_MODULES]
        if unknown or len(set(targets)) != len(targets):
            raise InvalidHyperparameters(
                "target_modules",
                f"{unknown or 'duplicates'}: each must appear once and be one of {', '.join(TARGET_MODULES)}",
            )
        object.__setattr__(self, "target_modules", tuple(targets))
        if not (_is_int(self.seed) and 0 <= self.seed < 2**31):
            raise InvalidHyperparameters("seed", "must be an integer from 0 to 2147483647")

    def as_dict(self) -> dict:
        """As JSON stores them (the job's row); `from_dict` reads them back."""
        return {**asdict(self), "target_modules": list(self.target_modules)}

    @classmethod
    def from_dict(cls, values: dict) -> Hyperparameters:
        return cls(**{**values, "target_modules": tuple(values.get("target_modules", TARGET_MODULES))})

    def resolved(self, num_examples: int) -> Hyperparameters:
        """These hyperparameters with every "auto" replaced by a number for a set of `num_examples` (the
        module docstring gives the rule); the job reports them so a run can be repeated."""
        if num_examples < 1:
            raise ValueError("num_examples must be at least 1")
        batch_size = self.batch_size
        if batch_size == AUTO:
            batch_size = max(1, min(MAX_AUTO_BATCH_SIZE, num_examples // 5))
        n_epochs = self.n_epochs
        if n_epochs == AUTO:
            steps_per_epoch = math.ceil(num_examples / batch_size)
            n_epochs = min(MAX_AUTO_EPOCHS, max(MIN_AUTO_EPOCHS, math.ceil(MIN_AUTO_STEPS / steps_per_epoch)))
        multiplier = 1.0 if self.learning_rate_multiplier == AUTO else float(self.learning_rate_multiplier)
        return replace(self, n_epochs=n_epochs, batch_size=batch_size, learning_rate_multiplier=multiplier)

    @property
    def learning_rate(self) -> float:
        """The optimizer's peak learning rate; only for resolved hyperparameters."""
        if self.learning_rate_multiplier == AUTO:
            raise ValueError('learning_rate_multiplier is "auto": call resolved() first')
        return BASE_LEARNING_RATE * float(self.learning_rate_multiplier)
