"""The model's output in the Hermes/Qwen tool-call format (`tool_format`) -> content and calls, whole
(`parse_tool_calls`) or while it streams (`ToolCallStream`).

Both parsers are one state machine read character by character, so what a stream delivers cannot depend on
how the text was cut into deltas: the only difference is when a call is committed (see ToolCallStream).
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenmill.serving.json_normaliser import JSON_WS, JsonNormaliser, Malformed, StringDecoder
from tokenmill.serving.tool_format import CALL_CLOSE, CALL_OPEN, ParsedCall

_CONTENT, _START, _ARGS = range(3)
"""Kinds of the scanner's output parts."""


@dataclass(frozen=True, slots=True)
class ContentDelta:
    text: str


@dataclass(frozen=True, slots=True)
class CallStart:
    """A call's function name is complete; its arguments follow as ArgumentsDelta with the same index."""

    index: int
    name: str


@dataclass(frozen=True, slots=True)
class ArgumentsDelta:
    index: int
    fragment: str


StreamEvent = ContentDelta | CallStart | ArgumentsDelta


# -- parsing -------------------------------------------------------------------------------------------


def parse_tool_calls(text: str) -> tuple[str | None, list[ParsedCall]]:
    """The final answer -> (content, calls in order).

    The content is all text outside well-formed calls, stripped (str.strip), None if that leaves nothing:
    text before the first call, and any text after or between calls (which unconstrained models write).
    A call that is not well-formed (bad JSON, other keys than "name" and "arguments", arguments that are
    not an object, no closing tag, ...) stays in the content as written, and the text after its opening
    tag is searched for calls again; nothing here raises. A call without "arguments" gets "{}".
    """
    scanner = _Scanner(commit_early=False)
    events = scanner.feed(text) + scanner.finish()
    content = "".join(event.text for event in events if isinstance(event, ContentDelta))
    names = [event.name for event in events if isinstance(event, CallStart)]
    arguments = [""] * len(names)
    for event in events:
        if isinstance(event, ArgumentsDelta):
            arguments[event.index] += event.fragment
    return content or None, [ParsedCall(name, args) for name, args in zip(names, arguments, strict=True)]


class ToolCallStream:
    """Incremental parser for streaming: feed text deltas as they are generated, get OpenAI-style events.

    Content is emitted as soon as it cannot be the beginning of `<tool_call>`, except whitespace, which is
    held until more content follows (so the content is stripped exactly as parse_tool_calls strips it).
    CallStart comes once the function name is complete, and the arguments follow in their final compact
    form: each piece is sent when it can no longer change (a number when it ends, a string's characters as
    they are decoded). So, for any split of a text into deltas, the concatenated ContentDelta texts equal
    parse_tool_calls' content ("" for None), and the CallStart names and joined ArgumentsDelta fragments
    equal its calls, for every text in which each call that gets as far as a complete name is well-formed,
    which includes everything tool_grammar allows. The exception is a call that breaks after its name
    was sent (only an unconstrained model, or a cut at max_tokens, does that): a stream cannot take the
    call back, so it stays a (partial) call, and the text from where it broke on is parsed as content,
    whereas parse_tool_calls keeps the whole call text as content.
    """

    def __init__(self) -> None:
        self._scanner = _Scanner(commit_early=True)

    def feed(self, delta: str) -> list[StreamEvent]:
        return self._scanner.feed(delta)

    def finish(self) -> list[StreamEvent]:
        """The held-back text, once generation has ended: a partial tag or an unfinished, uncommitted call
        becomes content; trailing whitespace is dropped."""
        return self._scanner.finish()


# _CallParser states
_C_OPEN, _C_KEY_START, _C_KEY, _C_COLON, _C_VALUE, _C_NAME, _C_ARGS, _C_AFTER, _C_POST, _C_CLOSE, _C_DONE = (
    range(11)
)


class _CallParser:
    """What follows `<tool_call>`: whitespace, {"name": "...", "arguments": {...}} (either order, nothing
    else), whitespace, `</tool_call>`. The name is known once its string closes; the arguments' canonical
    text is appended to `out` as it becomes final."""

    __slots__ = ("name", "done", "out", "_state", "_string", "_chars", "_key", "_seen", "_args", "_closed")

    def __init__(self) -> None:
        self.name: str | None = None
        self.done = False
        self.out: list[str] = []
        self._state = _C_OPEN
        self._string = StringDecoder()
        self._chars: list[str] = []
        self._key = ""
        self._seen: set[str] = set()
        self._args = JsonNormaliser()
        self._closed = 0

    def feed(self, c: str) -> None:
        state = self._state
        if state == _C_ARGS:
            self._args.feed(c, self.out)
            if self._args.done:
                self._state = _C_AFTER
            return
        if state in (_C_KEY, _C_NAME):
            decoded = self._string.feed(c)
            if not self._string.closed:
                self._chars.append(decoded)
                return
            text = "".join(self._chars)
            if state == _C_NAME:
                if not text:
                    raise Malformed
                self.name, self._state = text, _C_AFTER
            else:
                if text not in ("name", "arguments") or text in self._seen:
                    raise Malformed
                self._seen.add(text)
                self._key, self._state = text, _C_COLON
            return
        if state == _C_CLOSE:
            if c != CALL_CLOSE[self._closed]:
                raise Malformed
            self._closed += 1
            if self._closed == len(CALL_CLOSE):
                self._state, self.done = _C_DONE, True
            return
        if c in JSON_WS:
            return
        if state == _C_OPEN:
            if c != "{":
                raise Malformed
            self._state = _C_KEY_START
        elif state == _C_KEY_START:
            if c != '"':
                raise Malformed
            self._string, self._chars, self._state = StringDecoder(), [], _C_KEY
        elif state == _C_COLON:
            if c != ":":
                raise Malformed
            self._state = _C_VALUE
        elif state == _C_VALUE:
            if self._key == "name" and c == '"':
                self._string, self._chars, self._state = StringDecoder(), [], _C_NAME
            elif self._key == "arguments" and c == "{":
                self._args.feed(c, self.out)
                self._state = _C_ARGS
            else:
                raise Malformed
        elif state == _C_AFTER:
            if c == ",":
                self._state = _C_KEY_START
            elif c == "}":
                if self.name is None:
                    raise Malformed
                if "arguments" not in self._seen:
                    self.out.append("{}")
                self._state = _C_POST
            else:
                raise Malformed
        elif state == _C_POST:
            if c != CALL_CLOSE[0]:
                raise Malformed
            self._closed, self._state = 1, _C_CLOSE
        else:  # _C_DONE: the caller stops feeding at `done`
            raise Malformed


