"""Structured output with llguidance: grammars compiled once per distinct constraint, one matcher per
constrained sequence, and each step's token masks computed in one batched call.

Everything llguidance lives here; the sampler only sees a boolean mask per constrained row
(`GrammarMasks`), and the scheduler only learns which sequences' grammars are complete.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable
from typing import TYPE_CHECKING

import llguidance
import llguidance.hf
import numpy as np
import torch
from llguidance import LLExecutor, LLMatcher, LLTokenizer
from llguidance.numpy import fill_next_token_bitmask_par

from tokenmill.engine.sampler import GrammarMasks
from tokenmill.engine.sampling_params import Guidance, InvalidRequestError

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

GRAMMAR_CACHE_SIZE = 64
"""Compiled grammars kept (least recently used dropped first). Clients tend to reuse a handful of schemas;
a compiled grammar also carries its lexer's lazily built states, so keeping it saves more than parsing."""
JSON_COMPILE_OPTIONS: JsonCompileOptions = {"whitespace_flexible": False}
"""Compact JSON (no whitespace between tokens). With flexible whitespace a model, above all a weak one,
can emit blanks forever and never close the object; applied as an override, so a schema's own
"x-guidance" cannot turn it back on."""
_MAX_ERROR_CHARS = 400
"""llguidance's error texts can quote the whole grammar; requests get a one-line excerpt."""


