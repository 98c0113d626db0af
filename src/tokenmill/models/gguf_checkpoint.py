# Reads a llama.cpp GGUF checkpoint as if it were a Hugging Face one: a transformers config built from the
# GGUF metadata, and dequantized weights under HF parameter names in HF row order. Used by `loader.py`.

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf.quants import dequantize
from transformers import Gemma3TextConfig, LlamaConfig, PretrainedConfig, Qwen2Config

from tokenmill.models.errors import ModelLoadError

# GGUF `general.architecture` -> (config class, HF architecture name). llama.cpp writes Mistral as "llama".
_ARCHITECTURES: dict[str, tuple[type[PretrainedConfig], str]] = {
    "llama": (LlamaConfig, "LlamaForCausalLM"),
    "qwen2": (Qwen2Config, "Qwen2ForCausalLM"),
    "gemma3": (Gemma3TextConfig, "Gemma3ForCausalLM"),
}

_TOP_LEVEL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_MODULES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Gemma 3 has a norm before and after both attention and MLP, and per-head q/k norms; llama.cpp calls the
# one before the MLP `ffn_norm`, Llama's name for what HF calls post_attention_layernorm.
_GEMMA3_LAYER_MODULES = {
    **_LAYER_MODULES,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
}
_LAYER_MODULES_BY_ARCH = {"gemma3": _GEMMA3_LAYER_MODULES}
_TOKEN_ID_KEYS = {
    "bos_token_id": "tokenizer.ggml.bos_token_id",
    "eos_token_id": "tokenizer.ggml.eos_token_id",
    "pad_token_id": "tokenizer.ggml.padding_token_id",
    "unk_token_id": "tokenizer.ggml.unknown_token_id",
}
_LAYER_TENSOR = re.compile(r"blk\.(?P<layer>\d+)\.(?P<module>\w+)\.(?P<kind>weight|bias)")


