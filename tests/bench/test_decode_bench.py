"""The single-stream decode benchmark on a tiny model: the engines (C kernels, torch ops, int8 weights)
decode the same steps in one run, and the report sets each against a measured memory-bandwidth roofline."""

import json

import pytest

from tokenmill.bench import decode

pytestmark = pytest.mark.slow


def test_decode_benchmark_compares_kernels_with_torch_against_the_roofline(tiny_llama_dir, tmp_path):
    out = tmp_path / "decode.json"
    result = decode.main(
        ["--model", str(tiny_llama_dir), "--output-len", "16", "--repeat", "1", "--output", str(out)]
    )
    for name in ("kernel", "per-op", "torch", "int8"):
        assert result[name]["tokens_per_s"] > 0
    assert result["kernel_speedup"] == pytest.approx(
        result["kernel"]["tokens_per_s"] / result["torch"]["tokens_per_s"]
    )
    assert result["whole_step_speedup"] == pytest.approx(
        result["kernel"]["tokens_per_s"] / result["per-op"]["tokens_per_s"]
    )
    # int8 weights: a byte per weight instead of two (the scales, norms and embedding table stay wider).
    assert result["int8"]["bytes_per_step"] < 0.75 * result["kernel"]["bytes_per_step"]
    if result["read_bandwidth_gb_s"] is None:
        pytest.skip("no C compiler: no bandwidth probe")
    # A tiny model's weights fit in the caches, so the share of the memory roofline may exceed 1 here;
    # what must hold is the arithmetic the README's figures rest on.
    kernel = result["kernel"]
    assert kernel["roofline_tokens_per_s"] == pytest.approx(
        result["read_bandwidth_gb_s"] * 1e9 / kernel["bytes_per_step"]
    )
    assert kernel["share_of_roofline"] == pytest.approx(
        kernel["tokens_per_s"] / kernel["roofline_tokens_per_s"]
    )
    assert json.loads(out.read_text())["kernel"]["bytes_per_step"] == kernel["bytes_per_step"]
