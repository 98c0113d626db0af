"""Incremental detokenization against full decodes, on the real SmolLM2 byte-level BPE tokenizer and on a
Llama-2-style SentencePiece tokenizer (byte fallback, leading-space strip) built here from scratch."""

from __future__ import annotations

import json
import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from tokenmill.engine.detokenizer import IncrementalDetokenizer
from tokenmill.engine.sampling_params import SamplingParams

CHINESE = "你好，世界！今天天气很好。"
EMOJI = "😀👍🏽🎉"
ZWJ = "👨\u200d👩\u200d👧\u200d👦 and 🏳️\u200d🌈 and 🧑🏾\u200d🚀"
MIXED = "Grüße aus Köln — 東京タワー 🚀 naïve café ½ ∑"


@pytest.fixture(scope="module")
def sentencepiece_tokenizer() -> PreTrainedTokenizerBase:
    """Llama-2-style SentencePiece BPE: '▁' word boundaries, <0xNN> byte fallback, decoder that strips
    the leading space of a decode. The corpus leaves emoji and most CJK to byte fallback."""
    corpus = [
        "Hello world, the weather is nice today. The capital of France is Paris.",
        "The quick brown fox jumps over the lazy dog. Stop here, then continue.",
        "你好，世界！ Streaming text one token at a time is tricky.",
    ] * 20
    trainer = trainers.BpeTrainer(
        vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    learner = Tokenizer(models.BPE(unk_token="<unk>"))
    learner.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    learner.train_from_iterator(corpus, trainer)
    learned = json.loads(learner.to_str())["model"]
    # As in Llama's vocabulary, the 256 byte tokens are ordinary tokens (not special ones).
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for token in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]
    tokenizer = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.pre_tokenizer = learner.pre_tokenizer
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.fixture(params=["smollm2", "sentencepiece"])
def tokenizer(request: pytest.FixtureRequest) -> PreTrainedTokenizerBase:
    name = "smollm2_tokenizer" if request.param == "smollm2" else "sentencepiece_tokenizer"
    return request.getfixturevalue(name)


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def chat_prompt(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": "Say something."}]
        return encode(
            tokenizer, tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        )
    return [tokenizer.bos_token_id, *encode(tokenizer, "Say something:")]


def continuation(
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: list[int],
    output_ids: list[int],
    skip_special_tokens: bool = True,
) -> str:
    """What the output adds to the prompt's text: the reference for a completion."""
    prompt_text = tokenizer.decode(prompt_ids, skip_special_tokens=skip_special_tokens)
    full_text = tokenizer.decode(prompt_ids + output_ids, skip_special_tokens=skip_special_tokens)
    assert full_text.startswith(prompt_text)
    return full_text[len(prompt_text) :]


class Stream:
    """Feeds tokens one by one and records what a streaming client would have received."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, prompt_ids: list[int], params: SamplingParams
    ) -> None:
        self.tokenizer = tokenizer
        self.prompt_ids = prompt_ids
        self.detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids, params)
        self.params = params
        self.deltas: list[str] = []
        self.shown = ""
        self.stop_at: int | None = None
        self.stop_string: str | None = None

    def run(self, output_ids: list[int]) -> str:
        for i, token_id in enumerate(output_ids):
            hit = self.detokenizer.append(token_id)
            self._observe()
            if hit is not None:
                self.stop_at, self.stop_string = i, hit
                break
            if self.params.stop:
                self._check_holds_back(continuation(self.tokenizer, self.prompt_ids, output_ids[: i + 1]))
        final = self.detokenizer.finish()
        self._observe()
        assert self.detokenizer.finish() == final == self.detokenizer.text
        assert "".join(self.deltas) == final
        return final

    def _check_holds_back(self, decoded: str) -> None:
        """Nothing that may still become a stop string is shown."""
        for s in self.params.stop:
            for n in range(1, len(s)):
                if decoded.endswith(s[:n]):
                    assert len(self.shown) <= len(decoded) - n, f"showing {self.shown!r} of {decoded!r}"

    def _observe(self) -> None:
        text = self.detokenizer.text
        assert text.startswith(self.shown), f"shown text changed: {self.shown!r} -> {text!r}"
        if len(text) > len(self.shown):
            self.deltas.append(text[len(self.shown) :])
        self.shown = text


# -- UTF-8 safety --------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [CHINESE, EMOJI, ZWJ, MIXED], ids=["chinese", "emoji", "zwj", "mixed"])
def test_multibyte_text_streams_without_broken_characters(
    tokenizer: PreTrainedTokenizerBase, text: str
) -> None:
    prompt_ids = chat_prompt(tokenizer)
    output_ids = encode(tokenizer, text)
    # The test only means something if some tokens hold a fraction of a character.
    assert any("\ufffd" in tokenizer.decode([t]) for t in output_ids)
    stream = Stream(tokenizer, prompt_ids, SamplingParams())
    final = stream.run(output_ids)
    assert not [d for d in stream.deltas if "\ufffd" in d]
    assert final == continuation(tokenizer, prompt_ids, output_ids)
    assert final.strip() == text.strip()


def test_sequence_cut_mid_character_shows_it_only_at_finish(tokenizer: PreTrainedTokenizerBase) -> None:
    # max_tokens can end a sequence inside a character: the final text is what a full decode shows.
    prompt_ids = chat_prompt(tokenizer)
    output_ids = encode(tokenizer, " ok 🎉")[:-1]
    reference = continuation(tokenizer, prompt_ids, output_ids)
    assert reference.endswith("\ufffd")
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids, SamplingParams())
    for token_id in output_ids:
        detokenizer.append(token_id)
    assert "\ufffd" not in detokenizer.text
    assert detokenizer.finish() == reference


def test_byte_level_text_equals_decode_of_the_output(smollm2_tokenizer: PreTrainedTokenizerBase) -> None:
    prompt_ids = chat_prompt(smollm2_tokenizer)
    text = f"{CHINESE} {EMOJI} {ZWJ} {MIXED}\n  indented and\ttabbed"
    output_ids = encode(smollm2_tokenizer, text)
    assert Stream(smollm2_tokenizer, prompt_ids, SamplingParams()).run(output_ids) == text
    assert smollm2_tokenizer.decode(output_ids) == text


@pytest.mark.parametrize("seed", range(6))
def test_random_text_streams_reassemble(tokenizer: PreTrainedTokenizerBase, seed: int) -> None:
    rng = random.Random(seed)
    pool = [
        *"abcxyz .,!?\n\t",
        "the",
        " weather",
        " 你好",
        "世界",
        "！",
        "🎉",
        "👍🏽",
        "\u200d",
        "é",
        "½",
        "ß",
    ]
    text = "".join(rng.choice(pool) for _ in range(200))
    prompt_ids = chat_prompt(tokenizer)
    output_ids = encode(tokenizer, text)
    stream = Stream(tokenizer, prompt_ids, SamplingParams())
    assert stream.run(output_ids) == continuation(tokenizer, prompt_ids, output_ids)
    assert not [d for d in stream.deltas if "\ufffd" in d]


@pytest.mark.parametrize("seed", range(6))
def test_random_token_streams_reassemble_to_the_full_decode(
    smollm2_tokenizer: PreTrainedTokenizerBase, seed: int
) -> None:
    # What a random-weight model produces: arbitrary fragments, broken byte sequences, special tokens.
    # (Byte-level BPE only: a byte-fallback decoder judges a whole run of byte tokens at once, so a
    # stream can show a valid byte that a full decode of an invalid run turns into U+FFFD.)
    rng = random.Random(seed)
    vocab_size = len(smollm2_tokenizer)
    # The prompt ends on a character boundary, as the encoding of any text does.
    prompt_ids = [rng.randrange(vocab_size) for _ in range(rng.randrange(0, 12))]
    prompt_ids += encode(smollm2_tokenizer, " ok") if prompt_ids else []
    output_ids = [rng.randrange(vocab_size) for _ in range(300)]
    for skip_special_tokens in (True, False):
        params = SamplingParams(skip_special_tokens=skip_special_tokens)
        final = Stream(smollm2_tokenizer, prompt_ids, params).run(output_ids)
        assert final == continuation(smollm2_tokenizer, prompt_ids, output_ids, skip_special_tokens)


# -- leading spaces ------------------------------------------------------------------------------------


def test_leading_space_of_the_first_word_is_kept(tokenizer: PreTrainedTokenizerBase) -> None:
    prompt_ids = encode(tokenizer, "The capital of France is")
    # SentencePiece marks the first word of an encode with '▁' too, as a model continuing the prompt does.
    output_ids = encode(tokenizer, " Paris. The weather is nice")
    stream = Stream(tokenizer, prompt_ids, SamplingParams())
    final = stream.run(output_ids)
    assert final == " Paris. The weather is nice"
    assert stream.deltas[0].startswith(" P")


def test_empty_prompt_decodes_like_the_tokenizer(tokenizer: PreTrainedTokenizerBase) -> None:
    output_ids = encode(tokenizer, "Hello world 你好")
    assert Stream(tokenizer, [], SamplingParams()).run(output_ids) == tokenizer.decode(output_ids)


# -- stop strings --------------------------------------------------------------------------------------


def run_with_stop(tokenizer: PreTrainedTokenizerBase, text: str, stop: tuple[str, ...]) -> Stream:
    stream = Stream(tokenizer, encode(tokenizer, "Once upon a time"), SamplingParams(stop=stop))
    stream.run(encode(tokenizer, text))
    return stream


def test_stop_string_inside_one_token(smollm2_tokenizer: PreTrainedTokenizerBase) -> None:
    text = " Hello world, and goodbye"
    assert "Ġworld" in smollm2_tokenizer.convert_ids_to_tokens(encode(smollm2_tokenizer, text))
    stream = run_with_stop(smollm2_tokenizer, text, ("orl",))
    assert (stream.detokenizer.text, stream.stop_string, stream.stop_at) == (" Hello w", "orl", 1)


def test_stop_string_spanning_tokens(tokenizer: PreTrainedTokenizerBase) -> None:
    text = " The weather is nice today, then more text"
    tokens = encode(tokenizer, text)
    stream = run_with_stop(tokenizer, text, ("her is ni",))
    assert stream.detokenizer.text == " The weat"
    assert stream.stop_string == "her is ni"
    # Found at the token that completes it, not later.
    done = tokenizer.decode(tokens[: stream.stop_at + 1])
    assert "her is ni" in done and "her is ni" not in tokenizer.decode(tokens[: stream.stop_at])


def test_stop_string_at_the_very_start(tokenizer: PreTrainedTokenizerBase) -> None:
    stream = run_with_stop(tokenizer, " Stop here, then continue", (" Sto",))
    assert stream.detokenizer.text == ""
    assert stream.deltas == []
    assert stream.stop_string == " Sto"


def test_first_stop_string_to_appear_wins_then_the_leftmost(tokenizer: PreTrainedTokenizerBase) -> None:
    # "k bro" is complete one token before "quick brown fox": generation stops there.
    stream = run_with_stop(tokenizer, " The quick brown fox jumps", ("quick brown fox", "k bro"))
    assert (stream.detokenizer.text, stream.stop_string) == (" The quic", "k bro")
    # Both complete with the same token: the text is cut at the one that starts first.
    stream = run_with_stop(tokenizer, " The quick brown fox jumps", ("brown", "quick brown"))
    assert (stream.detokenizer.text, stream.stop_string) == (" The ", "quick brown")


def test_near_miss_is_held_back_then_released(tokenizer: PreTrainedTokenizerBase) -> None:
    stop = ("world peace",)
    # Released at finish: the output ended while it still looked like the stop string.
    stream = run_with_stop(tokenizer, " Hello world", stop)
    assert stream.stop_string is None
    assert stream.deltas[-1] == "world"  # held until finish()
    assert stream.detokenizer.text == " Hello world"
    # Released mid-stream: the next token shows it was not the stop string.
    prompt_ids = encode(tokenizer, "Once upon a time")
    output_ids = encode(tokenizer, " Hello world peas and more")
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids, SamplingParams(stop=stop))
    held = []
    for i, token_id in enumerate(output_ids):
        assert detokenizer.append(token_id) is None
        held.append(continuation(tokenizer, prompt_ids, output_ids[: i + 1])[len(detokenizer.text) :])
    assert "world" in held
    assert held[-1] == ""
    assert detokenizer.text == " Hello world peas and more"


def test_stop_string_made_of_multibyte_characters(tokenizer: PreTrainedTokenizerBase) -> None:
    stream = run_with_stop(tokenizer, f" {CHINESE} {EMOJI}", ("天气", "🎉"))
    assert stream.detokenizer.text == f" {CHINESE}"[: len(" 你好，世界！今天")]
    stream = run_with_stop(tokenizer, f" {CHINESE} {EMOJI}", ("👍🏽",))
    assert stream.detokenizer.text == f" {CHINESE} 😀"


def test_tokens_after_a_stop_string_are_ignored(tokenizer: PreTrainedTokenizerBase) -> None:
    detokenizer = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop=("nice",)))
    hits = [detokenizer.append(t) for t in encode(tokenizer, "The weather is nice today and more")]
    assert [h for h in hits if h is not None] == ["nice"]
    assert detokenizer.finish() == "The weather is "


# -- special tokens ------------------------------------------------------------------------------------


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_skip_special_tokens(smollm2_tokenizer: PreTrainedTokenizerBase, skip_special_tokens: bool) -> None:
    tok = smollm2_tokenizer
    prompt_ids = chat_prompt(tok)
    output_ids = [
        *encode(tok, "Hi there"),
        tok.convert_tokens_to_ids("<|im_start|>"),
        *encode(tok, " 你好"),
        tok.eos_token_id,
    ]
    final = Stream(tok, prompt_ids, SamplingParams(skip_special_tokens=skip_special_tokens)).run(output_ids)
    if skip_special_tokens:
        assert final == "Hi there 你好"
    else:
        assert final == "Hi there<|im_start|> 你好<|im_end|>"
    assert final == tok.decode(output_ids, skip_special_tokens=skip_special_tokens)


# -- cost ----------------------------------------------------------------------------------------------


class _CountingTokenizer:
    """Records how many ids each decode call sees."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.lengths: list[int] = []

    def decode(self, token_ids: list[int], **kwargs: object) -> str:
        self.lengths.append(len(token_ids))
        return self.tokenizer.decode(token_ids, **kwargs)


def test_cost_per_token_does_not_grow_with_the_output(smollm2_tokenizer: PreTrainedTokenizerBase) -> None:
    counting = _CountingTokenizer(smollm2_tokenizer)
    output_ids = encode(smollm2_tokenizer, f"{MIXED} {CHINESE} {ZWJ} " * 40)
    detokenizer = IncrementalDetokenizer(
        counting, chat_prompt(smollm2_tokenizer), SamplingParams(stop=("zzz",))
    )
    for token_id in output_ids:
        detokenizer.append(token_id)
    assert len(output_ids) > 1000
    assert len(counting.lengths) <= 2 * len(output_ids)
    assert max(counting.lengths) <= 16
