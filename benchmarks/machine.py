"""Where benchmark figures were measured: written into every results JSON."""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path
from typing import Any


def describe(**extra: Any) -> dict[str, Any]:
    """CPU model, cores, memory, OS and Python of this machine, plus what the caller adds (torch, GPU...)."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory_gb = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_gb = round(int(line.split()[1]) / 2**20, 1)
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": memory_gb, "os": platform.platform(),
            "python": platform.python_version(), **extra}
