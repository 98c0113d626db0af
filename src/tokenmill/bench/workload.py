"""What `tokenmill bench serve` sends: synthetic prompts of a target length (fixed, random, or behind a shared
system prompt to show prefix caching) or prompts read from a JSONL file.

Synthetic text is built client-side from common English words, about one token each in byte-level BPE
vocabularies, so no tokenizer is needed and any server can be measured; the lengths are targets, and the
server's `usage.prompt_tokens` is what the report counts.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

Endpoint = Literal["chat", "completions"]

# Short, frequent words: each is a single token (with its leading space) in GPT-2-style vocabularies.
_WORD_TEXT = """
the of and to in is was for on that with as by at from his her they this have are not but had one
were all which she there an their been has when who will more no if out so said what up its about
into than them can only other new some could time these two may then do first any my now such like
our over man me even most made after also did many before must through back years where much your
way well down should because each just those people how too little state good very make world still
own see men work long get here between both life being under never day same another know while last
might us great old year off come since against go came right used take three house use during
without again place around however home small found thought went say part once general high upon
school every does got left number course war until always away something fact though water less
public put think almost hand enough far took head yet government system better set told nothing
night end why called city sea river tree stone light garden book table window road field music
paper story morning
"""
WORDS = tuple(_WORD_TEXT.split())


def words_text(rng: random.Random, num_tokens: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(max(1, num_tokens)))


@dataclass(frozen=True, slots=True)
class BenchRequest:
    messages: tuple[dict[str, str], ...]
    """What a chat request sends."""
    prompt: str | None
    """What a completions request sends; None for a chat-only request (a JSONL line of messages)."""
    max_tokens: int

    def body(self, endpoint: Endpoint) -> dict[str, Any]:
        """The endpoint-specific part of the request body."""
        if endpoint == "chat":
            return {"messages": list(self.messages), "max_tokens": self.max_tokens}
        if self.prompt is None:
            raise ValueError("a request of chat messages cannot be sent to /completions: use --endpoint chat")
        return {"prompt": self.prompt, "max_tokens": self.max_tokens}


class Workload(Protocol):
    """Request `index` of a run; the same (workload, index) always gives the same request."""

    def request(self, index: int) -> BenchRequest: ...


@dataclass(frozen=True, slots=True)
class SyntheticWorkload:
    """Random-word prompts. `range_ratio` 0 gives fixed lengths; r > 0 draws each length uniformly from
    [len * (1 - r), len * (1 + r)]. With `prefix_len` > 0 every request starts with one of `num_prefixes`
    system prompts of that length (request i uses prefix i mod num_prefixes): the prefix cache's workload."""

    input_len: int
    output_len: int
    range_ratio: float = 0.0
    prefix_len: int = 0
    num_prefixes: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.input_len < 1 or self.output_len < 1:
            raise ValueError(
                f"input_len and output_len must be >= 1, got {self.input_len}, {self.output_len}"
            )
        if not 0.0 <= self.range_ratio < 1.0:
            raise ValueError(f"range_ratio must be in [0, 1), got {self.range_ratio}")
        if self.prefix_len < 0 or self.num_prefixes < 1:
            raise ValueError(
                f"prefix_len must be >= 0 and num_prefixes >= 1, got {self.prefix_len}, {self.num_prefixes}"
            )

    def _length(self, rng: random.Random, target: int) -> int:
        if self.range_ratio == 0.0:
            return target
        low = max(1, round(target * (1 - self.range_ratio)))
        return rng.randint(low, max(low, round(target * (1 + self.range_ratio))))

    def _prefix(self, index: int) -> str:
        return words_text(random.Random(f"prefix:{self.seed}:{index % self.num_prefixes}"), self.prefix_len)

    def request(self, index: int) -> BenchRequest:
        rng = random.Random(f"request:{self.seed}:{index}")
        user = words_text(rng, self._length(rng, self.input_len))
        max_tokens = self._length(rng, self.output_len)
        if self.prefix_len == 0:
            return BenchRequest(({"role": "user", "content": user},), user, max_tokens)
        system = self._prefix(index)
        messages = ({"role": "system", "content": system}, {"role": "user", "content": user})
        return BenchRequest(messages, f"{system}\n\n{user}", max_tokens)


@dataclass(frozen=True, slots=True)
class JsonlWorkload:
    """Requests read from a file, cycled when a run asks for more than it holds."""

    requests: tuple[BenchRequest, ...]

    def request(self, index: int) -> BenchRequest:
        return self.requests[index % len(self.requests)]


def load_jsonl(path: Path, endpoint: Endpoint, default_max_tokens: int) -> JsonlWorkload:
    """One JSON object a line: {"messages": [{"role": ..., "content": ...}, ...]} (chat only) or
    {"prompt": "..."} (either endpoint), with an optional "max_tokens". Blank lines are skipped."""
    requests = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not JSON ({exc.msg})") from None
        if not isinstance(item, dict):
            raise ValueError(f"{where}: expected an object with 'messages' or 'prompt'")
        max_tokens = item.get("max_tokens", default_max_tokens)
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"{where}: max_tokens must be a positive integer, got {max_tokens!r}")
        if isinstance(item.get("prompt"), str):
            prompt = item["prompt"]
            requests.append(BenchRequest(({"role": "user", "content": prompt},), prompt, max_tokens))
        elif isinstance(item.get("messages"), list) and item["messages"]:
            if endpoint == "completions":
                raise ValueError(
                    f"{where}: chat messages cannot be sent to /completions; use --endpoint chat"
                )
            requests.append(BenchRequest(tuple(item["messages"]), None, max_tokens))
        else:
            raise ValueError(f"{where}: expected a string 'prompt' or a non-empty list 'messages'")
    if not requests:
        raise ValueError(f"{path}: no requests")
    return JsonlWorkload(tuple(requests))
