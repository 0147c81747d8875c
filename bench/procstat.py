"""Process measurements shared by the benches that run each variant in its own process."""

import resource
import sys
from pathlib import Path


def peak_rss_bytes() -> int:
    """This process's own peak RSS. Linux carries ru_maxrss across exec, so a child's ru_maxrss
    is at least the parent's RSS at the fork; VmHWM is the high-water mark of the child's own
    address space. Import it from a bench run as a script (bench/ is then on sys.path)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024  # bytes there, KiB on Linux
