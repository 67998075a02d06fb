"""Where benchmark figures were measured (written into every results JSON), and writing those JSON files."""

from __future__ import annotations

import contextlib
import json
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


def write_result(path: Path, result: dict[str, Any]) -> None:
    """A benchmark's figures as indented JSON, folders created as needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
