"""The machine a benchmark ran on, printed in every benchmark's header: timings mean little
without the CPU model, torch's kernel level, whether bf16 is native, the threads and the GPU."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from vqgan_cli.runtime import bf16_is_native, cpu_bf16_features, cpu_capability


def cpu_name() -> str:
    """The CPU's model name, for the header of a result."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


def gpu_name() -> str | None:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def machine_info() -> dict[str, object]:
    """The header's facts as a JSON-able dict (benchmarks that write --json keep it)."""
    features = cpu_bf16_features()
    return {"cpu": cpu_name(), "cpu_capability": cpu_capability(), "bf16_native": bool(features),
            "bf16_features": features, "threads": torch.get_num_threads(), "cores": os.cpu_count(),
            "gpu": gpu_name(), "torch": torch.__version__}


def cpu_class() -> str:
    """A short name for the CPU class that the README's tables are labelled with."""
    return "avx512_bf16 CPU" if cpu_bf16_features() else f"{cpu_capability()} CPU without native bf16"


def machine_line() -> str:
    """One header line: CPU model, torch's CPU capability, native bf16, threads, GPU, load."""
    m = machine_info()
    bf16 = f"native ({', '.join(m['bf16_features'])})" if m["bf16_native"] else "emulated (no avx512_bf16/AMX)"
    gpu = m["gpu"] or "none"
    return (f"machine: {m['cpu']}, {m['cores']} core(s); torch {m['torch']} CPU capability {m['cpu_capability']}; "
            f"bf16 {bf16}; {m['threads']} torch thread(s); GPU {gpu}; load average {load_average()}")


def default_precisions(device: torch.device = torch.device("cpu")) -> list[str]:
    """fp32, plus bf16 where the device computes it natively: an emulated bf16 row takes about 10x
    an fp32 one and tells nothing about the shipped default (``precision: auto`` picks fp32 there)."""
    return ["fp32", "bf16"] if bf16_is_native(device) else ["fp32"]
