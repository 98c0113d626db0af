"""The single-stream decode benchmark on a tiny model: both engines (C kernels, torch ops) decode the same
steps in one run, and the report sets them against a measured memory-bandwidth roofline."""

import json

import pytest

from tokenmill.bench import decode

pytestmark = pytest.mark.slow


def test_decode_benchmark_compares_kernels_with_torch_against_the_roofline(tiny_llama_dir, tmp_path):
    out = tmp_path / "decode.json"
    result = decode.main(
        ["--model", str(tiny_llama_dir), "--output-len", "16", "--repeat", "1", "--output", str(out)]
    )
    assert result["kernel_tokens_per_s"] > 0 and result["torch_tokens_per_s"] > 0
    assert result["kernel_speedup"] == pytest.approx(
        result["kernel_tokens_per_s"] / result["torch_tokens_per_s"]
    )
    if result["read_bandwidth_gb_s"] is None:
        pytest.skip("no C compiler: no bandwidth probe")
    # A tiny model's weights fit in the caches, so the share of the memory roofline may exceed 1 here;
    # what must hold is the arithmetic the README's figures rest on.
    assert result["roofline_tokens_per_s"] == pytest.approx(
        result["read_bandwidth_gb_s"] * 1e9 / result["bytes_per_step"]
    )
    assert result["kernel_share_of_roofline"] == pytest.approx(
        result["kernel_tokens_per_s"] / result["roofline_tokens_per_s"]
    )
    assert json.loads(out.read_text())["bytes_per_step"] == result["bytes_per_step"]
