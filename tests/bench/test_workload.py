"""Synthetic and JSONL workloads: lengths, determinism, shared prefixes, and the JSONL format's errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tokenmill.bench.workload import SyntheticWorkload, load_jsonl


def words(text: str) -> int:
    return len(text.split())


def test_fixed_lengths_and_determinism() -> None:
    workload = SyntheticWorkload(input_len=50, output_len=16, seed=3)
    request = workload.request(0)
    assert words(request.messages[0]["content"]) == 50 and request.max_tokens == 16
    assert request.prompt == request.messages[0]["content"]
    assert workload.request(0) == SyntheticWorkload(input_len=50, output_len=16, seed=3).request(0)
    assert workload.request(1) != request  # each request has its own text
    assert SyntheticWorkload(input_len=50, output_len=16, seed=4).request(0) != request


def test_random_lengths_stay_in_range() -> None:
    workload = SyntheticWorkload(input_len=100, output_len=40, range_ratio=0.5)
    requests = [workload.request(i) for i in range(200)]
    inputs = [words(r.messages[0]["content"]) for r in requests]
    outputs = [r.max_tokens for r in requests]
    assert min(inputs) >= 50 and max(inputs) <= 150 and len(set(inputs)) > 20
    assert min(outputs) >= 20 and max(outputs) <= 60 and len(set(outputs)) > 10


def test_shared_prefix() -> None:
    workload = SyntheticWorkload(input_len=10, output_len=8, prefix_len=200, num_prefixes=2)
    a, b, c = (workload.request(i) for i in range(3))
    assert [m["role"] for m in a.messages] == ["system", "user"]
    assert words(a.messages[0]["content"]) == 200
    assert a.messages[0] == c.messages[0] != b.messages[0]  # request i uses prefix i mod 2
    assert a.messages[1] != c.messages[1]
    assert a.prompt is not None and a.prompt.startswith(a.messages[0]["content"])
    assert a.body("completions")["prompt"] == a.prompt
    other_seed = SyntheticWorkload(input_len=10, output_len=8, prefix_len=200, num_prefixes=2, seed=1)
    assert other_seed.request(0).messages[0] != a.messages[0]  # a sweep's points do not share a cache


def test_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "prompts.jsonl"
    lines: list[dict[str, Any]] = [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]},
        {"prompt": "Once upon a time", "max_tokens": 7},
    ]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    workload = load_jsonl(path, "chat", default_max_tokens=32)
    first, second = workload.request(0), workload.request(1)
    assert first.body("chat") == {"messages": lines[0]["messages"], "max_tokens": 32}
    assert second.body("chat") == {
        "messages": [{"role": "user", "content": "Once upon a time"}],
        "max_tokens": 7,
    }
    assert workload.request(2) == first  # cycles
    with pytest.raises(ValueError, match="use --endpoint chat"):
        first.body("completions")
    with pytest.raises(ValueError, match=r"prompts.jsonl:1: chat messages cannot be sent to /completions"):
        load_jsonl(path, "completions", 32)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not JSON"),
        ('{"prompt": "x", "max_tokens": 0}', "max_tokens must be a positive integer"),
        ('{"text": "x"}', "expected a string 'prompt'"),
        ("[1, 2]", "expected an object"),
    ],
)
def test_jsonl_errors_name_the_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "fine"}\n' + line + "\n")
    with pytest.raises(ValueError, match=f"bad.jsonl:2: {message}"):
        load_jsonl(path, "chat", 16)
