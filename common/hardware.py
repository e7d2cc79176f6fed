"""The machine a run uses: the device (cpu, cuda, cuda:N), the compute dtype it is fast in, and the
memory a new allocation can take."""

from __future__ import annotations

from pathlib import Path

import torch


class DeviceError(ValueError):
    """The requested device does not exist on this machine; the message is one line meant for the user."""


def pick_device(requested: str | None = None) -> torch.device:
    """The requested device (cpu, cuda or cuda:N, refused in one line if this machine has none),
    else CUDA when present, else the CPU."""
    if not requested:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise DeviceError(f"unknown device {requested!r}: use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {requested!r} was requested but CUDA is not available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceError(f"device {requested!r} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def free_memory_bytes(device: torch.device) -> int | None:
    """Memory a new allocation can take: free GPU memory, or the CPU's MemAvailable (None if unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:  # not Linux: no check
        return None
    return next((int(line.split()[1]) * 1024 for line in lines if line.startswith("MemAvailable:")), None)


def process_memory_kib(pid: int | str = "self", field: str = "VmRSS") -> int | None:
    """A Linux process's VmRSS (resident now) or VmHWM (its peak), in KiB; None where /proc has no answer."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def pick_compute_dtype(device: torch.device) -> torch.dtype:
    """The dtype a run computes in on `device` (compute_dtype)."""
    native_bf16 = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_native_bf16()
    return compute_dtype(native_bf16)


def compute_dtype(native_bf16: bool) -> torch.dtype:
    """bf16 where the device computes it natively (GPUs from Ampere on; CPUs with AVX-512 BF16 or AMX,
    where it is several times faster than fp32), float32 elsewhere. Never fp16: Gemma's activations
    overflow its range (Gemma's own code refuses it), so a GPU without bf16 (T4, V100) trains in float32;
    and an AVX2-only CPU emulates bf16 matmuls far slower than fp32 (`make bench` prints both rates)."""
    return torch.bfloat16 if native_bf16 else torch.float32


def cpu_has_native_bf16() -> bool:
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def describe_compute(device: torch.device, dtype: torch.dtype) -> str:
    """One log line: where the model runs and in which dtype, and why fp32 on a CPU."""
    line = f"compute: {device}, {dtype_name(dtype)}"
    if dtype == torch.float32:
        line += (" (this GPU has no bf16, and Gemma overflows in fp16)" if device.type == "cuda"
                 else " (this CPU has no native bf16: AVX-512 BF16 or AMX)")
    return line


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
