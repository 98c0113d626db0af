"""The fine-tuning file validator: every problem is reported with its line, and conversations are tokenized
exactly as the server renders chat requests, with only the assistant's replies (and their end-of-turn token)
trained."""

from __future__ import annotations

import json

import pytest

from tokenmill.jobs.training_data import (
    IGNORE_INDEX,
    TrainingDataError,
    TrainingSet,
    parse_chat_jsonl,
    render_prompt,
)
from tokenmill.serving.prompts import render_chat
from tokenmill.serving.protocol import ChatMessage

CONTEXT = 8192


def example(question: str = "What is 2 + 2?", answer: str = "4.") -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def jsonl(*items: object) -> bytes:
    return "\n".join(item if isinstance(item, str) else json.dumps(item) for item in items).encode()


def good_lines(n: int = 10) -> list[dict]:
    return [example(f"Question {i}?", f"Answer {i}.") for i in range(n)]


def problems_of(data: bytes, tokenizer, **kwargs) -> list[tuple[int | None, str]]:
    with pytest.raises(TrainingDataError) as caught:
        parse_chat_jsonl(data, tokenizer, kwargs.pop("max_tokens", CONTEXT), **kwargs)
    assert isinstance(caught.value, ValueError)
    return caught.value.problems


def test_a_valid_file_becomes_one_example_per_line(smollm2_tokenizer):
    data = jsonl(*good_lines(12)) + b"\n"  # a final newline is no example
    training = parse_chat_jsonl(data, smollm2_tokenizer, CONTEXT)
    assert isinstance(training, TrainingSet)
    assert training.num_examples == 12
    assert [e.line for e in training.examples] == list(range(1, 13))
    assert training.num_tokens == sum(len(e.input_ids) for e in training.examples)
    assert all(len(e.input_ids) == len(e.labels) for e in training.examples)


@pytest.mark.parametrize(
    ("bad_line", "expected"),
    [
        (b"\xff\xfe not text", "not valid UTF-8"),
        ('{"messages": [', "not valid JSON"),
        ("[1, 2]", 'must be a JSON object with a "messages" array, got an array'),
        (
            {"prompt": "hi", "completion": "there"},
            'missing "messages" (prompt/completion pairs are the legacy',
        ),
        ({**example(), "note": "x"}, 'unknown field "note"; an example holds only "messages"'),
        ({}, 'missing "messages"'),
        ({"messages": "hi"}, '"messages" must be an array, got a string'),
        ({"messages": []}, '"messages" is empty'),
        ({"messages": ["hi"]}, "messages[0] must be an object, got a string"),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]},
            "messages[1].role must be one of system, user, assistant",
        ),
        ({"messages": [{"content": "a"}]}, "messages[0].role must be one of system, user, assistant"),
        (
            {
                "messages": [
                    {"role": "user", "content": "a", "mood": "happy"},
                    {"role": "assistant", "content": "b"},
                ]
            },
            'messages[0]: unknown field "mood"',
        ),
        (
            {"messages": [{"role": "user"}, {"role": "assistant", "content": "b"}]},
            "messages[0].content is required",
        ),
        (
            {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "b"}]},
            "messages[0].content must be a string or an array of text parts",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                    {"role": "assistant", "content": "b"},
                ]
            },
            "messages[0].content[0]: only text parts are supported, got 'image_url'",
        ),
        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
        (
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "b", "weight": 0},
                ]
            },
            "every assistant message has weight 0",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "b", "weight": 2},
                ]
            },
            "messages[1].weight must be 0 or 1",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "a", "weight": 1},
                    {"role": "assistant", "content": "b"},
                ]
            },
            "messages[0].weight: only assistant messages have a weight",
        ),
        ({**example(), "tools": [{"type": "function"}]}, '"tools": fine-tuning on tool or function calls'),
        (
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "assistant", "content": None, "tool_calls": [{"id": "c"}]},
                ]
            },
            "messages[1].tool_calls: fine-tuning on tool or function calls is not supported",
        ),
        (
            {"messages": [{"role": "tool", "content": "42"}, {"role": "assistant", "content": "b"}]},
            "messages[0].role: 'tool' messages are not supported",
        ),
    ],
)
def test_each_bad_line_is_reported_with_its_line_number(smollm2_tokenizer, bad_line, expected):
    lines: list[object] = list(good_lines(12))
    lines.insert(6, bad_line)  # line 7
    if isinstance(bad_line, bytes):
        data = jsonl(*lines[:6]) + b"\n" + bad_line + b"\n" + jsonl(*lines[7:])
    else:
        data = jsonl(*lines)
    problems = problems_of(data, smollm2_tokenizer)
    assert len(problems) == 1, problems
    line, message = problems[0]
    assert line == 7
    assert expected in message


