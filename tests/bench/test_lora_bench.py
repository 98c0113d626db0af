"""The multi-LoRA benchmark on a tiny model: eight random adapters, written in PEFT's format for the model,
serve the same requests as the base model in the same run, and the report carries the throughput ratio."""

import json

import pytest

from tokenmill.bench import offline
from tokenmill.engine.lora import LoRASlots

pytestmark = pytest.mark.slow


def test_lora_benchmark_compares_eight_mixed_adapters_with_the_base_model(tiny_llama_dir, tmp_path):
    out = tmp_path / "lora.json"
    result = offline.main(
        [
            "--model",
            str(tiny_llama_dir),
            "--dtype",
            "float32",
            "--num-requests",
            "12",
            "--prompt-len",
            "4",
            "40",
            "--output-len",
            "2",
            "12",
            "--skip-transformers",
            "--repeat",
            "1",
            "--loras",
            "8",
            "--lora-rank",
            "16",
            "--output",
            str(out),
        ]
    )
    requested = result["requested_output_tokens"]
    assert result["tokenmill"]["output_tokens"] == requested
    assert result["tokenmill-lora"]["output_tokens"] == requested
    assert result["lora_adapters"] == 8 and result["lora_rank"] == 16
    assert result["lora_throughput_ratio"] == pytest.approx(
        result["tokenmill-lora"]["tokens_per_s"] / result["tokenmill"]["tokens_per_s"]
    )
    assert json.loads(out.read_text())["lora_throughput_ratio"] == pytest.approx(
        result["lora_throughput_ratio"]
    )


def test_random_adapters_are_valid_peft_adapters_for_the_model(tiny_llama_dir, tmp_path):
    import torch

    from tokenmill.engine.llm_engine import LLM

    llm = LLM(str(tiny_llama_dir), dtype="float32", num_blocks=64)
    model = llm.engine.runner.model
    adapters = offline.write_random_adapters(model, tmp_path, count=2, rank=16, seed=0)
    slots = LoRASlots(model, max_loras=2, max_lora_rank=16, dtype=torch.float32, device=torch.device("cpu"))
    for adapter in adapters:
        spec = slots.check(adapter)
        assert spec.rank == 16 and len(spec.modules) == 7 * len(model.layers)
    workload = offline.make_workload(4, (4, 8), (2, 4), 1000, "uniform", seed=1)
    spread = offline.lora_workload(workload, adapters)
    assert [p.lora for p in spread.params] == [adapters[0], adapters[1]] * 2
