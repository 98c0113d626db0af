"""The offline benchmark harness on a tiny model: both engines (and tokenmill with half the requests
constrained to a JSON schema) produce exactly the requested tokens, and the report carries what README
quotes."""

import json
from dataclasses import replace

import pytest

from tokenmill.bench import offline

pytestmark = pytest.mark.slow


def test_offline_benchmark_counts_only_requested_tokens(tiny_llama_dir, tmp_path):
    out = tmp_path / "offline.json"
    result = offline.main(
        [
            "--model",
            str(tiny_llama_dir),
            "--dtype",
            "float32",
            "--num-requests",
            "6",
            "--prompt-len",
            "4",
            "40",
            "--output-len",
            "2",
            "12",
            "--hf-batch-size",
            "4",
            "--repeat",
            "2",
            "--guided-fraction",
            "0.5",
            "--output",
            str(out),
        ]
    )
    requested = result["requested_output_tokens"]
    # Every run computed every prompt: none found the last run's K/V in the prefix cache.
    assert result["cached_prompt_tokens"] == 0
    assert result["tokenmill"]["output_tokens"] == requested
    assert result["transformers"]["output_tokens"] == requested
    # The constrained half runs to its full length too (its schema cannot complete): a like-for-like ratio.
    assert result["tokenmill-guided"]["output_tokens"] == requested
    assert result["guided_throughput_ratio"] == pytest.approx(
        result["tokenmill-guided"]["tokens_per_s"] / result["tokenmill"]["tokens_per_s"]
    )
    assert result["speedup"] == pytest.approx(
        result["tokenmill"]["tokens_per_s"] / result["transformers"]["tokens_per_s"]
    )
    assert json.loads(out.read_text())["speedup"] == pytest.approx(result["speedup"])


def test_workloads_are_reproducible_and_within_bounds():
    a = offline.make_workload(64, (32, 512), (16, 256), 1000, "loguniform", seed=3)
    b = offline.make_workload(64, (32, 512), (16, 256), 1000, "loguniform", seed=3)
    assert a.prompts == b.prompts and a.output_lengths == b.output_lengths
    assert all(32 <= len(p) <= 512 for p in a.prompts)
    assert all(16 <= n <= 256 for n in a.output_lengths)
    assert len({p.temperature for p in a.params}) > 1  # each request brings its own settings


def test_the_guided_workload_constrains_the_fraction_asked_for_spread_evenly():
    workload = offline.make_workload(8, (4, 8), (2, 4), 1000, "uniform", seed=1)
    guided = offline.guided_workload(workload, 0.5)
    assert [p.guidance is not None for p in guided.params] == [False, True] * 4
    assert [replace(p, guidance=None) for p in guided.params] == workload.params
    assert guided.prompts == workload.prompts
