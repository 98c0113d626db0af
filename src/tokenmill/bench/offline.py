"""Offline throughput: the same requests through tokenmill and through `transformers` `generate`, in one run.

The baseline is `generate` used the way a Python user would: static batches (default 32) left-padded to
the longest prompt, each batch run to its longest requested output; only requested tokens count as useful.
tokenmill gets the same requests, each with its own SamplingParams, and batches them continuously.

`--guided-fraction F` also runs tokenmill on the same requests with a fraction F of them constrained to a
JSON schema (structured output) and reports the throughput ratio: the cost of the grammar masks.

Both engines' throughput is also given as a share of the compute roofline: the workload's useful FLOPs per
second over the measured peak of a large matrix product in the serving dtype (bench/compute.py). Beside it,
the memory floor: the bytes any engine must read for the workload (the weights once per forward pass, the
cached K/V of every decode) over the measured read bandwidth, and the share of the compute roofline that
bounds (where a CPU computes far faster than it reads memory, as with AMX, it is well below 100%).

`--loras N` also runs tokenmill on the same requests spread round-robin over N random LoRA adapters (written
for the model into a temporary directory, rank `--lora-rank`, all seven projections adapted), all served in
the same batches, and reports the throughput ratio against the base model alone: the cost of multi-LoRA.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from tokenmill.engine.sampling_params import Guidance, SamplingParams

if TYPE_CHECKING:  # torch and the engine load in `run`, so `tokenmill --help` stays fast
    import torch

    from tokenmill.engine.llm_engine import LLM
    from tokenmill.engine.lora import LoRARequest


@dataclass(frozen=True, slots=True)
class Workload:
    prompts: list[list[int]]
    output_lengths: list[int]
    params: list[SamplingParams]

    @property
    def num_output_tokens(self) -> int:
        return sum(self.output_lengths)


def make_workload(
    num_requests: int,
    prompt_range: tuple[int, int],
    output_range: tuple[int, int],
    vocab_size: int,
    distribution: str,
    seed: int,
) -> Workload:
    """Random-token prompts; lengths drawn log-uniformly (many short requests, a few long ones, as in chat
    traffic) or uniformly. Every request gets its own sampling settings, as users send them."""
    rng = random.Random(seed)

    def draw(low: int, high: int) -> int:
        if distribution == "uniform":
            return rng.randint(low, high)
        return round(math.exp(rng.uniform(math.log(low), math.log(high))))

    prompts, lengths, params = [], [], []
    for i in range(num_requests):
        prompts.append([rng.randrange(100, vocab_size) for _ in range(draw(*prompt_range))])
        lengths.append(draw(*output_range))
        style = i % 4
        params.append(
            SamplingParams(
                max_tokens=lengths[-1],
                ignore_eos=True,  # outputs run to the requested length on both sides
                temperature=(0.0, 0.7, 1.0, 0.9)[style],
                top_p=(1.0, 0.9, 1.0, 0.95)[style],
                top_k=(0, 0, 50, 0)[style],
                seed=i if style == 2 else None,
                frequency_penalty=0.2 if style == 3 else 0.0,
            )
        )
    return Workload(prompts, lengths, params)


ENDLESS_RECORDS = Guidance.json_schema(
    {
        "type": "array",
        "minItems": 100_000,
        "items": {
            "type": "object",
            "properties": {
                "id": {"type": "integer"},
                "name": {"type": "string", "maxLength": 24},
                "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
            },
            "required": ["id", "name", "tags"],
            "additionalProperties": False,
        },
    }
)
"""A schema no request can complete within its max_tokens: constrained requests produce exactly as many
tokens as their unconstrained twins, so the two runs' throughputs compare like for like."""


def guided_workload(workload: Workload, fraction: float) -> Workload:
    """The same requests with `fraction` of them, spread evenly, constrained to `ENDLESS_RECORDS`."""
    params = [
        replace(p, guidance=ENDLESS_RECORDS) if int((i + 1) * fraction) > int(i * fraction) else p
        for i, p in enumerate(workload.params)
    ]
    return replace(workload, params=params)


