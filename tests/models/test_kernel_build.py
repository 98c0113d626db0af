"""Loading the C kernels (decode attention; the decode step, its products and fused operators) leaves the
process's floating-point state alone: a library built with -ffast-math would flush denormals to zero for every float in the server (pydantic, torch) once loaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Run in a fresh interpreter with its own data directory: this process may have loaded a kernel already,
# and the kernel really gets compiled with the current flags there, not taken from a cache.
_PROBE = """
import json
import torch
from tokenmill.models.cpu_attention import load_kernel
from tokenmill.models.cpu_ops import load_ops_kernel

def denormals_survive():
    return float("5e-324") > 0 and (torch.tensor(1e-40) * 1).item() != 0

before = denormals_survive()
kernel = load_kernel()
ops = load_ops_kernel()
print(json.dumps({"loaded": kernel is not None and ops is not None, "before": before, "after": denormals_survive()}))
"""


def test_loading_the_kernels_keeps_denormals(tmp_path: Path) -> None:
    env = {**os.environ, "TOKENMILL_DATA_DIR": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    probe = json.loads(result.stdout.strip().splitlines()[-1])
    if not probe["loaded"]:
        pytest.skip("no C compiler: the engine falls back to the torch backend")
    assert list((tmp_path / "kernels").glob("paged_decode-*.so")), "the kernel was not compiled here"
    assert list((tmp_path / "kernels").glob("decode_step-*.so")), "the kernel was not compiled here"
    assert probe["before"], "denormals were flushed before the kernel was loaded"
    assert probe["after"], "loading a kernel flushed denormals to zero in the whole process"
