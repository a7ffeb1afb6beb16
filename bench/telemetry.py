"""What every benchmark result carries: versions, commit, and (on a GPU) NVML
clocks, power, temperature and throttle reasons."""

from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

import moepp_kernels


def git_commit() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment() -> dict:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device_name": device_name(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "moepp_kernels": moepp_kernels.__version__,
        "commit": git_commit(),
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def device_name() -> str:
    """A folder name for this machine's results: the GPU's name, else the CPU's."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
    else:
        name = f"cpu-{platform.machine()}-{os.cpu_count()}cores"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-")


def nvml_snapshot(device_index: int = 0) -> dict | None:
    """Clocks, power, temperature and throttle reasons of one GPU, or None."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(device_index)
        reasons = pynvml.nvmlDeviceGetCurrentClocksThrottleReasons(h)
        idle = getattr(pynvml, "nvmlClocksThrottleReasonGpuIdle", 1)
        app = getattr(pynvml, "nvmlClocksThrottleReasonApplicationsClocksSetting", 2)
        name = pynvml.nvmlDeviceGetName(h)
        return {
            "name": name.decode() if isinstance(name, bytes) else name,
            "driver": _str(pynvml.nvmlSystemGetDriverVersion()),
            "sm_clock_mhz": pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM),
            "mem_clock_mhz": pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_MEM),
            "max_sm_clock_mhz": pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM),
            "power_w": pynvml.nvmlDeviceGetPowerUsage(h) / 1000.0,
            "temperature_c": pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU),
            "throttle_reasons": int(reasons),
            "throttled": bool(reasons & ~(idle | app)),
        }
    except Exception as exc:  # NVML missing on the machine, no permission, ...
        return {"error": str(exc)}


def _str(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)
