"""Text that crosses a boundary must be valid Unicode. JSON (`"\\ud800"`) and argv (undecodable bytes) can put a
lone UTF-16 surrogate into a Python `str`; it cannot be encoded as UTF-8, so a tokenizer, a database driver or
a response writer would fail on it far from where it came in. Each edge refuses it with a message naming the
field (`invalid_text_reason`, `first_invalid_in_json`), and output that shows stored text never fails on it
(`printable`)."""

from __future__ import annotations

import re

_SURROGATE = re.compile("[\ud800-\udfff]")


def invalid_text_reason(text: str) -> str | None:
    """Why `text` cannot be accepted, phrased to follow a field name ("messages[0].content must be ..."), or
    None when it is valid."""
    match = _SURROGATE.search(text)
    if match is None:
        return None
    return (
        f"must be valid Unicode text: it holds a lone surrogate (U+{ord(match.group()):04X}) "
        f"at character {match.start()}"
    )


def first_invalid_in_json(value: object, path: str = "") -> tuple[str, str] | None:
    """The first invalid string in a parsed JSON value, object keys included: (its path, written as error
    bodies write `param`, e.g. "messages[0].content"; the reason), or None."""
    if isinstance(value, str):
        reason = invalid_text_reason(value)
        return None if reason is None else (path, reason)
    if isinstance(value, dict):
        for key, item in value.items():
            reason = invalid_text_reason(key)
            if reason is not None:
                return path, f"keys {reason}"
            found = first_invalid_in_json(item, f"{path}.{key}" if path else key)
            if found is not None:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = first_invalid_in_json(item, f"{path}[{index}]")
            if found is not None:
                return found
    return None


def printable(text: str) -> str:
    """`text` with every lone surrogate replaced by U+FFFD: for showing text that was stored before the edges
    refused it, never for storing."""
    return _SURROGATE.sub("\ufffd", text)
