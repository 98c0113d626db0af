"""The two ways a model can be refused, in a module of their own so that every reader of checkpoints
(loader, GGUF reader, model families) can raise them without importing each other."""

from collections.abc import Iterator
from contextlib import contextmanager


class ModelLoadError(ValueError):
    """A model source cannot be used; the message names what is wrong and how to fix it."""


class UnsupportedModelError(ModelLoadError):
    """The checkpoint asks for something this engine does not implement (an architecture, or an option of
    one); the message names it and what is supported."""


@contextmanager
def refusals_named(architecture: str) -> Iterator[None]:
    """Names the architecture in an UnsupportedModelError raised by a shared building block (e.g. a rope
    type RotaryEmbedding does not implement), so the message says which model it refused."""
    try:
        yield
    except UnsupportedModelError as error:
        if str(error).startswith(architecture):
            raise
        raise UnsupportedModelError(f"{architecture}: {error}") from error