def write_random_adapters(
    model: torch.nn.Module, directory: Path, count: int, rank: int, seed: int
) -> list[LoRARequest]:
    """`count` PEFT-format LoRA adapters for `model` with random weights, every supported projection of
    every layer adapted: what a fine-tuning run would leave behind, without loading the model in PEFT."""
    import torch
    from safetensors.torch import save_file

    from tokenmill.engine.lora import LoRARequest
    from tokenmill.models.lora_layers import PARENT, target_shapes

    shapes = target_shapes(model)
    generator = torch.Generator().manual_seed(seed)
    adapters = []
    for index in range(count):
        path = directory / f"adapter-{index}"
        path.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for layer in range(len(model.layers)):
            for target, (in_features, out_features) in shapes.items():
                prefix = f"base_model.model.model.layers.{layer}.{PARENT[target]}.{target}"
                lora_a = torch.randn(rank, in_features, generator=generator) / in_features**0.5
                tensors[f"{prefix}.lora_A.weight"] = lora_a
                tensors[f"{prefix}.lora_B.weight"] = (
                    torch.randn(out_features, rank, generator=generator) * 0.01
                )
        save_file(tensors, str(path / "adapter_model.safetensors"))
        config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": sorted(shapes)}
        (path / "adapter_config.json").write_text(json.dumps({**config, "bias": "none"}))
        adapters.append(LoRARequest(f"bench-lora-{index}", str(path)))
    return adapters


def lora_workload(workload: Workload, adapters: list[LoRARequest]) -> Workload:
    """The same requests, the i-th one under adapter i mod len(adapters)."""
    params = [replace(p, lora=adapters[i % len(adapters)]) for i, p in enumerate(workload.params)]
    return replace(workload, params=params)


def run_tokenmill(llm: LLM, workload: Workload) -> tuple[float, int]:
    start = time.perf_counter()
    outputs = llm.generate(workload.prompts, workload.params)
    elapsed = time.perf_counter() - start
    produced = sum(len(o.outputs[0].token_ids) for o in outputs)
    return elapsed, produced


def run_transformers(
    model: torch.nn.Module, workload: Workload, batch_size: int, pad_id: int
) -> tuple[float, int]:
    """Greedy `generate` over static left-padded batches; useful tokens = min(generated, requested)."""
    import torch

    start = time.perf_counter()
    useful = 0
    for first in range(0, len(workload.prompts), batch_size):
        prompts = workload.prompts[first : first + batch_size]
        wanted = workload.output_lengths[first : first + batch_size]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max(wanted),
                min_new_tokens=max(wanted),
                do_sample=False,
                pad_token_id=pad_id,
            )
        useful += sum(min(out.shape[1] - width, n) for n in wanted)
    return time.perf_counter() - start, useful


def load_reference(model: str, dtype: torch.dtype) -> torch.nn.Module:
    """The same checkpoint as a transformers model (GGUF sources go through our reader: exact same weights)."""
    from transformers import AutoModelForCausalLM

    from tokenmill.models.loader import iter_weights, load_hf_config, resolve_model

    source = resolve_model(model)
    config = load_hf_config(source)
    reference = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = reference.load_state_dict(dict(iter_weights(source, dtype)), strict=False)
    # A tied checkpoint has no lm_head of its own; anything else missing would make the baseline a random model.
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise ValueError(f"reference model does not match the checkpoint: {missing[:3]} {unexpected[:3]}")
    reference.tie_weights()
    return reference.eval()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, nargs=2, default=(32, 512), metavar=("MIN", "MAX"))
    parser.add_argument("--output-len", type=int, nargs=2, default=(16, 256), metavar=("MIN", "MAX"))
    parser.add_argument("--distribution", choices=("loguniform", "uniform"), default="loguniform")
    parser.add_argument("--hf-batch-size", type=int, default=32)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--repeat", type=int, default=3, help="alternating runs per engine; the best counts")
    parser.add_argument(
        "--guided-fraction",
        type=float,
        default=0.0,
        help="also run tokenmill with this fraction of the requests constrained to a JSON schema",
    )
    parser.add_argument(
        "--loras",
        type=int,
        default=0,
        help="also run tokenmill with the requests spread round-robin over this many random LoRA adapters",
    )
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--output", type=Path, default=Path("bench-results/offline.json"))


