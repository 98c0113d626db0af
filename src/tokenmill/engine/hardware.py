"""What this machine offers an engine: memory that is free now, and whether its CPU computes in bfloat16
natively (and by which instructions, so the choice can be explained in the log and by `tokenmill doctor`).
Read from Linux's /proc and from torch; None where the system does not tell."""

from __future__ import annotations

import platform

import torch

_NATIVE_BF16_FLAGS = {
    "x86_64": ("avx512_bf16", "amx_bf16"),
    "aarch64": ("bf16",),
}
"""/proc/cpuinfo flags (x86) or features (Arm) of instructions that compute on bfloat16 directly; without
them torch converts every bfloat16 operand to float32 and back, which is slower than float32 throughout."""


def free_memory_bytes(device: torch.device) -> int | None:
    """Memory an engine could take now without pushing anything else out: the GPU's free memory, or on the
    CPU the kernel's MemAvailable estimate. None where the system does not tell."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def native_bf16_flag() -> str | None:
    """The CPU flag that makes bfloat16 fast here (e.g. "avx512_bf16"), or None."""
    wanted = _NATIVE_BF16_FLAGS.get(platform.machine(), ())
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(("flags", "Features")):
                    present = set(line.split(":", 1)[1].split())
                    return next((flag for flag in wanted if flag in present), None)
    except OSError:
        return None
    return None
