"""tokenmill: a self-hostable Model-as-a-Service platform. Public API: LLM, AsyncLLM, SamplingParams, RequestOutput."""

from tokenmill.engine.request import CompletionOutput, RequestOutput
from tokenmill.engine.sampling_params import SamplingParams

__all__ = ["LLM", "AsyncLLM", "SamplingParams", "RequestOutput", "CompletionOutput"]


def __getattr__(name: str) -> object:
    # The engines import torch; keep `import tokenmill` (and the CLI's --help) fast.
    if name == "LLM":
        from tokenmill.engine.llm_engine import LLM

        return LLM
    if name == "AsyncLLM":
        from tokenmill.engine.async_engine import AsyncLLM

        return AsyncLLM
    raise AttributeError(name)