def run(args: argparse.Namespace) -> dict:
    """Alternate the engines `--repeat` times and compare their best runs: on a shared machine noise only
    ever slows a run down, and alternating exposes both engines to the same conditions."""
    import torch

    from tokenmill.bench.compute import gemm_peak, measure_read_bandwidth, memory_floor, useful_flops
    from tokenmill.engine.llm_engine import LLM

    llm = LLM(
        args.model,
        dtype=args.dtype,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        kv_cache_memory=2 << 30,
        # Every run computes every prompt: with the prefix cache on, runs after the first would find the
        # same prompts' K/V still cached and skip most of the work (transformers recomputes them).
        enable_prefix_caching=False,
        max_loras=max(args.loras, 1),
        max_lora_rank=max(args.lora_rank, 1),
    )
    workload = make_workload(
        args.num_requests,
        tuple(args.prompt_len),
        tuple(args.output_len),
        llm.engine.vocab_size,
        args.distribution,
        args.seed,
    )
    warmup = make_workload(
        max(4, args.loras), (16, 32), (4, 8), llm.engine.vocab_size, "uniform", args.seed + 1
    )
    engines: dict[str, Callable[[Workload], tuple[float, int]]] = {
        "tokenmill": lambda w: run_tokenmill(llm, w)
    }
    if args.guided_fraction > 0:
        guided = guided_workload(workload, args.guided_fraction)
        engines["tokenmill-guided"] = lambda w: run_tokenmill(llm, guided if w is workload else w)
    adapter_dir = tempfile.TemporaryDirectory(prefix="tokenmill-bench-lora-")
    if args.loras > 0:
        adapters = write_random_adapters(
            llm.engine.runner.model, Path(adapter_dir.name), args.loras, args.lora_rank, args.seed
        )
        lora = lora_workload(workload, adapters)
        engines["tokenmill-lora"] = lambda w: run_tokenmill(
            llm, lora if w is workload else lora_workload(w, adapters)
        )
    if not args.skip_transformers:
        reference = load_reference(args.model, getattr(torch, args.dtype))
        engines["transformers"] = lambda w: run_transformers(reference, w, args.hf_batch_size, pad_id=0)
    prompt_lens = [len(p) for p in workload.prompts]
    flops = useful_flops(llm.engine.runner.model, prompt_lens, workload.output_lengths)
    # The peak is measured before and after the runs and the better kept: a busy moment on a shared machine
    # only lowers it, and a low peak would overstate the engines' share of it.
    peak_before = gemm_peak(getattr(torch, args.dtype)) if flops is not None else {}
    bandwidth_before = measure_read_bandwidth() if flops is not None else None
    runs: dict[str, list[tuple[float, int]]] = {name: [] for name in engines}
    with adapter_dir:
        for engine in engines.values():
            engine(warmup)
        for _ in range(args.repeat):
            for name, engine in engines.items():
                runs[name].append(engine(workload))
                seconds, tokens = runs[name][-1]
                print(f"{name:14s} {tokens:6d} tokens in {seconds:7.2f} s = {tokens / seconds:8.1f} tokens/s")
    result: dict = {
        "model": args.model,
        "dtype": args.dtype,
        "num_requests": args.num_requests,
        "distribution": args.distribution,
        "prompt_len": args.prompt_len,
        "output_len": args.output_len,
        "requested_output_tokens": workload.num_output_tokens,
        "prompt_tokens": sum(prompt_lens),
        "threads": torch.get_num_threads(),
        "repeat": args.repeat,
        "cached_prompt_tokens": llm.engine.stats().num_cached_prompt_tokens,
    }
    if flops is not None:
        peak_after = gemm_peak(getattr(torch, args.dtype))
        rates = {name: max(rate, peak_before[name]) for name, rate in peak_after.items()}
        result["useful_flops"] = flops
        result["gemm_flops_per_s"] = rates
        bandwidths = [b for b in (bandwidth_before, measure_read_bandwidth()) if b is not None]
        if bandwidths:
            model, compute_seconds = llm.engine.runner.model, flops / rates["peak"]
            result |= memory_floor(
                model, prompt_lens, workload.output_lengths, max(bandwidths), compute_seconds
            )
    for name, measured in runs.items():
        seconds, tokens = min(measured)
        result[name] = {
            "best_seconds": seconds,
            "output_tokens": tokens,
            "tokens_per_s": tokens / seconds,
            "all_seconds": [s for s, _ in measured],
        }
        if flops is not None and name in ("tokenmill", "transformers"):
            result[name]["share_of_compute_peak"] = flops / seconds / rates["peak"]
    if flops is not None:
        shares = ", ".join(
            f"{name} {result[name]['share_of_compute_peak']:.0%}"
            for name in ("tokenmill", "transformers")
            if name in result
        )
        measured_rates = ", ".join(f"{d} {r / 1e9:.1f}" for d, r in rates.items() if d != "peak")
        print(
            f"compute roofline: {flops / 1e12:.2f} TFLOP useful, GEMM peak {rates['peak'] / 1e9:.1f} GFLOP/s "
            f"(measured: {measured_rates}); best runs reach {shares} of it"
        )
    if "least_bytes_read" in result:
        least = result["least_bytes_read"]
        print(
            f"memory floor: any engine reads {sum(least.values()) / 1e9:.1f} GB here (the weights once per "
            f"forward pass, {least['weights'] / 1e9:.1f} GB; the decodes' cached K/V, {least['cache'] / 1e9:.1f}"
            f" GB), {result['memory_floor_seconds']:.2f} s at {result['read_bandwidth_gb_s']:.1f} GB/s, against "
            f"{flops / rates['peak']:.2f} s of compute at the peak: no run exceeds "
            f"{result['best_possible_share']:.0%} of the compute roofline on this machine"
        )
    if "tokenmill-guided" in result:
        result["guided_fraction"] = args.guided_fraction
        result["guided_throughput_ratio"] = (
            result["tokenmill-guided"]["tokens_per_s"] / result["tokenmill"]["tokens_per_s"]
        )
        print(
            f"with {args.guided_fraction:.0%} of the requests constrained: "
            f"{result['guided_throughput_ratio']:.3f}x the unconstrained throughput"
        )
    if "tokenmill-lora" in result:
        result["lora_adapters"] = args.loras
        result["lora_rank"] = args.lora_rank
        result["lora_throughput_ratio"] = (
            result["tokenmill-lora"]["tokens_per_s"] / result["tokenmill"]["tokens_per_s"]
        )
        print(
            f"best of {args.repeat}: {args.loras} LoRA adapters (rank {args.lora_rank}) mixed round-robin "
            f"{result['tokenmill-lora']['tokens_per_s']:.1f} tokens/s, base model alone "
            f"{result['tokenmill']['tokens_per_s']:.1f} tokens/s: {result['lora_throughput_ratio']:.3f}x"
        )
    if "transformers" in result:
        result["transformers"]["batch_size"] = args.hf_batch_size
        result["speedup"] = result["tokenmill"]["tokens_per_s"] / result["transformers"]["tokens_per_s"]
        print(
            f"best of {args.repeat}: tokenmill {result['tokenmill']['tokens_per_s']:.1f} tokens/s, "
            f"transformers {result['transformers']['tokens_per_s']:.1f} tokens/s, "
            f"speedup {result['speedup']:.2f}x"
        )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="tokenmill bench offline", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
