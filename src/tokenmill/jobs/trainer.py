"""LoRA fine-tuning of a base model on a tokenized chat set, as pure library code: the job runner (a worker
process) hands it the data and callbacks and turns progress into job events; nothing here touches the
database, the Files store or billing.

The base model is built with transformers from the same files the server loads (`tokenmill.models.loader`:
the built-in GGUF SmolLM2, a .gguf file or a Hugging Face directory), so an adapter trained here fits the
served model exactly; peft wraps it with LoRA. The adapter is saved in PEFT's format, which both peft and the
serving engine (`tokenmill.engine.lora`) read.

A run is deterministic for a seed: the LoRA initialisation, the per-epoch shuffles (seeded by seed and
epoch) and dropout all derive from it, and checkpoints keep the optimizer and random state, so a run
resumed from a checkpoint ends with the same adapter as one that was never interrupted.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, PretrainedConfig

from tokenmill.jobs.hyperparameters import Hyperparameters
from tokenmill.jobs.training_data import IGNORE_INDEX, TrainingExample, TrainingSet
from tokenmill.models.errors import ModelLoadError
from tokenmill.models.loader import ModelSource, iter_weights, load_hf_config, resolve_model

TRAINABLE_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
"""Decoder-only chat models whose linear layers the serving engine can adapt per request."""
CHECKPOINTS_DIR = "checkpoints"
ADAPTER_DIR = "adapter"
_STATE_FILE = "trainer_state.pt"
EPOCH_VALID_EXAMPLES = 64
"""The per-epoch validation loss reads at most this many validation examples (the final, "full" one reads
them all): a large validation set must not double the cost of every epoch."""
MAX_GRAD_NORM = 1.0
WARMUP_FRACTION = 0.05
FINAL_LR_FRACTION = 0.1
"""The learning rate decays linearly from its peak to this fraction of it over the run."""


class UnsupportedBaseModel(ValueError):
    """The base model cannot be fine-tuned here (not found, or not a Llama/Mistral/Qwen2 chat model)."""


@dataclass(frozen=True, slots=True)
class TrainingCheckpoint:
    """The adapter at the end of an epoch. `path` is a PEFT adapter directory (loadable and servable as is)
    that also holds the optimizer and random state `train_lora(resume_from=path)` continues from."""

    step: int
    epoch: int
    """1-based: the epoch that just ended."""
    path: Path
    train_loss: float
    """Mean loss over the assistant tokens of that epoch."""
    valid_loss: float | None
    trained_tokens: int


@dataclass(frozen=True, slots=True)
class TrainingProgress:
    step: int
    """1-based number of the optimizer step just taken."""
    total_steps: int
    epoch: int
    """1-based epoch the step belongs to."""
    train_loss: float
    """Mean loss over the assistant tokens of this step's batch."""
    valid_loss: float | None
    """Set on an epoch's last step: the loss on (up to EPOCH_VALID_EXAMPLES of) the validation set."""
    trained_tokens: int
    """Every token read so far (prompts included): the figure billed."""
    checkpoint: TrainingCheckpoint | None = None
    """Set on an epoch's last step: the checkpoint just written."""


@dataclass(frozen=True, slots=True)
class TrainingResult:
    adapter_dir: Path | None
    """The final adapter (out_dir/adapter); None when the run was cancelled."""
    checkpoints: tuple[TrainingCheckpoint, ...]
    trained_tokens: int
    final_train_loss: float | None
    """Mean loss of the last epoch (of the last step taken, when cancelled); None if no step was taken."""
    final_valid_loss: float | None
    """The loss over the whole validation set at the end; None without one or when cancelled."""
    cancelled: bool
    steps: int
    hyperparameters: Hyperparameters
    """The hyperparameters used, with "auto" resolved."""


def check_base_model(base_model: str) -> None:
    """Raise UnsupportedBaseModel unless `base_model` can be fine-tuned. Reads the config only (cheap), so the
    API can refuse a job when it is created rather than when it runs."""
    _trainable_config(base_model)


def _trainable_config(base_model: str) -> tuple[ModelSource, PretrainedConfig]:
    try:
        source = resolve_model(base_model)
        config = load_hf_config(source)
    except ModelLoadError as exc:
        raise UnsupportedBaseModel(f"base model {base_model!r} cannot be fine-tuned: {exc}") from exc
    architecture = (getattr(config, "architectures", None) or ["?"])[0]
    if architecture not in TRAINABLE_ARCHITECTURES:
        raise UnsupportedBaseModel(
            f"base model {base_model!r} cannot be fine-tuned: architecture {architecture!r} is not one of "
            f"{', '.join(TRAINABLE_ARCHITECTURES)}"
        )
    return source, config


