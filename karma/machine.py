"""What machine a figure was measured on: printed beside every benchmark and study number."""

from __future__ import annotations

import contextlib
import os
import platform
import sys
from pathlib import Path
from typing import Any

# The numerical libraries' thread pools, pinned to one thread where a process runs many threads of its own
# (the service: ~40 server threads each starting a BLAS pool on 2 cores cut throughput ~20x, DESIGN §8;
# benchmark servers and load generators). ONNX Runtime and torch get their threads explicitly. The
# Dockerfile's ENV lines and deploy/k8s set the same variables (tests/test_deploy.py checks them).
THREAD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (e.g. 'AMD EPYC 9B14'), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask), not the host's total."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


VERSIONED = (
    "torch",
    "onnxruntime",
    "onnxruntime-gpu",
    "faiss-cpu",
    "faiss-gpu-cu12",
    "numpy",
    "fastapi",
    "uvicorn",
    "uvloop",
    "httptools",
)


def machine(packages: tuple[str, ...] = VERSIONED) -> dict[str, Any]:
    """Where a figure came from (one record for every benchmark and study): CPU model, id and vector ISA,
    usable cores, memory, load, OS, Python, the GPU when torch is loaded and sees one, and versions."""
    from importlib.metadata import PackageNotFoundError, version

    memory_gib = None
    with contextlib.suppress(OSError, ValueError):
        meminfo = Path("/proc/meminfo").read_text().split()
        memory_gib = round(int(meminfo[meminfo.index("MemTotal:") + 1]) / 2**20, 1)
    cpu_id, isa = "", []
    with contextlib.suppress(OSError, ValueError):
        first = Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines()
        info = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in first if ":" in line)}
        cpu_id = f"family {info.get('cpu family')} model {info.get('model')}"
        flags = set(info.get("flags", "").split())
        isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f in flags]
    versions = {}
    for name in packages:
        with contextlib.suppress(PackageNotFoundError):
            versions[name] = version(name)
    torch = sys.modules.get("torch")  # never imported here: karma stays torch-free
    gpu = torch.cuda.get_device_name(0) if torch is not None and torch.cuda.is_available() else None
    return {
        "cpu": cpu_model(),
        "cpu_id": cpu_id,
        "isa": isa,
        "cores": usable_cores(),
        "memory_gib": memory_gib,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "gpu": gpu,
        "versions": versions,
    }


def machine_line(m: dict[str, Any]) -> str:
    """One line for a table caption: 'Intel(R) Xeon(R) Processor, 2 cores, 23.4 GiB, Python 3.11.7'."""
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
    return f"{m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB{gpu}, Python {m['python']}"
