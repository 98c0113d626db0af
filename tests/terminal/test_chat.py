"""`tokenmill chat` as a person meets it: the real command on a pseudo-terminal (keys in, screen out) against a
live server over the FakeEngine, checking what the server was asked; and a local tiny model through a pipe."""

from __future__ import annotations

import codecs
import fcntl
import logging
import os
import select
import socket
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.serving.conftest import LiveServer
from tests.serving.fake_engine import FakeEngine
from tokenmill.engine.sampling_params import SamplingParams
from tokenmill.serving.app import create_app
from tokenmill.serving.prompts import render_chat
from tokenmill.serving.protocol import ChatMessage
from tokenmill.serving.settings import ServerSettings

PROMPT = ">>> "
# Runs in the child between fork and the chat: makes the pty its controlling terminal, so ^C is a SIGINT.
ATTACH_TERMINAL = (
    "import fcntl, os, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
    "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
)


class Terminal:
    """`tokenmill chat` on a pseudo-terminal, read like a screen: `expect` waits until text appears."""

    def __init__(self, args: list[str]) -> None:
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 200, 0, 0))  # no wrapped lines
        env = {**os.environ, "TERM": "dumb"}
        for name in ("TOKENMILL_KEY", "OPENAI_API_KEY"):
            env.pop(name, None)
        self.process = subprocess.Popen(
            [sys.executable, "-c", ATTACH_TERMINAL, "-m", "tokenmill.cli", "chat", *args],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
            start_new_session=True,
        )
        os.close(slave)
        self.fd = master
        self.screen = ""
        """Everything shown so far, without the terminal's carriage returns."""
        self._read_to = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._open = True

    def __enter__(self) -> Terminal:
        return self

    def __exit__(self, *_: object) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        os.close(self.fd)

    def send(self, keys: str | bytes) -> None:
        os.write(self.fd, keys.encode() if isinstance(keys, str) else keys)

    def expect(self, text: str, timeout_s: float = 15.0) -> str:
        """Waits for `text` after the previous match; returns what was shown in between."""
        deadline = time.monotonic() + timeout_s
        while (found := self.screen.find(text, self._read_to)) < 0:
            remaining = deadline - time.monotonic()
            assert remaining > 0 and self._read(remaining), f"never shown: {text!r}; screen:\n{self.screen}"
        shown, self._read_to = self.screen[self._read_to : found], found + len(text)
        return shown

    def wait_for_input(self) -> None:
        """Until the program sleeps in readline's wait for a key. A ^C sent after the prompt is shown but before
        that wait begins would only be noticed at the next key (a race no person is fast enough to meet)."""
        _poll(lambda: Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "S")

    def wait(self, timeout_s: float = 15.0) -> int:
        """The exit status, once the program has left (reading the screen up to its end)."""
        deadline = time.monotonic() + timeout_s
        while self._read(max(0.0, deadline - time.monotonic())):
            pass
        return self.process.wait(timeout=max(0.1, deadline - time.monotonic()))

    def _read(self, timeout_s: float) -> bool:
        """False at the end of the output or on timeout."""
        if not self._open or not select.select([self.fd], [], [], timeout_s)[0]:
            return False
        try:
            data = os.read(self.fd, 4096)
        except OSError:  # EIO: the program closed the terminal
            data = b""
        self._open = bool(data)
        self.screen += self._decoder.decode(data).replace("\r", "")
        return self._open


