"""A description of the machine a benchmark ran on, for its results file."""

from __future__ import annotations

import os
import platform

import torch


def describe_machine() -> dict[str, str]:
    """CPU model, core count, memory, torch version and thread count (and the GPU, if one is used)."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory = ""
    try:
        with open("/proc/meminfo") as handle:
            memory = f"{int(handle.readline().split()[1]) / 2**20:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    description = {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "memory": memory,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch threads": str(torch.get_num_threads()),
    }
    if torch.cuda.is_available():
        description["gpu"] = torch.cuda.get_device_name(0)
    return description


def host_description() -> str:
    """One line naming the CPU and its core count (and the GPU, if one is visible): which machine timed a row."""
    machine = describe_machine()
    text = f"{machine['cpu']}, {machine['cores']} cores"
    return text + (f", {machine['gpu']}" if "gpu" in machine else "")


def machine_markdown() -> str:
    """`describe_machine` as a Markdown bullet list."""
    return "\n".join(f"- {key}: {value}" for key, value in describe_machine().items())