def test_the_error_message_names_the_first_problems_and_keeps_twenty(smollm2_tokenizer):
    lines = good_lines(10) + [{"messages": [{"role": "robot", "content": "x"}]}] * 30
    with pytest.raises(TrainingDataError) as caught:
        parse_chat_jsonl(jsonl(*lines), smollm2_tokenizer, CONTEXT)
    error = caught.value
    assert error.total == 30
    assert len(error.problems) == 20
    assert [line for line, _ in error.problems] == list(range(11, 31))
    assert str(error).startswith(
        "line 11: messages[0].role must be one of system, user, assistant; line 12: "
    )
    assert "(and 27 more problems)" in str(error)


def test_every_line_is_checked_before_giving_up(smollm2_tokenizer):
    lines: list[object] = list(good_lines(10))
    lines[2] = "not json"
    lines[8] = {"messages": []}
    problems = problems_of(jsonl(*lines), smollm2_tokenizer)
    assert [line for line, _ in problems] == [3, 9]


def test_blank_lines_count_in_line_numbers(smollm2_tokenizer):
    data = jsonl(*good_lines(10)).replace(b"\n", b"\n\n", 1) + b"\n{}"
    assert problems_of(data, smollm2_tokenizer)[0][0] == 12


def test_an_example_longer_than_the_context_is_refused_naming_the_limit(smollm2_tokenizer):
    lines = good_lines(10) + [example("word " * 200, "ok")]
    problems = problems_of(jsonl(*lines), smollm2_tokenizer, max_tokens=128)
    assert len(problems) == 1
    line, message = problems[0]
    assert line == 11
    assert "more than the model's context of 128 tokens" in message


def test_too_few_examples(smollm2_tokenizer):
    problems = problems_of(jsonl(*good_lines(9)), smollm2_tokenizer)
    assert problems == [(None, "the file has 9 examples; training needs at least 10")]
    assert (
        parse_chat_jsonl(jsonl(*good_lines(3)), smollm2_tokenizer, CONTEXT, min_examples=3).num_examples == 3
    )


def test_empty_file(smollm2_tokenizer):
    assert problems_of(b"", smollm2_tokenizer) == [
        (None, "the file has 0 examples; training needs at least 10")
    ]


def test_too_large_a_file_is_refused_before_reading_it(smollm2_tokenizer):
    data = jsonl(*good_lines(10))
    problems = problems_of(data, smollm2_tokenizer, max_file_bytes=100)
    assert len(problems) == 1
    assert problems[0][0] is None
    assert "larger than the limit of 100 bytes" in problems[0][1]


def trained_text(tokenizer, ex) -> list[str]:
    """The decoded runs of trained tokens, in order."""
    runs: list[list[int]] = []
    previous = IGNORE_INDEX
    for token, label in zip(ex.input_ids, ex.labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            if previous == IGNORE_INDEX:
                runs.append([])
            runs[-1].append(token)
        previous = label
    return [tokenizer.decode(run) for run in runs]


CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome."},
    ],
    [
        {"role": "user", "content": [{"type": "text", "text": "Two"}, {"type": "text", "text": "parts"}]},
        {"role": "assistant", "content": "Seen\nboth.", "weight": 1},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "You're welcome."},
    ],
]


