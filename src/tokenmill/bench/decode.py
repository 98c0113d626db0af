"""Single-stream decode speed against its ceiling, in one run: the tokens/s one user's stream gets with the
CPU kernels (the whole decode step in one call, the default), with the same kernels called one operator at
a time, with torch ops only, and with int8 weights (`quantization="int8"`, the kernels on), each against
the memory-bandwidth roofline of the bytes it reads.

Decoding one sequence is memory-bound: every step reads all the weights (and the sequence's KV cache) once,
so no engine can beat

    roofline tokens/s = memory read bandwidth / bytes read per step

The bandwidth is measured here (all threads reading a buffer far larger than the caches, the best pass of
every round), the bytes are the model's: every weight (int8 ones at a byte each), the embedding table only where
the output head is tied to it (otherwise one row of it is read), plus the KV cache at the run's average
context.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tokenmill.engine.sampling_params import SamplingParams


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3, help="alternating runs per engine; the best counts")
    parser.add_argument(
        "--llama-cpp",
        type=Path,
        metavar="DIR",
        help="also run llama.cpp's llama-bench (from this build directory) on the same GGUF, as bf16 and Q8_0",
    )
    parser.add_argument("--output", type=Path, default=Path("bench-results/decode.json"))


def bytes_per_step(llm: object, context: int) -> int:
    """What one decode step of one sequence reads: the weights it multiplies with and its KV cache."""
    from tokenmill.bench.compute import kv_bytes_per_token
    from tokenmill.models.quantization import weight_bytes_per_step

    model = llm.engine.runner.model
    return weight_bytes_per_step(model) + context * kv_bytes_per_token(model)


def decode_seconds(llm: object, prompt: list[int], output_len: int) -> float:
    """Time of one sequence's decode steps alone: generation of output_len tokens minus that of one."""
    params = SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=0.0)
    first = SamplingParams(max_tokens=1, ignore_eos=True, temperature=0.0)
    start = time.perf_counter()
    llm.generate([prompt], first)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    llm.generate([prompt], params)
    return time.perf_counter() - start - prefill


ENGINES = {  # name -> engine settings besides the model and dtype
    "kernel": {"cpu_kernels": "kernel"},
    "per-op": {"cpu_kernels": "per-op"},
    "torch": {"cpu_kernels": "torch"},
    "int8": {"cpu_kernels": "kernel", "quantization": "int8"},
}


def run(args: argparse.Namespace) -> dict:
    import torch

    from tokenmill.bench.compute import measure_read_bandwidth
    from tokenmill.engine.llm_engine import LLM

    engines = {
        name: LLM(args.model, dtype=args.dtype, max_num_seqs=1, kv_cache_memory=256 << 20, **settings)
        for name, settings in ENGINES.items()
    }
    prompt = list(range(100, 100 + args.prompt_len))
    steps = args.output_len - 1
    for llm in engines.values():
        decode_seconds(llm, prompt, 4)  # warm up: kernels built, memory touched
    best = dict.fromkeys(engines, float("inf"))
    bandwidth = None
    for _ in range(args.repeat):
        for name, llm in engines.items():
            best[name] = min(best[name], decode_seconds(llm, prompt, args.output_len))
            print(
                f"{name:7s} {steps} decode steps in {best[name]:6.3f} s = {steps / best[name]:7.1f} tokens/s"
            )
        # Measured beside every round, the best counts: like the engines' speed, it only ever drops under
        # other load, and the roofline must be the machine's, not a busy moment's.
        measured = measure_read_bandwidth()
        bandwidth = measured if bandwidth is None or measured is None else max(bandwidth, measured)
    result: dict = {
        "model": args.model,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "prompt_len": args.prompt_len,
        "output_len": args.output_len,
        "repeat": args.repeat,
        "read_bandwidth_gb_s": None if bandwidth is None else bandwidth / 1e9,
    }
    context = args.prompt_len + args.output_len // 2
    for name, llm in engines.items():
        figures = {"tokens_per_s": steps / best[name], "bytes_per_step": bytes_per_step(llm, context)}
        if bandwidth is not None:
            figures["roofline_tokens_per_s"] = bandwidth / figures["bytes_per_step"]
            figures["share_of_roofline"] = figures["tokens_per_s"] / figures["roofline_tokens_per_s"]
        result[name] = figures
    result["kernel_speedup"] = result["kernel"]["tokens_per_s"] / result["torch"]["tokens_per_s"]
    result["whole_step_speedup"] = result["kernel"]["tokens_per_s"] / result["per-op"]["tokens_per_s"]
    result["int8_speedup"] = result["int8"]["tokens_per_s"] / result["kernel"]["tokens_per_s"]
    for name, figures in result.items():
        if name in engines:
            roofline = (
                f", roofline {figures['roofline_tokens_per_s']:.1f} ({figures['share_of_roofline']:.0%} reached)"
                if bandwidth is not None
                else ""
            )
            print(
                f"{name:7s} {figures['tokens_per_s']:7.1f} tokens/s, {figures['bytes_per_step'] / 1e6:.1f} MB "
                f"read per step{roofline}"
            )
    if args.llama_cpp is not None:
        result["llama.cpp"] = llama_cpp_figures(args, torch.get_num_threads())
        for name, ours in (("bf16", "kernel"), ("q8_0", "int8")):
            theirs = result["llama.cpp"][f"{name}_tokens_per_s"]
            result["llama.cpp"][f"{ours}_vs_{name}"] = result[ours]["tokens_per_s"] / theirs
            print(
                f"llama.cpp {name:5s} {theirs:7.1f} tokens/s: tokenmill {ours} "
                f"{result[ours]['tokens_per_s']:.1f} = {result['llama.cpp'][f'{ours}_vs_{name}']:.2f}x"
            )
    if bandwidth is not None:
        print(f"memory read bandwidth {bandwidth / 1e9:.1f} GB/s (all {torch.get_num_threads()} threads)")
    print(
        f"best of {args.repeat}: C kernels {result['kernel_speedup']:.2f}x torch ops (whole steps "
        f"{result['whole_step_speedup']:.2f}x the kernels one operator at a time); int8 "
        f"{result['int8_speedup']:.2f}x {args.dtype} with the kernels"
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    return result


def llama_cpp_figures(args: argparse.Namespace, threads: int) -> dict:
    """llama-bench on the run's model, requantized to bf16 and Q8_0 in a scratch directory."""
    import tempfile

    from tokenmill.bench import llama_cpp
    from tokenmill.models.loader import resolve_model

    source = resolve_model(args.model)
    if source.gguf_file is None:
        raise SystemExit("--llama-cpp needs a GGUF model (a .gguf file or the built-in smollm2)")
    figures: dict = {"threads": threads}
    with tempfile.TemporaryDirectory(prefix="tokenmill-llama-cpp-") as scratch:
        ggufs = llama_cpp.requantize(args.llama_cpp, Path(source.path) / source.gguf_file, Path(scratch))
        for name, gguf in ggufs.items():
            figures[f"{name}_tokens_per_s"] = llama_cpp.decode_tokens_per_s(
                args.llama_cpp, gguf, args.output_len - 1, threads, args.repeat
            )
    return figures


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="tokenmill bench decode", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
