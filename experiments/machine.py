"""What a number was measured on: the processor kind every stage records, and the machine line of a report.

The processor kind matters beyond speed: the same command trains a different tokenizer on an AVX2 CPU than on
an AVX-512 one (other SIMD kernels, other rounding), so a table whose stages ran on two kinds mixes networks
that are not the same function (docs/study.md, 2d). The speed tables (`benchmarks/harness.py`) print it too.
"""

import contextlib
import functools
import os
import platform
from pathlib import Path

import torch


def cpu_model() -> str:
    """The processor's name and its bf16 matmul support (AMX / AVX512-BF16 make bf16 pay)."""
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), name)
        flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
        native = [label for flag, label in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX512-BF16")) if flag in flags]
        name += f" ({', '.join(native) if native else 'no native bf16'})"
    return name


@functools.cache
def processor_kind() -> str:
    """The processor a stage started here computes on: the GPU's name where CUDA is visible (every stage config
    says `accelerator: auto`, and the evaluation picks CUDA too), else the CPU model with its bf16 support."""
    if torch.cuda.is_available():
        return f"GPU {torch.cuda.get_device_name()}"
    return cpu_model()


def machine(device: str) -> str:
    """CPU model, cores, load average, GPU, torch version."""
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    load = ", load average {:.1f}/{:.1f}/{:.1f}".format(*os.getloadavg()) if hasattr(os, "getloadavg") else ""
    return f"{cpu_model()} ({os.cpu_count()} cores{load}){gpu}; torch {torch.__version__}; evaluation on {device}"