def _poll(condition: Callable[[], object], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


@pytest.fixture
def fake(smollm2_tokenizer: Any) -> FakeEngine:
    return FakeEngine(smollm2_tokenizer)


@pytest.fixture
def base_url(fake: FakeEngine) -> Iterator[str]:
    app = create_app({"fake-chat": fake}, {}, ServerSettings(no_auth=True))
    with LiveServer(app) as live:
        _poll(lambda: httpx.get(f"{live.url}/ready").status_code == 200)
        yield f"{live.url}/v1"


def _rendered(tokenizer: Any, *messages: tuple[str, str]) -> list[int]:
    """The prompt the server builds for this conversation."""
    chat = [ChatMessage(role=role, content=content) for role, content in messages]  # type: ignore[arg-type]
    return render_chat(tokenizer, chat, "fake-chat")


def _reply(fake: FakeEngine, submitted: tuple[list[int], SamplingParams]) -> str:
    return fake.tokenizer.decode(fake.reply_for(*submitted), skip_special_tokens=True)


def test_each_turn_shows_the_reply_and_sends_the_whole_conversation(base_url: str, fake: FakeEngine) -> None:
    tokenizer = fake.tokenizer
    with Terminal(["--base-url", base_url, "--temperature", "0", "--max-tokens", "64"]) as term:
        term.expect("Chatting with fake-chat")  # the server's first chat model
        term.expect(PROMPT)
        term.send("Hello there\r")
        shown = term.expect(PROMPT)
        ((ids, params),) = fake.submitted
        assert ids == _rendered(tokenizer, ("user", "Hello there"))
        assert params.temperature == 0 and params.max_tokens == 64
        first = _reply(fake, fake.submitted[0])
        assert shown.endswith(f"{first}\n")

        term.send("And then?\r")
        shown = term.expect(PROMPT)
        second = _reply(fake, fake.submitted[1])
        assert shown.endswith(f"{second}\n")
        assert fake.submitted[1][0] == _rendered(
            tokenizer, ("user", "Hello there"), ("assistant", first), ("user", "And then?")
        )
        term.send(b"\x04")  # Ctrl-D
        assert term.wait() == 0


def test_system_prompt_and_reset(base_url: str, fake: FakeEngine) -> None:
    tokenizer = fake.tokenizer
    with Terminal(["--base-url", base_url, "--model", "fake-chat", "--system", "Be brief."]) as term:
        term.expect(PROMPT)
        term.send("/system\r")
        assert "Be brief." in term.expect(PROMPT)
        term.send("Hi\r")
        term.expect(PROMPT)
        assert fake.submitted[0][0] == _rendered(tokenizer, ("system", "Be brief."), ("user", "Hi"))
        first = _reply(fake, fake.submitted[0])

        term.send("/system You are a pirate.\r")
        term.expect("System prompt set.")
        term.send("Ahoy\r")
        term.expect(PROMPT)
        term.expect(PROMPT)
        assert fake.submitted[1][0] == _rendered(
            tokenizer, ("system", "You are a pirate."), ("user", "Hi"), ("assistant", first), ("user", "Ahoy")
        )

        term.send("/reset\r")
        term.expect("Conversation forgotten")
        term.send("Fresh start\r")
        term.expect(PROMPT)
        term.expect(PROMPT)
        assert fake.submitted[2][0] == _rendered(
            tokenizer, ("system", "You are a pirate."), ("user", "Fresh start")
        )

        term.send("/frobnicate\r")
        term.expect("Unknown command /frobnicate")
        term.send("/bye\r")
        assert term.wait() == 0
    assert len(fake.submitted) == 3  # commands never reach the model


def test_ctrl_c_stops_a_streaming_reply_and_the_server_aborts_it(
    base_url: str, fake: FakeEngine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tokenmill.serving.generation")
    fake.endless, fake.step_delay_s = True, 0.05  # only max_tokens would end a reply: 25 s away
    with Terminal(["--base-url", base_url, "--temperature", "0", "--max-tokens", "500"]) as term:
        term.expect(PROMPT)
        term.send("Tell me everything\r")
        _poll(lambda: fake.submitted)
        endless_ids = fake.reply_for(*fake.submitted[0]) * 50
        term.expect(fake.tokenizer.decode(endless_ids[:3]))
        assert fake.running  # the words are on the screen while the reply is still being generated
        term.send(b"\x03")  # Ctrl-C
        term.expect("[stopped]")
        term.expect(PROMPT)
        _poll(lambda: not fake.running and "aborted" in caplog.text)  # the server gave up the request
        assert fake.stats().num_generated_tokens < 500  # long before max_tokens would have ended it

        # What was shown stays in the conversation as the assistant's turn.
        fake.endless = False
        term.send("Go on\r")
        term.expect(PROMPT)
        sent = fake.tokenizer.decode(fake.submitted[1][0])
        kept = sent.split("<|im_start|>assistant\n")[1].split("<|im_end|>")[0]
        assert kept and fake.tokenizer.decode(endless_ids).startswith(kept)
        assert sent.endswith("<|im_start|>user\nGo on<|im_end|>\n<|im_start|>assistant\n")

        term.wait_for_input()
        term.send(b"\x03")  # at the prompt: tells how to leave
        term.expect("Ctrl-C again")
        term.expect(PROMPT)
        term.wait_for_input()
        term.send(b"\x03")
        assert term.wait() == 0


def _closed_port() -> int:
    """A port nothing listens on: taken from the OS, then let go."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_an_unreachable_server_is_one_line_naming_it() -> None:
    url = f"http://127.0.0.1:{_closed_port()}/v1"
    result = subprocess.run(
        [sys.executable, "-m", "tokenmill.cli", "chat", "--base-url", url],
        input="Hello\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert url in line and "Traceback" not in line


def test_a_local_model_answers_each_piped_line(tiny_llama_dir: Path) -> None:
    from tokenmill.engine.llm_engine import LLM

    chat = subprocess.Popen(
        [sys.executable, "-m", "tokenmill.cli", "chat", "--model", str(tiny_llama_dir)]
        + ["--dtype", "float32", "--max-model-len", "256", "--kv-cache-memory", "16M"]
        + ["--temperature", "0", "--max-tokens", "6"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    # Meanwhile, the same model, greedy, given the same two conversations, rendered as the server renders them.
    llm = LLM(str(tiny_llama_dir), dtype="float32", max_model_len=256, kv_cache_memory=16 * 2**20)
    greedy = SamplingParams(temperature=0.0, max_tokens=6)
    first = llm.generate(_rendered(llm.tokenizer, ("user", "Hello")), greedy)[0].outputs[0].text
    second_ids = _rendered(llm.tokenizer, ("user", "Hello"), ("assistant", first), ("user", "How are you?"))
    second = llm.generate(second_ids, greedy)[0].outputs[0].text

    stdout, stderr = chat.communicate(b"Hello\nHow are you?\n", timeout=120)
    assert chat.returncode == 0, stderr.decode()
    # Random weights mostly echo the prompt's last token (here the template's newline): the replies are
    # whitespace, so their exact text and count are what tells them apart.
    assert first and second
    assert stdout.decode() == f"{first}\n{second}\n"