class _Scanner:
    """The state machine behind both parsers. `commit_early`: a call is emitted once its name is complete
    (streaming) rather than once its closing tag is (a whole answer, where a call that breaks later can
    still go back to being content)."""

    def __init__(self, commit_early: bool) -> None:
        self._commit_early = commit_early
        self._parts: list[tuple[int, int, str]] = []  # (kind, call index, text) since the last take
        self._started = False  # whether non-whitespace content was emitted (leading whitespace is dropped)
        self._pending_ws = ""
        self._tag = 0  # characters of CALL_OPEN matched and held back
        self._call: _CallParser | None = None
        self._raw: list[str] = []  # the current call's text after CALL_OPEN, to give back if it breaks
        self._held: list[tuple[int, int, str]] = []  # the current call's events while not committed
        self._committed = False
        self._index = 0
        self._finished = False

    def feed(self, text: str) -> list[StreamEvent]:
        if self._finished:
            raise RuntimeError("feed() after finish()")
        self._run(text)
        return self._take()

    def finish(self) -> list[StreamEvent]:
        if self._finished:
            return []
        self._finished = True
        while self._call is not None and not self._committed:
            self._give_back()
        self._call = None  # a committed call cut short stays as far as it was streamed
        if self._tag:
            self._content(CALL_OPEN[: self._tag])
            self._tag = 0
        self._pending_ws = ""
        return self._take()

    def _run(self, text: str) -> None:
        queue, i = text, 0
        while i < len(queue):
            c = queue[i]
            i += 1
            call = self._call
            if call is None:
                self._text_char(c)
                continue
            self._raw.append(c)
            try:
                call.feed(c)
            except Malformed:
                if self._committed:  # too late to take it back: go on from the character that broke it
                    if call.out:  # a number that ended right there is final
                        self._call_part(_ARGS, "".join(call.out))
                    self._call, self._committed, self._raw = None, False, []
                    self._index += 1
                    i -= 1
                else:
                    queue, i = self._give_back(rerun=False) + queue[i:], 0
                continue
            if call.out:
                self._call_part(_ARGS, "".join(call.out))
                call.out.clear()
            if not self._committed and call.name is not None and (self._commit_early or call.done):
                self._commit(call.name)
            if call.done:
                self._call, self._committed, self._raw = None, False, []
                self._index += 1

    def _give_back(self, rerun: bool = True) -> str:
        """An uncommitted call that broke (or never ended): its tag becomes content, and what followed the
        tag is read again as text (it may hold the real call). Returns that text when not `rerun`."""
        raw = "".join(self._raw)
        self._call, self._raw, self._held = None, [], []
        self._content(CALL_OPEN)
        if rerun:
            self._run(raw)
        return raw

    def _text_char(self, c: str) -> None:
        if self._tag:
            if c == CALL_OPEN[self._tag]:
                self._tag += 1
                if self._tag == len(CALL_OPEN):
                    self._tag = 0
                    self._call, self._raw, self._held, self._committed = _CallParser(), [], [], False
                return
            self._content(CALL_OPEN[: self._tag])  # the tag has no proper prefix that is also a suffix
            self._tag = 0
        if c == CALL_OPEN[0]:
            self._tag = 1
        else:
            self._content(c)

    def _content(self, text: str) -> None:
        for ch in text:
            if ch.isspace():
                if self._started:
                    self._pending_ws += ch
            else:
                self._parts.append((_CONTENT, 0, self._pending_ws + ch))
                self._pending_ws, self._started = "", True

    def _call_part(self, kind: int, text: str) -> None:
        part = (kind, self._index, text)
        (self._parts if self._committed else self._held).append(part)

    def _commit(self, name: str) -> None:
        self._committed = True
        self._parts.append((_START, self._index, name))
        self._parts.extend(self._held)
        self._held = []

    def _take(self) -> list[StreamEvent]:
        """The parts since the last take, with runs of content (or of one call's arguments) joined."""
        events: list[StreamEvent] = []
        run: list[str] = []
        parts, self._parts = self._parts, []
        for n, (kind, index, text) in enumerate(parts):
            if kind == _START:
                events.append(CallStart(index, text))
                continue
            run.append(text)
            following = parts[n + 1] if n + 1 < len(parts) else None
            if following is None or following[0] != kind or following[1] != index:
                joined = "".join(run)
                events.append(ContentDelta(joined) if kind == _CONTENT else ArgumentsDelta(index, joined))
                run = []
        return events