class GrammarCompiler:
    """Guidance -> compiled grammar (a pristine matcher that new sequences copy), cached by (kind, spec).

    Thread-safe: the HTTP layer checks requests from worker threads while the engine thread creates
    matchers. Compilation itself runs outside the lock (llguidance releases the GIL while it builds the
    grammar), so a slow schema never stalls the engine; two threads compiling the same new schema at once
    both succeed and one result is kept.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        vocab_size: int,
        eos_token_ids: Iterable[int],
        cache_size: int = GRAMMAR_CACHE_SIZE,
    ) -> None:
        self._hf_tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._eos_token_ids = sorted(set(eos_token_ids))
        self._cache_size = cache_size
        self._cache: OrderedDict[tuple[str, str], LLMatcher] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._ll_tokenizer: LLTokenizer | None = None
        self._tokenizer_lock = threading.Lock()

    def compile(self, guidance: Guidance) -> LLMatcher:
        """The compiled grammar for `guidance`; raises InvalidRequestError (code invalid_grammar) naming
        `guidance.param` when it cannot be compiled. Do not feed tokens to the result: copy it."""
        key = (guidance.kind, guidance.spec)
        with self._cache_lock:
            template = self._cache.get(key)
            if template is not None:
                self._cache.move_to_end(key)
                return template
        template = self._build(guidance)
        with self._cache_lock:
            self._cache[key] = template
            self._cache.move_to_end(key)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return template

    def _build(self, guidance: Guidance) -> LLMatcher:
        try:
            grammar = grammar_text(guidance)
        except ValueError as error:
            raise _invalid(guidance, str(error)) from error
        matcher = LLMatcher(self.ll_tokenizer(guidance), grammar, log_level=0)
        if matcher.is_error():
            raise _invalid(guidance, matcher.get_error())
        return matcher

    def ll_tokenizer(self, guidance: Guidance) -> LLTokenizer:
        """llguidance's view of the engine's tokenizer, built on first use (about a second) and only once.
        Its vocabulary is the logits width, so padded model vocabularies line up with the masks."""
        with self._tokenizer_lock:
            if self._ll_tokenizer is None:
                try:
                    self._ll_tokenizer = llguidance.hf.from_tokenizer(
                        self._hf_tokenizer, n_vocab=self._vocab_size, eos_token=self._eos_token_ids
                    )
                except ValueError as error:  # not a fast (Rust) tokenizer
                    raise InvalidRequestError(
                        f"{guidance.param}: structured output is not available for this model's tokenizer "
                        f"({error})",
                        param=guidance.param,
                        code="invalid_grammar",
                    ) from error
            return self._ll_tokenizer


def grammar_text(guidance: Guidance) -> str:
    """The llguidance grammar for a constraint (not yet checked: compiling it does that)."""
    if guidance.kind == "json_schema":
        return LLMatcher.grammar_from_json_schema(guidance.spec, overrides=JSON_COMPILE_OPTIONS)
    if guidance.kind == "json_object":
        return LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=JSON_COMPILE_OPTIONS)
    if guidance.kind == "regex":
        return LLMatcher.grammar_from_regex(guidance.spec)
    if guidance.kind == "choice":
        return LLMatcher.grammar_from_lark(_choice_lark(json.loads(guidance.spec)))
    if guidance.kind == "lark":
        return LLMatcher.grammar_from_lark(guidance.spec)
    raise ValueError(f"unknown guidance kind {guidance.kind!r}")


def _choice_lark(options: object) -> str:
    """A Lark grammar matching exactly one of the strings. Lark string literals take JSON escapes, so
    json.dumps quotes any text (quotes, backslashes, regex metacharacters, non-ASCII) literally."""
    if not (isinstance(options, list) and options and all(isinstance(o, str) and o for o in options)):
        raise ValueError("a choice must be a non-empty list of non-empty strings")
    return "start: " + " | ".join(json.dumps(option) for option in options)


def _invalid(guidance: Guidance, reason: str) -> InvalidRequestError:
    reason = " ".join(reason.split())
    if len(reason) > _MAX_ERROR_CHARS:
        reason = reason[:_MAX_ERROR_CHARS] + "..."
    return InvalidRequestError(f"{guidance.param}: {reason}", param=guidance.param, code="invalid_grammar")


class GuidedDecoder:
    """The engine thread's side of structured output: one matcher per constrained sequence, following
    every token the sequence accepts. A matcher depends only on the output tokens, so it needs nothing on
    preemption (the tokens are kept and only KV is recomputed) or on prefix-cache hits."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        vocab_size: int,
        eos_token_ids: Iterable[int],
        device: torch.device | str = "cpu",
    ) -> None:
        self.compiler = GrammarCompiler(tokenizer, vocab_size, eos_token_ids)
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self._matchers: dict[str, LLMatcher] = {}
        self._executor: LLExecutor | None = None

    def check(self, guidance: Guidance) -> None:
        """Compile (and cache) the grammar; raises InvalidRequestError naming guidance.param."""
        self.compiler.compile(guidance)

    def start(self, seq_id: str, guidance: Guidance) -> None:
        """Give a new sequence its own matcher, a copy of the compiled grammar."""
        self._matchers[seq_id] = self.compiler.compile(guidance).deep_copy()

    def free(self, seq_id: str) -> None:
        self._matchers.pop(seq_id, None)

    @property
    def active(self) -> bool:
        """Whether any sequence is constrained (otherwise a step does no guidance work at all)."""
        return bool(self._matchers)

    def masks(self, rows: Iterable[tuple[int, str]]) -> GrammarMasks | None:
        """For the (row index, seq_id) pairs of this step, the next-token masks of the constrained ones,
        all computed in one parallel llguidance call; None when no row is constrained."""
        guided = [(row, self._matchers[seq_id]) for row, seq_id in rows if seq_id in self._matchers]
        if not guided:
            return None
        bitmask = np.empty((len(guided), (self.vocab_size + 31) // 32), dtype=np.int32)
        fill_next_token_bitmask_par(
            self.executor, [(matcher, i) for i, (_, matcher) in enumerate(guided)], bitmask
        )
        forbidden = unpack_bitmask(~bitmask, self.vocab_size)
        return GrammarMasks(rows=[row for row, _ in guided], forbidden=forbidden.to(self.device))

    def advance(self, sampled: Iterable[tuple[str, int]]) -> set[str]:
        """Feed each constrained sequence its sampled token. Returns the sequences that must end now: their
        grammar is complete (nothing more can follow, or EOS was accepted), or (never expected) their
        matcher broke, which is logged and ends the sequence rather than the engine."""
        guided = [
            (seq_id, self._matchers[seq_id], token) for seq_id, token in sampled if seq_id in self._matchers
        ]
        if not guided:
            return set()
        accepted = self.executor.consume_token_par([(matcher, token) for _, matcher, token in guided])
        done = set()
        for (seq_id, matcher, token), ok in zip(guided, accepted, strict=True):
            if not ok or matcher.is_error():
                logger.error(
                    "request %s: the grammar rejected token %d, ending the sequence: %s",
                    seq_id,
                    token,
                    " ".join(matcher.get_error().split())[:_MAX_ERROR_CHARS],
                )
                done.add(seq_id)
            elif matcher.is_stopped():
                done.add(seq_id)
        return done

    @property
    def executor(self) -> LLExecutor:
        """llguidance's thread pool, created with the first constrained request."""
        if self._executor is None:
            self._executor = LLExecutor()
        return self._executor


def unpack_bitmask(bitmask: np.ndarray, vocab_size: int) -> torch.Tensor:
    """An int32 bitmask in llguidance's layout (bit t % 32 of word t // 32 is token t) -> bool
    [rows, vocab_size]. Read as little-endian bytes the bits come in token order, so np.unpackbits
    expands them in one vectorized pass (no loop over the vocabulary)."""
    as_bytes = bitmask.astype("<i4", copy=False).view(np.uint8)
    bits = np.unpackbits(as_bytes, axis=1, count=vocab_size, bitorder="little")
    return torch.from_numpy(bits.view(np.bool_))
