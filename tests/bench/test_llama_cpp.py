"""The llama.cpp baseline's plumbing, with stand-in binaries (a real build is optional and not part of the
suite): the GGUF is requantized to bf16 and Q8_0 with the right arguments, and llama-bench's JSON is read
for the best of its repeats of the requested generation length."""

import stat
from pathlib import Path

import pytest

from tokenmill.bench import llama_cpp

QUANTIZE = """#!/bin/sh
# llama-quantize --allow-requantize IN OUT TYPE: record the call, write OUT
echo "$@" >> "$(dirname "$0")/calls"
echo "$4" > "$3"
"""

BENCH = """#!/bin/sh
echo "$@" >> "$(dirname "$0")/calls"
cat <<'JSON'
[{"n_prompt": 0, "n_gen": 127, "avg_ts": 100.0, "samples_ts": [95.0, 110.5, 94.5]},
 {"n_prompt": 512, "n_gen": 0, "avg_ts": 900.0, "samples_ts": [900.0]}]
JSON
"""


def install(directory: Path, name: str, script: str) -> None:
    path = directory / "bin" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(script)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_requantize_and_read_the_best_generation_speed(tmp_path):
    install(tmp_path, "llama-quantize", QUANTIZE)
    install(tmp_path, "llama-bench", BENCH)
    source = tmp_path / "model.Q4_1.gguf"
    source.write_text("gguf")

    outputs = llama_cpp.requantize(tmp_path, source, tmp_path)
    assert {name: path.read_text().strip() for name, path in outputs.items()} == {
        "bf16": "BF16",
        "q8_0": "Q8_0",
    }
    assert llama_cpp.decode_tokens_per_s(tmp_path, outputs["bf16"], 127, threads=2, repeat=3) == 110.5

    calls = (tmp_path / "bin" / "calls").read_text().splitlines()
    assert calls[0].startswith(f"--allow-requantize {source} ") and calls[0].endswith(" BF16")
    assert calls[2].split() == [
        "-m",
        str(outputs["bf16"]),
        "-p",
        "0",
        "-n",
        "127",
        "-t",
        "2",
        "-r",
        "3",
        "-o",
        "json",
    ]


def test_a_missing_build_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="llama-bench is not in"):
        llama_cpp.decode_tokens_per_s(tmp_path, tmp_path / "x.gguf", 16, threads=1, repeat=1)


def test_a_run_without_the_requested_length_is_an_error(tmp_path):
    install(tmp_path, "llama-bench", BENCH)
    with pytest.raises(RuntimeError, match="no 64-token generation run"):
        llama_cpp.decode_tokens_per_s(tmp_path, tmp_path / "x.gguf", 64, threads=1, repeat=1)
