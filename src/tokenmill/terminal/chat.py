"""`tokenmill chat`: a conversation with one model in the terminal, each reply printed as it is generated.
The conversation and its slash commands live here; the ways of reaching a model live in chat_backends.py."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from contextlib import closing
from dataclasses import dataclass, field

from tokenmill.config import ConfigError, default_api_key
from tokenmill.terminal.chat_backends import (
    ChatBackend,
    ChatError,
    HttpChatBackend,
    LocalChatBackend,
    Message,
    ReplyParams,
)

PROMPT = ">>> "
DEFAULT_LOCAL_MODEL = "smollm2"
STOPPED = " [stopped]"
HELP = """Commands:
  /system TEXT   set the system prompt (/system alone shows it)
  /reset         forget the conversation, keep the system prompt
  /help          this list
  /bye, /exit    leave (Ctrl-D too)
Ctrl-C stops a reply while it streams."""


@dataclass(frozen=True, slots=True)
class ChatOptions:
    base_url: str | None = None
    """An OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1; None loads `model` in this process."""
    api_key: str | None = None
    """None: $TOKENMILL_KEY, then $OPENAI_API_KEY."""
    model: str | None = None
    """On a server, a model id (default: its first chat model); locally, a path or a built-in name."""
    system: str | None = None
    temperature: float = 0.7
    max_tokens: int = 512
    """Bounds every reply, so a model that never emits its end token still gives the prompt back."""
    engine_kwargs: Mapping[str, object] = field(default_factory=dict)
    """AsyncLLM settings (dtype, max_model_len, ...) for a local model."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.temperature <= 2.0:
            raise ConfigError("temperature: must be in [0, 2]")
        if self.max_tokens < 1:
            raise ConfigError("max_tokens: must be >= 1")
        if self.base_url is not None and self.engine_kwargs:
            flags = ", ".join("--" + name.replace("_", "-") for name in self.engine_kwargs)
            raise ConfigError(f"{flags}: for a model loaded here only, not with --base-url")


@dataclass(slots=True)
class Conversation:
    system: str | None = None
    turns: list[Message] = field(default_factory=list)
    """Alternating user and assistant messages, the user's first."""

    def messages(self) -> list[Message]:
        return ([Message("system", self.system)] if self.system else []) + self.turns


def run_chat(options: ChatOptions) -> int:
    """0 when the user leaves; 1 when the model cannot be reached, or a reply fails in a script."""
    interactive = sys.stdin.isatty()
    try:
        backend = _open_backend(options, interactive)
    except ChatError as exc:
        print(f"tokenmill chat: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # while a model loads: leave quietly, as a shell command does
        return 130
    try:
        params = ReplyParams(options.temperature, options.max_tokens)
        return ChatSession(backend, Conversation(options.system), params, interactive).run()
    finally:
        backend.close()


def _open_backend(options: ChatOptions, interactive: bool) -> ChatBackend:
    if options.base_url is not None:
        return HttpChatBackend.open(options.base_url, options.api_key or default_api_key(), options.model)
    model = options.model or DEFAULT_LOCAL_MODEL
    if interactive:
        print(f"Loading {model} ...", file=sys.stderr, flush=True)
    return LocalChatBackend.open(model, options.engine_kwargs)


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


class ChatSession:
    """The read-reply loop. On a terminal: a prompt, line editing and Ctrl-C handling. Otherwise one message
    per input line and only the replies on stdout, so scripts can read them."""

    def __init__(
        self, backend: ChatBackend, conversation: Conversation, params: ReplyParams, interactive: bool
    ) -> None:
        self.backend = backend
        self.conversation = conversation
        self.params = params
        self.interactive = interactive

    def run(self) -> int:
        if self.interactive:
            _enable_line_editing()
            _write(f"Chatting with {self.backend.model}. /help lists commands; /bye or Ctrl-D leaves.\n")
        interrupted = False  # a second Ctrl-C in a row at the prompt leaves
        while True:
            try:
                line = input(PROMPT if self.interactive else "").strip()
            except EOFError:
                _write("\n" if self.interactive else "")
                return 0
            except KeyboardInterrupt:
                _write("\n")
                if interrupted:
                    return 0
                interrupted = True
                _write("(To leave: /bye, Ctrl-D, or Ctrl-C again.)\n")
                continue
            interrupted = False
            if not line:
                continue
            if line.startswith("/"):
                if self._command(line):
                    return 0
            elif not self._reply(line) and not self.interactive:
                return 1  # a script should not carry on with a reply missing

    def _command(self, line: str) -> bool:
        """True: leave."""
        name, _, argument = line.partition(" ")
        argument = argument.strip()
        if name in ("/bye", "/exit"):
            return True
        if name == "/system" and argument:
            self.conversation.system = argument
            self._note("System prompt set.")
        elif name == "/system":
            _write((self.conversation.system or "(no system prompt)") + "\n")
        elif name == "/reset":
            self.conversation.turns.clear()
            self._note("Conversation forgotten; the system prompt stays.")
        elif name in ("/help", "/?"):
            _write(HELP + "\n")
        else:
            print(f"Unknown command {name}; /help lists the commands.", file=sys.stderr, flush=True)
        return False

    def _reply(self, text: str) -> bool:
        """Streams one reply; False when it failed. A reply stopped by Ctrl-C stays in the conversation as far
        as it got, as the user saw it."""
        turns = self.conversation.turns
        turns.append(Message("user", text))
        pieces: list[str] = []
        ending = "\n"
        try:
            with closing(self.backend.stream(self.conversation.messages(), self.params)) as stream:
                for piece in stream:
                    pieces.append(piece)
                    _write(piece)
        except KeyboardInterrupt:
            ending = STOPPED + "\n"
        except ChatError as exc:
            turns.pop()  # the question goes unanswered: ask again, or /reset
            _write("\n" if pieces else "")
            print(f"error: {exc}", file=sys.stderr, flush=True)
            return False
        _write(ending)
        reply = "".join(pieces)
        if reply or ending == "\n":
            turns.append(Message("assistant", reply))
        else:
            turns.pop()  # stopped before a word: as if never asked
        return True

    def _note(self, text: str) -> None:
        """Confirmations are for people; a script's output holds only replies."""
        if self.interactive:
            _write(text + "\n")


def _enable_line_editing() -> None:
    """Importing readline gives input() line editing and an up-arrow history; some platforms lack it."""
    try:
        import readline  # noqa: F401
    except ImportError:
        return