def test_only_assistant_replies_and_their_end_of_turn_token_are_trained(smollm2_tokenizer):
    lines = [{"messages": c} for c in CONVERSATIONS] * 4
    training = parse_chat_jsonl(jsonl(*lines), smollm2_tokenizer, CONTEXT)
    replies = [
        [m["content"] + "<|im_end|>" for m in conversation if m["role"] == "assistant"]
        for conversation in CONVERSATIONS
    ]
    for ex, expected in zip(training.examples, replies, strict=False):
        assert trained_text(smollm2_tokenizer, ex) == expected
    # The end-of-turn token the model learns to emit is the one the server stops on (eos).
    first = training.examples[0]
    assert first.labels[-1] == first.input_ids[-1] == smollm2_tokenizer.eos_token_id
    assert first.num_trained_tokens == len(smollm2_tokenizer.encode("Hello! How can I help?")) + 1


def test_weight_zero_replies_stay_in_context_untrained(smollm2_tokenizer):
    conversation = [
        {"role": "user", "content": "Say A"},
        {"role": "assistant", "content": "B", "weight": 0},
        {"role": "user", "content": "No, say A"},
        {"role": "assistant", "content": "A", "weight": 1},
        {"role": "user", "content": "Trailing question nobody answers"},
    ]
    training = parse_chat_jsonl(jsonl(*[{"messages": conversation}] * 10), smollm2_tokenizer, CONTEXT)
    ex = training.examples[0]
    assert trained_text(smollm2_tokenizer, ex) == ["A<|im_end|>"]
    text = smollm2_tokenizer.decode(ex.input_ids)
    assert "B<|im_end|>" in text  # the untrained reply is context
    assert "Trailing" not in text  # nothing after the last trained reply


def test_prompts_equal_the_servers_chat_rendering(smollm2_tokenizer):
    """Before every trained reply, the example holds exactly what the server feeds the model for that
    conversation so far (render_chat), so the fine-tuned model is trained on the prompts it will see."""
    lines = [{"messages": c} for c in CONVERSATIONS] * 4
    training = parse_chat_jsonl(jsonl(*lines), smollm2_tokenizer, CONTEXT)
    for conversation, ex in zip(CONVERSATIONS, training.examples, strict=False):
        starts = [
            i
            for i in range(1, len(ex.labels))
            if ex.labels[i] != IGNORE_INDEX and ex.labels[i - 1] == IGNORE_INDEX
        ]
        assistant_turns = [i for i, m in enumerate(conversation) if m["role"] == "assistant"]
        assert len(starts) == len(assistant_turns)
        for start, turn in zip(starts, assistant_turns, strict=True):
            served = render_chat(
                smollm2_tokenizer,
                [ChatMessage(role=m["role"], content=m["content"]) for m in conversation[:turn]],
                "smollm2",
            )
            assert list(ex.input_ids[:start]) == served
            texts = [
                m["content"] if isinstance(m["content"], str) else "\n".join(p["text"] for p in m["content"])
                for m in conversation[:turn]
            ]
            plain = [{"role": m["role"], "content": t} for m, t in zip(conversation, texts, strict=False)]
            assert render_prompt(smollm2_tokenizer, plain) == served


def test_a_reply_starting_with_spaces_keeps_the_servers_prompt(smollm2_tokenizer):
    """BPE merges the generation prompt's newline with a reply's leading spaces when the history is rendered
    again; the later prompt must still equal the server's."""
    conversation = [
        {"role": "user", "content": "Indent"},
        {"role": "assistant", "content": "  x"},
        {"role": "user", "content": "Again"},
        {"role": "assistant", "content": "y"},
    ]
    ex = parse_chat_jsonl(jsonl(*[{"messages": conversation}] * 10), smollm2_tokenizer, CONTEXT).examples[0]
    start = len(ex.labels) - 1 - list(reversed(ex.labels)).index(IGNORE_INDEX)
    served = render_chat(smollm2_tokenizer, [ChatMessage(**m) for m in conversation[:3]], "smollm2")
    assert list(ex.input_ids[: start + 1]) == served
    assert trained_text(smollm2_tokenizer, ex)[-1] == "y<|im_end|>"
