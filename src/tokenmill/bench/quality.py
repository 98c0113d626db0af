"""What quantization costs in quality: the perplexity of a fixed text (quality_text.txt, shipped with
tokenmill, about 720 tokens of plain English) under the model as loaded and under its quantized form, in
one run.

    perplexity = exp(mean over the text's tokens of -log p(token | the tokens before it))

Each window of `--window` tokens runs through tokenmill's own model code with a KV cache of its own (the
engines' caches are not touched), `--chunk` tokens at a time, and every token after a window's first is
scored. Chunks of up to 8 tokens go through the same few-row kernels as decode steps (with int8 weights, the
kernel also quantizes those rows of activations), so the figure is the served model's, not only the
prefill path's.
"""

from __future__ import annotations

import argparse
import json
import math
from importlib import resources
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--quantization", default="int8", choices=("int8",))
    parser.add_argument("--window", type=int, default=512, help="tokens scored with one context")
    parser.add_argument("--chunk", type=int, default=8, help="tokens per forward pass (<= 8: decode kernels)")
    parser.add_argument("--output", type=Path, default=Path("bench-results/quality.json"))


def quality_text() -> str:
    return resources.files("tokenmill.bench").joinpath("quality_text.txt").read_text(encoding="utf-8")


def negative_log_likelihoods(llm: object, tokens: list[int], window: int, chunk: int) -> list[float]:
    """-log p of every token after the first of each window, `chunk` tokens per forward pass."""
    import torch

    from tokenmill.models.attention import AttentionMetadata, PrefillChunk, continuing_chunk_mask

    model = llm.engine.runner.model
    cache_dtype = llm.engine.runner.kv_caches[0][0].dtype
    scores: list[float] = []
    with torch.inference_mode():
        for first in range(0, len(tokens) - 1, window):
            text = tokens[first : first + window]
            caches = [layer.allocate(len(text), cache_dtype) for layer in model.cache_layout]
            for start in range(0, len(text) - 1, chunk):
                end = min(start + chunk, len(text))
                positions = torch.arange(start, end)
                if start == 0:
                    prefill = PrefillChunk(0, end, 0)
                else:  # a chunk continuing the window: it sees every cached token before it
                    mask = continuing_chunk_mask(start, end)
                    prefill = PrefillChunk(0, end - start, start, torch.arange(end), mask)
                meta = AttentionMetadata(
                    slot_mapping=positions, num_decodes=0, decodes=None, prefills=(prefill,)
                )
                hidden = model(torch.tensor(text[start:end]), positions, caches, meta)
                scored = min(end, len(text) - 1) - start  # the window's last token has nothing to predict
                logprobs = torch.log_softmax(model.compute_logits(hidden[:scored]).float(), dim=-1)
                targets = torch.tensor(text[start + 1 : start + 1 + scored])
                scores.extend((-logprobs.gather(1, targets[:, None])[:, 0]).tolist())
    return scores


def run(args: argparse.Namespace) -> dict:
    from tokenmill.engine.llm_engine import LLM

    result: dict = {"model": args.model, "dtype": args.dtype, "window": args.window, "chunk": args.chunk}
    for name, quantization in (("original", "none"), (args.quantization, args.quantization)):
        llm = LLM(args.model, dtype=args.dtype, quantization=quantization, kv_cache_memory=64 << 20)
        tokens = llm.engine.encode(quality_text())
        scores = negative_log_likelihoods(llm, tokens, args.window, args.chunk)
        result[f"{name}_perplexity"] = math.exp(sum(scores) / len(scores))
        result["scored_tokens"] = len(scores)
        print(f"{name:9s} perplexity {result[f'{name}_perplexity']:.4f} over {len(scores)} tokens")
        del llm
    result["perplexity_ratio"] = result[f"{args.quantization}_perplexity"] / result["original_perplexity"]
    print(f"{args.quantization} / {args.dtype}: {result['perplexity_ratio']:.4f}x the perplexity")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="tokenmill bench quality", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