def read_config(gguf_path: Path) -> PretrainedConfig:
    """The transformers config the checkpoint was converted from, rebuilt from GGUF metadata.

    Mirrors what `transformers` derives from the same file (checked in tests), so our model and the
    reference agree. `architectures` is filled in, which transformers leaves out, because the engine
    picks its model class from it.
    """
    reader = open_reader(gguf_path)
    arch = _architecture(reader, gguf_path)
    config_cls, hf_architecture = _ARCHITECTURES[arch]
    rope_scaling = _rope_scaling(reader, arch, gguf_path)

    def meta(key: str, default: Any = None) -> Any:
        value = _metadata(reader, f"{arch}.{key}", default)
        if value is None:
            raise ModelLoadError(f"{gguf_path}: GGUF metadata lacks `{arch}.{key}`; the file is incomplete")
        return value

    num_heads = meta("attention.head_count")
    hidden_size = meta("embedding_length")
    kwargs: dict[str, Any] = {
        "architectures": [hf_architecture],
        "vocab_size": meta("vocab_size", _array_length(reader, "tokenizer.ggml.tokens")),
        "hidden_size": hidden_size,
        "intermediate_size": meta("feed_forward_length"),
        "num_hidden_layers": meta("block_count"),
        "num_attention_heads": num_heads,
        "num_key_value_heads": meta("attention.head_count_kv", num_heads),
        "max_position_embeddings": meta("context_length"),
        "rms_norm_eps": meta("attention.layer_norm_rms_epsilon"),
        "rope_theta": meta("rope.freq_base", 10000.0),
        # llama.cpp drops `output.weight` when the head shares the embedding matrix.
        "tie_word_embeddings": all(tensor.name != "output.weight" for tensor in reader.tensors),
    }
    if arch == "llama":
        # Qwen2's head_dim is always hidden/heads; Llama-family checkpoints may set it apart.
        kwargs["head_dim"] = meta("rope.dimension_count", hidden_size // num_heads)
    if arch == "gemma3":
        kwargs.update(_gemma3_options(reader, meta, kwargs, rope_scaling))
    for config_key, gguf_key in _TOKEN_ID_KEYS.items():
        token_id = _metadata(reader, gguf_key)
        if token_id is not None:
            kwargs[config_key] = token_id
    return config_cls(**kwargs)


def _gemma3_options(
    reader: GGUFReader, meta: Callable[..., Any], common: dict[str, Any], rope_scaling: dict | None
) -> dict:
    """What llama.cpp's Gemma 3 reads or assumes beyond the common keys (llama_model::load_hparams): every
    6th layer global, the others local with rope base 10000 and no rope scaling; scores scaled by
    1/sqrt(head_dim), except in the 27B (62 layers): 1/sqrt(hidden/heads). transformers' GGUF loader keeps
    its config defaults for these, the same values for every size but the 27B, and ignores rope scaling,
    which llama.cpp applies to the global layers (Gemma 3 4B-27B: linear, factor 8) as the HF config did.
    """
    hidden_size, num_heads = common["hidden_size"], common["num_attention_heads"]
    head_dim = meta("attention.key_length", hidden_size // num_heads)
    global_rope = {"rope_type": "default", "rope_theta": common["rope_theta"], **(rope_scaling or {})}
    return {
        "head_dim": head_dim,
        "sliding_window": meta("attention.sliding_window"),
        "layer_types": [
            "full_attention" if (layer + 1) % 6 == 0 else "sliding_attention"
            for layer in range(common["num_hidden_layers"])
        ],
        "query_pre_attn_scalar": hidden_size // num_heads if common["num_hidden_layers"] == 62 else head_dim,
        "rope_parameters": {
            "full_attention": global_rope,
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
        # Not Gemma 3's, but passed on if a file sets them, so the model refuses or applies them.
        "final_logit_softcapping": _metadata(reader, "gemma3.final_logit_softcapping"),
        "attn_logit_softcapping": _metadata(reader, "gemma3.attn_logit_softcapping"),
    }


def read_chat_template(gguf_path: Path) -> str | None:
    """The `tokenizer.chat_template` metadata string, for tokenizers that came back without one."""
    return _metadata(open_reader(gguf_path), "tokenizer.chat_template")


def iter_weights(gguf_path: Path, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """Dequantized tensors under HF names and in HF layout, one at a time to bound peak memory.

    GGUF stores dims innermost-first, but `GGUFReader` already hands out numpy arrays in row-major
    (out_features, in_features) order, i.e. HF's order; only the rotary row order of Q/K differs.
    """
    reader = open_reader(gguf_path)
    arch = _architecture(reader, gguf_path)
    num_heads = _metadata(reader, f"{arch}.attention.head_count")
    num_kv_heads = _metadata(reader, f"{arch}.attention.head_count_kv", num_heads)
    for tensor in reader.tensors:
        hf_name, module = _hf_name(tensor.name, arch, gguf_path)
        try:
            array = dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as exc:
            kind = GGMLQuantizationType(tensor.tensor_type).name
            raise ModelLoadError(
                f"{gguf_path}: tensor {tensor.name} uses quantization {kind}, which the gguf package "
                "cannot dequantize; upgrade `gguf` or use a checkpoint quantized differently"
            ) from exc
        # Only llama.cpp's Llama converter permutes Q/K; its Qwen2 converter keeps HF's order.
        if arch == "llama" and module in ("attn_q", "attn_k"):
            array = _unpermute_rotary_rows(array, num_heads if module == "attn_q" else num_kv_heads)
        # llama.cpp's Gemma converters store norm weights as (1 + weight), the factor they apply; HF's Gemma
        # norms hold the offset from 1 (transformers' GGUF loader subtracts the 1 again too).
        if arch == "gemma3" and module.endswith("norm"):
            array = array - 1.0
        if not array.flags.writeable:
            array = array.copy()  # a view of the memory-mapped file: never hand that out as a tensor
        yield hf_name, torch.from_numpy(array).to(dtype)


def _unpermute_rotary_rows(rows: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (weights and biases alike) to get HF's q_proj/k_proj rows.

    HF rotates each head as two halves (`rotate_half` pairs row i with row i + head_dim/2), llama.cpp
    rotates adjacent pairs, so its converter interleaves the halves. One head, head_dim = 8:

        HF rows:    x0 x1 x2 x3 | y0 y1 y2 y3        (x_i rotates with y_i)
        GGUF rows:  x0 y0 x1 y1 x2 y2 x3 y3          GGUF row 2i + j = HF row j * head_dim/2 + i

    Viewing the GGUF rows as (head, i, j) and swapping to (head, j, i) restores HF's order.
    """
    head_dim = rows.shape[0] // num_heads
    per_head = rows.reshape(num_heads, head_dim // 2, 2, *rows.shape[1:])
    return per_head.swapaxes(1, 2).reshape(rows.shape)


def _hf_name(gguf_name: str, arch: str, gguf_path: Path) -> tuple[str, str]:
    """(HF parameter name, llama.cpp module name) for one GGUF tensor; unknown tensors are an error
    rather than skipped, since a silently missing tensor would leave random weights in the model."""
    if gguf_name in _TOP_LEVEL_NAMES:
        return _TOP_LEVEL_NAMES[gguf_name], gguf_name.split(".")[0]
    modules = _LAYER_MODULES_BY_ARCH.get(arch, _LAYER_MODULES)
    match = _LAYER_TENSOR.fullmatch(gguf_name)
    if match is None or match["module"] not in modules:
        raise ModelLoadError(
            f"{gguf_path}: GGUF tensor {gguf_name!r} has no counterpart in tokenmill's {arch} model; "
            "this checkpoint's architecture variant is not supported"
        )
    hf_module = modules[match["module"]]
    return f"model.layers.{match['layer']}.{hf_module}.{match['kind']}", match["module"]


def _architecture(reader: GGUFReader, gguf_path: Path) -> str:
    arch = _metadata(reader, "general.architecture")
    if arch not in _ARCHITECTURES:
        raise ModelLoadError(
            f"{gguf_path}: GGUF architecture {arch!r} is not supported; supported GGUF architectures: "
            f"{', '.join(_ARCHITECTURES)} (for other models use a Hugging Face safetensors directory)"
        )
    return arch


def _rope_scaling(reader: GGUFReader, arch: str, gguf_path: Path) -> dict | None:
    """GGUF keeps rope scaling as llama.cpp needs it (e.g. a `rope_freqs` tensor for Llama 3.1), which
    mostly does not map back to a transformers `rope_parameters` reliably; refuse instead of running with
    silently wrong positions. The exception: Gemma 3's linear scaling of its global layers (a factor)."""
    scaling = _metadata(reader, f"{arch}.rope.scaling.type", "none")
    has_freqs = any(tensor.name == "rope_freqs.weight" for tensor in reader.tensors)
    if scaling == "none" and not has_freqs:
        return None
    factor = _metadata(reader, f"{arch}.rope.scaling.factor")
    if arch == "gemma3" and scaling == "linear" and factor is not None and not has_freqs:
        return {"rope_type": "linear", "factor": float(factor)}
    raise ModelLoadError(
        f"{gguf_path}: the checkpoint uses rope scaling ({scaling}), which tokenmill cannot rebuild from "
        "GGUF metadata; serve the model's Hugging Face safetensors directory instead"
    )


def _metadata(reader: GGUFReader, key: str, default: Any = None) -> Any:
    """One scalar or string metadata value (as a Python object), or `default` when absent."""
    field = reader.fields.get(key)
    if field is None or not field.data:
        return default
    part = field.parts[field.data[0]]
    if field.types[0] == GGUFValueType.STRING:
        return bytes(part).decode("utf-8")
    if field.types[0] == GGUFValueType.ARRAY:
        raise ModelLoadError(f"GGUF metadata `{key}` is an array where a single value was expected")
    return part[0].item()


def _array_length(reader: GGUFReader, key: str) -> int | None:
    field = reader.fields.get(key)
    return None if field is None else len(field.data)


def open_reader(gguf_path: Path) -> GGUFReader:
    """A parsed GGUF file. Parsing the metadata (~50k token strings) takes 1-3 s, and config and weights
    both need it, so readers are kept per file version; they hold only a memory map, no tensor data."""
    try:
        stat = gguf_path.stat()
    except OSError as exc:
        raise ModelLoadError(f"{gguf_path}: cannot read the GGUF file ({exc.strerror})") from exc
    return _cached_reader(str(gguf_path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)
def _cached_reader(gguf_path: str, mtime_ns: int, size_bytes: int) -> GGUFReader:
    # mtime and size are part of the key so a file replaced in place is parsed again.
    try:
        return GGUFReader(gguf_path)
    except (ValueError, OSError) as exc:
        raise ModelLoadError(f"{gguf_path}: not a readable GGUF file ({exc})") from exc
