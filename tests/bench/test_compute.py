"""The compute roofline's FLOP count against torch's own FLOP counter on the transformers model of the same
checkpoint, the memory floor's byte count against the checkpoint's config, and the offline bench's report of
both."""

from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tests.tiny_models import build_tiny_model, load_reference
from tokenmill.bench import offline
from tokenmill.bench.compute import gemm_peak, least_bytes_read, useful_flops
from tokenmill.engine.llm_engine import LLM


@pytest.mark.parametrize("arch", ["llama", "llama3"])  # tied and untied output heads, grouped KV heads
def test_useful_flops_are_what_the_model_computes_without_waste(arch, smollm2_tokenizer, tmp_path):
    """One sequence of T tokens read (prompt + output - 1): torch counts every product of a full forward
    pass, which computes the output head for all T tokens and (eager attention) every query against every
    key. Without those two wastes — T - 1 heads too many, the masked half of the score matrices — the count
    is the useful one."""
    directory = build_tiny_model(arch, tmp_path / arch, smollm2_tokenizer)
    reference = load_reference(directory)
    reference.config._attn_implementation = "eager"
    prompt_len, output_len = 30, 7
    tokens = prompt_len + output_len - 1
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        reference(torch.randint(0, 1000, (1, tokens)))
    config = reference.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_position = 4 * config.num_hidden_layers * config.num_attention_heads * head_dim
    head = 2 * config.hidden_size * config.vocab_size
    wasted = (tokens - output_len) * head + per_position * (tokens * tokens - tokens * (tokens + 1) // 2)

    llm = LLM(str(directory), dtype="float32", kv_cache_memory=8 << 20)
    ours = useful_flops(llm.engine.runner.model, [prompt_len], [output_len])

    assert ours == counter.get_total_flops() - wasted


@pytest.mark.parametrize("arch", ["llama", "llama3"])  # tied and untied output heads, grouped KV heads
def test_least_bytes_read_are_the_weights_per_pass_and_each_decodes_context(
    arch, smollm2_tokenizer, tmp_path
):
    """Requests of (prompt, output) (5, 3), (2, 1), (4, 2): the longest output needs 3 forward passes, each
    reading every weight (the embedding table only as a tied head); the decodes read contexts of 5 and 6
    tokens, none, and 4 tokens: 15 tokens' K/V, every layer's keys and values for each KV head."""
    directory = build_tiny_model(arch, tmp_path / arch, smollm2_tokenizer)
    reference = load_reference(directory)
    config = reference.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    embedding = reference.get_input_embeddings().weight.numel()
    weights = sum(p.numel() for p in reference.parameters()) - (
        0 if config.tie_word_embeddings else embedding
    )
    per_token = config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim

    llm = LLM(str(directory), dtype="float32", kv_cache_memory=8 << 20)
    least = least_bytes_read(llm.engine.runner.model, [5, 2, 4], [3, 1, 2])

    assert least == {"weights": 3 * weights * 4, "cache": 15 * per_token * 4}


def test_mixture_of_experts_layers_are_not_counted(smollm2_tokenizer, tmp_path):
    directory = build_tiny_model("mixtral", tmp_path / "mixtral", smollm2_tokenizer)
    llm = LLM(str(directory), dtype="float32", kv_cache_memory=8 << 20)
    assert useful_flops(llm.engine.runner.model, [10], [5]) is None


def test_a_bfloat16_model_may_use_the_float32_gemm():
    rates = gemm_peak(torch.bfloat16, size=128)
    assert set(rates) == {"bfloat16", "float32", "peak"}
    assert rates["peak"] == max(rates["bfloat16"], rates["float32"]) > 0


@pytest.mark.slow
def test_the_offline_bench_reports_both_engines_against_the_compute_peak(tiny_llama_dir: Path, tmp_path):
    result = offline.main(
        [
            "--model", str(tiny_llama_dir), "--dtype", "float32", "--num-requests", "4", "--prompt-len", "4",
            "20", "--output-len", "2", "8", "--hf-batch-size", "4", "--repeat", "1",
            "--output", str(tmp_path / "offline.json"),
        ]
    )  # fmt: skip
    for engine in ("tokenmill", "transformers"):
        share = result[engine]["share_of_compute_peak"]
        assert share == pytest.approx(
            result["useful_flops"] / result[engine]["best_seconds"] / result["gemm_flops_per_s"]["peak"]
        )
        assert share > 0
    floor, compute = (
        result["memory_floor_seconds"],
        result["useful_flops"] / result["gemm_flops_per_s"]["peak"],
    )
    assert floor == pytest.approx(
        sum(result["least_bytes_read"].values()) / 1e9 / result["read_bandwidth_gb_s"]
    )
    assert result["best_possible_share"] == pytest.approx(compute / max(compute, floor))
