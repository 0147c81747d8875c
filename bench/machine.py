"""What machine a bench ran on, so figures from different CPUs can be told apart."""

from __future__ import annotations

import datetime
import os
import platform
import re
from pathlib import Path


def cpu_info() -> dict:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    flags = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
    flags = flags.group(1).split() if flags else []
    wide = sorted(f for f in flags if f.startswith(("avx512", "amx")) or f in ("avx2", "fma"))
    return {"cpu_model": model.group(1).strip() if model else platform.processor(),
            "vector_extensions": wide, "cpu_count": os.cpu_count(),
            "machine": platform.machine()}


def describe() -> dict:
    return {**cpu_info(), "python": platform.python_version(),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "load_average_1m_at_start": os.getloadavg()[0]}


def jax_kernels() -> dict:
    """XLA:CPU compiles its own kernels (Eigen / its codegen for dots); record version and flags."""
    import jax
    import jaxlib

    return {"jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "backend": jax.default_backend(), "xla_flags": os.environ.get("XLA_FLAGS", "")}


def torch_kernels() -> dict:
    """torch's CPU kernel libraries (oneDNN / MKL / OpenMP), from its build config."""
    import torch

    show = torch.__config__.show()
    libs = [line.strip() for line in show.splitlines()
            if re.search(r"MKL-DNN|oneDNN|Math Kernel|OpenMP|CPU capability", line)]
    return {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "mkldnn": torch.backends.mkldnn.is_available(), "build": libs}
