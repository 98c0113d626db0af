"""Small C kernels compiled on first use with the system C compiler (about a second each) into the data
directory, keyed by their source, the compiler flags and the CPU, and loaded with ctypes: no torch headers,
no build step at install time. Where no compiler works, `compile_library` returns None and callers keep
their torch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from tokenmill.config import default_data_dir

logger = logging.getLogger(__name__)

KERNELS = Path(__file__).with_name("kernels")

FLAGS = (
    "-O3", "-march=native", "-shared", "-fPIC",
    # The parts of -ffast-math vectorised reductions need. Not -ffast-math itself (nor -Ofast,
    # -funsafe-math-optimizations): linked into a shared object it adds crtfastmath.o, whose constructor
    # flushes denormals to zero in the whole process that loads the library (Python floats, torch).
    # Not -ffinite-math-only either: a softmax starts its running maximum at -INFINITY.
    "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math", "-freciprocal-math",
)  # fmt: skip
if platform.machine() in ("x86_64", "AMD64"):
    # GCC tunes -march=native to 256-bit vectors on Intel CPUs with AVX-512; the loops it vectorises here
    # (norms, rotary, SiLU, softmax sums) run faster at 512 (the offline bench ~4% on a 2-core Xeon). An
    # x86 option, which GCC for other architectures rejects.
    FLAGS += ("-mprefer-vector-width=512",)


def compile_library(source_name: str, extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """kernels/<source_name> built (once per source, flags and CPU) and loaded; None if it cannot be."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        logger.warning(
            "no C compiler found: %s is not used, torch ops run instead (slower on CPU)", source_name
        )
        return None
    source_path = KERNELS / source_name
    flags = (*FLAGS, *extra_flags)
    # Every kernel source counts: one may #include another (decode_step.c holds the others).
    sources = b"".join(path.read_bytes() for path in sorted(KERNELS.glob("*.c")))
    key = hashlib.sha256(sources + " ".join(flags).encode() + _cpu_identity().encode())
    library = default_data_dir() / "kernels" / f"{source_path.stem}-{key.hexdigest()[:16]}.so"
    if not library.exists():
        library.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=library.parent) as scratch:
            built = Path(scratch) / library.name
            result = subprocess.run(
                [compiler, *flags, str(source_path), "-o", str(built), "-lm"], capture_output=True, text=True
            )
            if result.returncode != 0:
                logger.warning("compiling %s failed, using torch:\n%s", source_name, result.stderr)
                return None
            built.replace(library)  # atomic: concurrent builders each publish a complete file
    return ctypes.CDLL(str(library))


def _cpu_identity() -> str:
    """-march=native code is only valid on the CPU that built it; the data directory may be shared."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line for line in cpuinfo if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return platform.machine() + platform.processor() + flags
