"""Text that crosses a boundary must be valid Unicode. JSON (`"\\ud800"`) and argv (undecodable bytes) can put a
lone UTF-16 surrogate into a Python `str`; it cannot be encoded as UTF-8, so a tokenizer, a database driver or
a response writer would fail on it far from where it came in. Each edge refuses it with a message naming the
field (`invalid_text_reason`, `first_invalid_in_json`), and output that shows stored text never fails on it
(`printable`)."""

from __future__ import annotations

import re

_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_IN_JSON = re.compile(rb"\\u[dD][89abcdefABCDEF]|\xed[\xa0-\xbf]")
"""Where a surrogate can come from in JSON text: a \\uD800-\\uDFFF escape, or its UTF-8 bytes (invalid UTF-8,
which Python's json decoder lets through). Valid pairs, e.g. an escaped emoji, match too."""


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


def may_hold_surrogates(raw_json: bytes) -> bool:
    """False when the JSON text surely decodes to valid text: one C-speed scan spares most requests the walk
    of `first_invalid_in_json` over their parsed body. JSON in UTF-16 or UTF-32 (NUL bytes at the start,
    which json.loads also accepts) is not scanned: it always gets the walk."""
    if b"\x00" in raw_json[:4]:
        return True
    if b"\\u" not in raw_json and b"\xed" not in raw_json:  # substring search, far faster than the regex
        return False
    return _SURROGATE_IN_JSON.search(raw_json) is not None


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
