"""Timing helpers: device synchronisation and robust summaries of repeated measurements."""

import os
import platform
import statistics
import time
from collections.abc import Callable

import torch


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels on CUDA so that wall-clock times cover the work; no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function: Callable, device: torch.device):
    """Run `function()` between two synchronisations; return (result, seconds)."""
    synchronize(device)
    start = time.perf_counter()
    result = function()
    synchronize(device)
    return result, time.perf_counter() - start


def summarize(values: list[float]) -> dict:
    """Return median, min, max, relative spread (max - min) / median and the raw values."""
    if not values:
        raise ValueError("no measurements to summarize")
    median = statistics.median(values)
    return {
        "median": median,
        "min": min(values),
        "max": max(values),
        "spread": (max(values) - min(values)) / median if median else 0.0,
        "values": list(values),
    }


def machine_info(device: torch.device) -> dict:
    """Describe where the numbers were measured."""
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        info["cpu_count"] = os.cpu_count()
        info["affinity_cpus"] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
