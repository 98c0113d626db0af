"""Incremental detokenization of one sequence: text grows token by token without ever showing a broken
UTF-8 character or the beginning of a stop string, at a cost per token bounded by a small window."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tokenmill.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_NUM_CONTEXT_TOKENS = 5
"""Prompt tokens decoded together with the first output tokens, so that a leading space (SentencePiece
strips it from the first token of a decode) and characters split across tokens come out as they would in
the whole text."""
_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Decodes a sliding window of token ids (vLLM's prefix/read offsets):

        ids:   ... | prefix_offset ........ read_offset ........ end
                     \\___ already shown ___/\\__ not shown yet __/

    Each step decodes ids[prefix_offset:read_offset] and ids[prefix_offset:]; what the second adds to the
    first is new text, unless it ends in U+FFFD (a character whose remaining bytes are still to come).
    Then both offsets move forward, so the window stays a few tokens long whatever the output length.

    The final text equals decoding prompt + output and dropping the prompt's text. One known exception:
    a byte-fallback (SentencePiece) decoder judges a whole run of <0xNN> tokens at once, so when such a
    run ends in invalid UTF-8 a full decode turns all of it into U+FFFD, while the stream has already
    shown the valid characters at its start.
    """

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, prompt_token_ids: list[int], params: SamplingParams
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = params.skip_special_tokens
        self._stop = params.stop
        self._max_stop_len = max((len(s) for s in params.stop), default=0)
        self._window_ids = list(prompt_token_ids[-_NUM_CONTEXT_TOKENS:])
        """ids[prefix_offset:], i.e. the window; everything before it is no longer needed."""
        self._read_offset = len(self._window_ids)
        """Where the not-yet-shown ids start, relative to the window."""
        self._prefix_text: str | None = None
        """decode(window[:read_offset]), cached until the offsets move."""
        self._output = ""
        """All text decoded so far (complete characters only), cut before a stop string once one is found."""
        self._num_held = 0
        """Trailing characters of `_output` that may be the start of a stop string."""
        self._stop_string: str | None = None
        self._finished = False

    def append(self, token_id: int) -> str | None:
        """Add one generated token; returns the stop string if the output now contains one (the text is
        then cut before it and further tokens are ignored)."""
        if self._finished or self._stop_string is not None:
            return None
        self._window_ids.append(token_id)
        new_text = self._decode_new()
        if new_text and not new_text.endswith(_REPLACEMENT_CHAR):
            self._advance()
            return self._add_text(new_text)
        return None

    @property
    def text(self) -> str:
        """Text safe to show so far: no trailing partial character and, while running, no suffix that
        could still be the start of a stop string. After `finish()` (or a stop string) it is final."""
        if self._num_held:  # zero once finished or stopped
            return self._output[: -self._num_held]
        return self._output

    def finish(self) -> str:
        """The sequence ended (length, eos, stop, abort): release held-back text; returns the final text.
        Calling it again returns the same text."""
        if not self._finished:
            if self._stop_string is None:
                # Bytes of a character that never completed decode to U+FFFD, as a full decode shows them.
                new_text = self._decode_new()
                self._advance()
                self._add_text(new_text)
            self._finished = True
            self._num_held = 0
        return self._output

    def _decode_new(self) -> str:
        """What the not-yet-shown ids add to the text (may end in U+FFFD)."""
        if self._read_offset == len(self._window_ids):
            return ""
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._window_ids[: self._read_offset])
        full_text = self._decode(self._window_ids)
        if len(full_text) <= len(self._prefix_text):
            return ""
        return full_text[len(self._prefix_text) :]

    def _advance(self) -> None:
        """The not-yet-shown ids are now shown: they become the next window's context."""
        del self._window_ids[: self._read_offset]
        self._read_offset = len(self._window_ids)
        self._prefix_text = None

    def _add_text(self, new_text: str) -> str | None:
        if not new_text:
            return None
        start = max(0, len(self._output) - self._max_stop_len + 1)
        self._output += new_text
        if not self._stop:
            return None
        hits = [(position, s) for s in self._stop if (position := self._output.find(s, start)) >= 0]
        if hits:
            position, stop_string = min(hits, key=lambda hit: hit[0])
            self._output = self._output[:position]
            self._stop_string = stop_string
            self._num_held = 0
            return stop_string
        self._num_held = self._num_stop_prefix_chars()
        return None

    def _num_stop_prefix_chars(self) -> int:
        """Length of the longest suffix of the output that is a proper prefix of a stop string."""
        for n in range(min(self._max_stop_len - 1, len(self._output)), 0, -1):
            suffix = self._output[-n:]
            if any(s.startswith(suffix) for s in self._stop):
                return n
        return 0

    def _decode(self, token_ids: list[int]) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=self._skip_special_tokens)
