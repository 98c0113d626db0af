"""JSON read a character at a time, for the tool-call parser (`tool_parser`): an arguments object rewritten
incrementally into exactly the canonical text json.dumps(json.loads(it), separators=(",", ":"),
ensure_ascii=False) gives, so a stream of fragments and the whole answer agree however the text is cut."""

from __future__ import annotations

import json
import math
import re


class Malformed(Exception):
    """The call being read is not well-formed (control flow between this module and tool_parser; never escapes them)."""


JSON_WS = frozenset(" \t\n\r")
_HEX = frozenset("0123456789abcdefABCDEF")
_SIMPLE_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_ENCODED = {chr(code): json.dumps(chr(code))[1:-1] for code in range(0x20)} | {'"': '\\"', "\\": "\\\\"}
"""How json.dumps(..., ensure_ascii=False) writes the characters it escapes; any other one is written as is,
so a string can be re-encoded a character at a time."""
_NUMBER_CHARS = frozenset("0123456789+-.eE")
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_LITERALS = {"t": "true", "f": "false", "n": "null"}


def _encode_string(text: str) -> str:
    return '"' + "".join(_ENCODED.get(ch, ch) for ch in text) + '"'


def _normalise_number(token: str) -> str:
    """As json.dumps(json.loads(token)) writes it; a number json.loads refuses (too many digits) or that
    overflows to infinity (not JSON) is malformed."""
    if not _NUMBER.fullmatch(token):
        raise Malformed
    try:
        value = json.loads(token)
    except ValueError as error:
        raise Malformed from error
    if isinstance(value, float) and not math.isfinite(value):
        raise Malformed
    return json.dumps(value)


class StringDecoder:
    """A JSON string's body (after its opening quote), decoded as strictly as json.loads does (no raw
    control characters, JSON escapes only), and with surrogate escapes only in pairs: a lone surrogate
    could not be sent as UTF-8."""

    __slots__ = ("closed", "_state", "_hex", "_high")

    def __init__(self) -> None:
        self.closed = False
        self._state = 0  # 0 plain, 1 after "\", 2 in \uXXXX, 3/4 expecting the "\" / "u" of a low surrogate
        self._hex = ""
        self._high = 0

    def feed(self, c: str) -> str:
        """The decoded character(s) that `c` completes ("" for none); sets `closed` at the closing quote."""
        state = self._state
        if state == 0:
            if c == '"':
                self.closed = True
                return ""
            if c == "\\":
                self._state = 1
                return ""
            if c < " ":
                raise Malformed
            return c
        if state == 1:
            if c == "u":
                self._state, self._hex = 2, ""
                return ""
            decoded = _SIMPLE_ESCAPES.get(c)
            if decoded is None:
                raise Malformed
            self._state = 0
            return decoded
        if state == 2:
            if c not in _HEX:
                raise Malformed
            self._hex += c
            if len(self._hex) < 4:
                return ""
            code = int(self._hex, 16)
            if self._high:
                high, self._high = self._high, 0
                if not 0xDC00 <= code <= 0xDFFF:
                    raise Malformed
                self._state = 0
                return chr(0x10000 + ((high - 0xD800) << 10) + (code - 0xDC00))
            if 0xD800 <= code <= 0xDBFF:
                self._high, self._state = code, 3
                return ""
            if 0xDC00 <= code <= 0xDFFF:
                raise Malformed
            self._state = 0
            return chr(code)
        if c != ("\\" if state == 3 else "u"):
            raise Malformed
        self._state, self._hex = (4, "") if state == 3 else (2, "")
        return ""


# JsonNormaliser states
_VALUE, _OBJ_KEY, _OBJ_FIRST, _COLON, _ARR_FIRST, _AFTER, _STRING, _KEY, _NUMBER_TOKEN, _LITERAL, _DONE = (
    range(11)
)


class JsonNormaliser:
    """One JSON object, a character at a time -> the text json.dumps(json.loads(it), separators=(",", ":"),
    ensure_ascii=False) writes, each piece appended to `out` as soon as it is final. Duplicate keys are
    malformed: json.loads would keep the last value at the first key's place, which cannot be streamed."""

    __slots__ = ("done", "_state", "_stack", "_string", "_key", "_token", "_literal")

    def __init__(self) -> None:
        self.done = False
        self._state = _VALUE
        self._stack: list[set[str] | None] = []  # per open container: an object's keys, None for an array
        self._string = StringDecoder()
        self._key: list[str] = []
        self._token = ""
        self._literal = ""

    def feed(self, c: str, out: list[str]) -> None:
        state = self._state
        if state == _STRING:
            decoded = self._string.feed(c)
            if self._string.closed:
                out.append('"')
                self._state = _AFTER
            elif decoded:
                out.append(_ENCODED.get(decoded, decoded))
            return
        if state == _KEY:
            decoded = self._string.feed(c)
            if not self._string.closed:
                self._key.append(decoded)
                return
            key, keys = "".join(self._key), self._stack[-1]
            if keys is None or key in keys:
                raise Malformed
            keys.add(key)
            out.append(_encode_string(key))
            self._state = _COLON
            return
        if state == _LITERAL:
            self._token += c
            if not self._literal.startswith(self._token):
                raise Malformed
            if self._token == self._literal:
                out.append(self._literal)
                self._state = _AFTER
            return
        if state == _NUMBER_TOKEN:
            if c in _NUMBER_CHARS:
                self._token += c
                return
            out.append(_normalise_number(self._token))
            state = self._state = _AFTER
        if c in JSON_WS:
            return
        if state == _VALUE:
            self._value(c, out)
        elif state == _AFTER:
            top = self._stack[-1]
            if c == ",":
                out.append(",")
                self._state = _OBJ_KEY if top is not None else _VALUE
            elif c == ("}" if top is not None else "]"):
                self._close(out)
            else:
                raise Malformed
        elif state in (_OBJ_KEY, _OBJ_FIRST):
            if c == '"':
                self._string, self._key, self._state = StringDecoder(), [], _KEY
            elif c == "}" and state == _OBJ_FIRST:
                self._close(out)
            else:
                raise Malformed
        elif state == _COLON:
            if c != ":":
                raise Malformed
            out.append(":")
            self._state = _VALUE
        elif state == _ARR_FIRST:
            if c == "]":
                self._close(out)
            else:
                self._value(c, out)
        else:  # _DONE: the caller stops feeding at `done`
            raise Malformed

    def _value(self, c: str, out: list[str]) -> None:
        if c == "{":
            out.append("{")
            self._stack.append(set())
            self._state = _OBJ_FIRST
        elif c == "[":
            out.append("[")
            self._stack.append(None)
            self._state = _ARR_FIRST
        elif c == '"':
            out.append('"')
            self._string, self._state = StringDecoder(), _STRING
        elif c == "-" or "0" <= c <= "9":
            self._token, self._state = c, _NUMBER_TOKEN
        elif c in _LITERALS:
            self._token, self._literal, self._state = c, _LITERALS[c], _LITERAL
        else:
            raise Malformed

    def _close(self, out: list[str]) -> None:
        out.append("}" if self._stack.pop() is not None else "]")
        if self._stack:
            self._state = _AFTER
        else:
            self._state, self.done = _DONE, True