def load_base_model(base_model: str) -> torch.nn.Module:
    """The transformers model (float32) of `base_model`, with the weights the server loads."""
    source, config = _trainable_config(base_model)
    config.use_cache = False
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    params = dict(model.named_parameters())
    loaded = set()
    with torch.no_grad():
        for name, tensor in iter_weights(source, torch.float32):
            if name not in params:
                raise UnsupportedBaseModel(f"base model {base_model!r}: unexpected weight {name!r}")
            if params[name].shape != tensor.shape:
                raise UnsupportedBaseModel(
                    f"base model {base_model!r}: weight {name!r} has shape {tuple(tensor.shape)}, "
                    f"expected {tuple(params[name].shape)}"
                )
            params[name].copy_(tensor)
            loaded.add(name)
    missing = sorted(set(params) - loaded)
    if missing:  # tied embeddings share one Parameter, listed once by named_parameters
        raise UnsupportedBaseModel(f"base model {base_model!r}: weights missing for {', '.join(missing[:5])}")
    model.config.name_or_path = base_model  # recorded as base_model_name_or_path in adapter_config.json
    return model


def _lora_config(hyper: Hyperparameters) -> LoraConfig:
    return LoraConfig(
        r=hyper.lora_rank,
        lora_alpha=hyper.lora_alpha,
        lora_dropout=hyper.lora_dropout,
        target_modules=list(hyper.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def train_lora(
    base_model: str,
    train: TrainingSet,
    validation: TrainingSet | None,
    hyper: Hyperparameters,
    out_dir: Path,
    on_progress: Callable[[TrainingProgress], None],
    should_stop: Callable[[], bool],
    resume_from: Path | None = None,
) -> TrainingResult:
    """Train a LoRA adapter; see the module docstring. `should_stop` is asked before every step: when it says
    yes, the run ends at once with a result marked cancelled. Checkpoints go to out_dir/checkpoints/step-N at
    the end of every epoch, the final adapter to out_dir/adapter."""
    if train.num_examples == 0:
        raise ValueError("the training set is empty")
    hyper = hyper.resolved(train.num_examples)
    steps_per_epoch = math.ceil(train.num_examples / hyper.batch_size)
    total_steps = hyper.n_epochs * steps_per_epoch
    fingerprint = _fingerprint(base_model, train, hyper)

    torch.manual_seed(hyper.seed)  # the LoRA initialisation
    model = get_peft_model(load_base_model(base_model), _lora_config(hyper))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=hyper.learning_rate, weight_decay=0.0)

    step, trained_tokens = 0, 0
    checkpoints: list[TrainingCheckpoint] = []
    if resume_from is not None:
        step, trained_tokens, checkpoints = _resume(model, optimizer, Path(resume_from), fingerprint)
    last_loss = checkpoints[-1].train_loss if checkpoints else None

    for epoch in range(step // steps_per_epoch, hyper.n_epochs):
        order = torch.randperm(
            train.num_examples, generator=torch.Generator().manual_seed(hyper.seed + epoch)
        )
        loss_sum, loss_tokens = 0.0, 0
        for batch_start in range(0, train.num_examples, hyper.batch_size):
            if should_stop():
                return TrainingResult(
                    None, tuple(checkpoints), trained_tokens, last_loss, None, True, step, hyper
                )
            batch = [train.examples[i] for i in order[batch_start : batch_start + hyper.batch_size].tolist()]
            for group in optimizer.param_groups:
                group["lr"] = _learning_rate(hyper.learning_rate, step, total_steps)
            loss, count = _batch_loss(model, batch)
            count = max(1, count)  # 0 only if every trained token sat at position 0, with nothing before it
            optimizer.zero_grad(set_to_none=True)
            (loss / count).backward()
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            optimizer.step()
            step += 1
            trained_tokens += sum(len(example.input_ids) for example in batch)
            last_loss = loss.item() / count
            loss_sum, loss_tokens = loss_sum + loss.item(), loss_tokens + count
            valid_loss, checkpoint = None, None
            if batch_start + hyper.batch_size >= train.num_examples:  # the epoch's last step
                if validation is not None and validation.num_examples:
                    valid_loss = _mean_loss(model, validation.examples[:EPOCH_VALID_EXAMPLES], hyper)
                checkpoint = TrainingCheckpoint(
                    step=step,
                    epoch=epoch + 1,
                    path=Path(out_dir) / CHECKPOINTS_DIR / f"step-{step}",
                    train_loss=loss_sum / loss_tokens,
                    valid_loss=valid_loss,
                    trained_tokens=trained_tokens,
                )
                checkpoints.append(checkpoint)
                _save_checkpoint(model, optimizer, checkpoint, checkpoints, fingerprint)
            on_progress(
                TrainingProgress(
                    step, total_steps, epoch + 1, last_loss, valid_loss, trained_tokens, checkpoint
                )
            )

    final_valid = None
    if validation is not None and validation.num_examples:
        if validation.num_examples <= EPOCH_VALID_EXAMPLES and checkpoints[-1].valid_loss is not None:
            final_valid = checkpoints[-1].valid_loss  # the last epoch already read all of it
        else:
            final_valid = _mean_loss(model, validation.examples, hyper)
    adapter_dir = Path(out_dir) / ADAPTER_DIR
    model.save_pretrained(adapter_dir)
    return TrainingResult(
        adapter_dir,
        tuple(checkpoints),
        trained_tokens,
        checkpoints[-1].train_loss,
        final_valid,
        False,
        step,
        hyper,
    )


def _learning_rate(peak: float, step: int, total_steps: int) -> float:
    """A short linear warmup, then a linear decay to FINAL_LR_FRACTION of the peak; a function of the step
    only, so a resumed run needs no scheduler state."""
    warmup = max(1, round(WARMUP_FRACTION * total_steps))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return peak * (1.0 - (1.0 - FINAL_LR_FRACTION) * progress)


def _padded(batch: Sequence[TrainingExample]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input ids, attention mask, labels), right-padded to the longest example; padding is masked out of
    attention and loss (its id is never read)."""
    width = max(len(example.input_ids) for example in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(batch):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(example.labels)
    return ids, mask, labels


def _batch_loss(model: PeftModel, batch: Sequence[TrainingExample]) -> tuple[torch.Tensor, int]:
    """(summed cross entropy over the batch's trained tokens, how many there are). The output head runs only
    where a token is trained: the full-vocabulary logits of every position would dominate memory."""
    ids, mask, labels = _padded(batch)
    causal_lm = model.get_base_model()
    hidden = causal_lm.model(input_ids=ids, attention_mask=mask).last_hidden_state
    targets = labels[:, 1:]  # position t predicts token t + 1
    trained = targets != IGNORE_INDEX
    logits = causal_lm.get_output_embeddings()(hidden[:, :-1][trained])
    loss = torch.nn.functional.cross_entropy(logits.float(), targets[trained], reduction="sum")
    return loss, int(trained.sum())


def _batches(examples: Sequence[TrainingExample], size: int) -> Iterator[Sequence[TrainingExample]]:
    for start in range(0, len(examples), size):
        yield examples[start : start + size]


def _mean_loss(model: PeftModel, examples: Sequence[TrainingExample], hyper: Hyperparameters) -> float:
    """Loss per trained token over `examples`, without dropout and without touching the random state."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in _batches(examples, hyper.batch_size):
            loss, n = _batch_loss(model, batch)
            total, count = total + loss.item(), count + n
    model.train()
    return total / max(1, count)


def _fingerprint(base_model: str, train: TrainingSet, hyper: Hyperparameters) -> str:
    """What a checkpoint must have been trained on to be resumed: the base, the data and the settings."""
    digest = hashlib.sha256(repr((base_model, asdict(hyper))).encode())
    for example in train.examples:
        digest.update(repr((example.input_ids, example.labels)).encode())
    return digest.hexdigest()


def _save_checkpoint(
    model: PeftModel,
    optimizer: torch.optim.Optimizer,
    checkpoint: TrainingCheckpoint,
    checkpoints: list[TrainingCheckpoint],
    fingerprint: str,
) -> None:
    model.save_pretrained(checkpoint.path)
    state = {
        "fingerprint": fingerprint,
        "step": checkpoint.step,
        "trained_tokens": checkpoint.trained_tokens,
        "optimizer": optimizer.state_dict(),
        "rng": torch.get_rng_state(),
        "checkpoints": [{**asdict(c), "path": str(c.path)} for c in checkpoints],
    }
    torch.save(state, checkpoint.path / _STATE_FILE)


def _resume(
    model: PeftModel, optimizer: torch.optim.Optimizer, path: Path, fingerprint: str
) -> tuple[int, int, list[TrainingCheckpoint]]:
    """Load a checkpoint's adapter, optimizer and random state; returns (step, trained tokens, checkpoints
    so far)."""
    state_file = path / _STATE_FILE
    if not state_file.is_file():
        raise ValueError(f"resume_from: {path} is not a training checkpoint ({_STATE_FILE} is missing)")
    state = torch.load(state_file, weights_only=True)
    if state["fingerprint"] != fingerprint:
        raise ValueError(
            f"resume_from: {path} was trained on another base model, data set or hyperparameters"
        )
    set_peft_model_state_dict(model, load_file(path / "adapter_model.safetensors"))
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    checkpoints = [TrainingCheckpoint(**{**c, "path": Path(c["path"])}) for c in state["checkpoints"]]
    return state["step"], state["trained_tokens"], checkpoints
