"""The machine a benchmark ran on, for the tables in docs/ (shared by the bench scripts)."""

from __future__ import annotations

import os
import platform
from typing import Any, Iterable


def describe(modules: Iterable[str]) -> dict[str, Any]:
    """CPU model, CPUs, RAM, OS, Python, and the versions of ``modules`` ("absent" if missing)."""
    info: dict[str, Any] = {"cpu": platform.processor() or "unknown"}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info["logical_cpus"] = os.cpu_count()
    info["usable_cpus"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    info["ram_bytes"] = int(line.split()[1]) * 1024
    except OSError:
        pass
    os_name = platform.platform()
    try:
        with open("/etc/os-release", encoding="utf-8") as f:
            for line in f:
                if line.startswith("PRETTY_NAME="):
                    os_name = f"{line.split('=', 1)[1].strip().strip(chr(34))} (kernel {platform.release()})"
    except OSError:
        pass
    info["os"] = os_name
    info["python"] = platform.python_version()
    versions = {}
    for mod in modules:
        try:
            versions[mod] = __import__(mod).__version__
        except (ImportError, AttributeError):
            versions[mod] = "absent"
    info["versions"] = versions
    info["loadavg_start"] = os.getloadavg()
    return info
