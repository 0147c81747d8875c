"""What machine a measurement ran on, so figures from different CPUs can be told apart.

    describe()        # CPU model, vector extensions, cores, Python, date, load at start
    jax_kernels()     # jax / jaxlib versions, backend, devices, XLA_FLAGS
    torch_kernels()   # torch's CPU kernel libraries (oneDNN / MKL / OpenMP)
    one_line()        # "AMD EPYC ..., 2 cores; jax 0.10.2 on cpu (cpu); Python 3.11.9"

Every bench records describe() (and the kernels it timed) in its JSON; reports print one_line().
"""

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
    return {"cpu_model": model.group(1).strip() if model else (platform.processor()
                                                                  or platform.machine()),
            "vector_extensions": wide, "cpu_count": os.cpu_count(),
            "machine": platform.machine(), **instance_info(text, flags)}


def _field(text: str, name: str) -> str | None:
    m = re.search(rf"^{name}\s*:\s*(.+)$", text, re.M)
    return m.group(1).strip() if m else None


def instance_info(cpuinfo: str, flags: list[str]) -> dict:
    """What tells two machines of one CPU model apart, where Linux shows it: family / model /
    stepping / microcode, the clock the kernel reports, cache sizes per level, SMT (vCPUs that
    share a core), the hypervisor, and a digest of the whole flag list (hosts expose different
    subsets)."""
    import hashlib

    caches = {}
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for idx in sorted(base.glob("index*")) if base.exists() else []:
        try:
            level, kind = (idx / "level").read_text().strip(), (idx / "type").read_text().strip()
            caches[f"L{level}{'' if kind == 'Unified' else kind[0].lower()}"] = \
                (idx / "size").read_text().strip()
        except OSError:
            continue
    mhz = [float(x) for x in re.findall(r"^cpu MHz\s*:\s*([\d.]+)$", cpuinfo, re.M)]
    sib, cores = _field(cpuinfo, "siblings"), _field(cpuinfo, "cpu cores")
    return {"cpu_family": _field(cpuinfo, "cpu family"), "cpu_model_id": _field(cpuinfo, "model"),
            "stepping": _field(cpuinfo, "stepping"), "microcode": _field(cpuinfo, "microcode"),
            "cpu_mhz": round(sum(mhz) / len(mhz), 1) if mhz else None,
            "bogomips": _field(cpuinfo, "bogomips"), "caches": caches,
            "smt": (int(sib) > int(cores)) if sib and cores else None,
            "hypervisor": "hypervisor" in flags,
            "flags_sha1": hashlib.sha1(" ".join(flags).encode()).hexdigest()[:12] if flags else None}


def describe() -> dict:
    return {**cpu_info(), "python": platform.python_version(),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "load_average_1m_at_start": os.getloadavg()[0]}


def jax_kernels() -> dict:
    """XLA:CPU compiles its own kernels (Eigen / its codegen for dots); record version and flags."""
    import jax
    import jaxlib

    return {"jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
            "xla_flags": os.environ.get("XLA_FLAGS", "")}


def torch_kernels() -> dict:
    """torch's CPU kernel libraries (oneDNN / MKL / OpenMP), from its build config."""
    import torch

    show = torch.__config__.show()
    libs = [line.strip() for line in show.splitlines()
            if re.search(r"MKL-DNN|oneDNN|Math Kernel|OpenMP|CPU capability", line)]
    return {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "mkldnn": torch.backends.mkldnn.is_available(), "build": libs}


def one_line() -> str:
    """The machine in one line, for a report: the CPU with its family / model ids where Linux
    shows them (VMs often name every instance kind "AMD EPYC"; the ids tell them apart)."""
    cpu, k = cpu_info(), jax_kernels()
    ids = (f" (family {cpu['cpu_family']} model {cpu['cpu_model_id']})"
           if cpu.get("cpu_family") and cpu.get("cpu_model_id") else "")
    return (f"{cpu['cpu_model']}{ids}, {cpu['cpu_count']} cores; jax {k['jax']} on "
            f"{k['backend']} ({k['device_kind']}); Python {platform.python_version()}")


__all__ = ["cpu_info", "describe", "instance_info", "jax_kernels", "one_line", "torch_kernels"]
