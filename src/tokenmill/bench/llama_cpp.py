"""llama.cpp as the baseline of `tokenmill bench decode --llama-cpp DIR`: its own single-stream decode speed
(`llama-bench`, text generation only) on the same GGUF, requantized by its `llama-quantize` to bfloat16 and to
Q8_0 so each of tokenmill's engines meets its like.

DIR holds the binaries of a llama.cpp build (`llama-bench`, `llama-quantize`). Building one is optional and
not part of the tests; README ("Single-stream decode") has the commands.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

FORMATS = {"bf16": "BF16", "q8_0": "Q8_0"}
"""Our name -> llama-quantize's type name."""


def find_binary(directory: Path, name: str) -> Path:
    for candidate in (directory / name, directory / "bin" / name):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{name} is not in {directory} (nor its bin/): build llama.cpp first, see README")


def requantize(llama_dir: Path, source: Path, work: Path) -> dict[str, Path]:
    """The source GGUF in each of FORMATS (already-quantized tensors are requantized from their values)."""
    quantize = find_binary(llama_dir, "llama-quantize")
    outputs = {}
    for name, kind in FORMATS.items():
        target = work / f"{source.stem}.{name}.gguf"
        result = subprocess.run(
            [str(quantize), "--allow-requantize", str(source), str(target), kind],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise RuntimeError(f"llama-quantize to {kind} failed:\n{result.stderr[-2000:]}")
        outputs[name] = target
    return outputs


def decode_tokens_per_s(llama_dir: Path, gguf: Path, output_len: int, threads: int, repeat: int) -> float:
    """llama-bench's text-generation speed for `output_len` tokens after an empty prompt: the best of its
    repeats, as tokenmill's engines are counted (noise on a shared machine only ever slows a run down)."""
    bench = find_binary(llama_dir, "llama-bench")
    command = [str(bench), "-m", str(gguf), "-p", "0", "-n", str(output_len), "-t", str(threads)]
    result = subprocess.run([*command, "-r", str(repeat), "-o", "json"], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"llama-bench failed:\n{result.stderr[-2000:]}")
    runs = [run for run in json.loads(result.stdout) if run.get("n_gen") == output_len]
    if not runs:
        raise RuntimeError(
            f"llama-bench reported no {output_len}-token generation run:\n{result.stdout[-2000:]}"
        )
    return float(max(runs[0].get("samples_ts") or [runs[0]["avg_ts"]]))
