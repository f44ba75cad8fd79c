"""Compute devices: what is visible, how to name it, how to pick it.

Used by inference and training alike; no Qt. GPUs are listed with their name
and free memory so panels can offer them by name.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DeviceInfo:
    """A device a job can run on."""

    id: str  # "cpu" or "cuda:N"
    label: str  # shown to users, e.g. "cuda:0 - NVIDIA H100 (75.1 GiB free)"
    free_bytes: int | None = None


def available_devices() -> list[DeviceInfo]:
    """CPU plus every visible CUDA GPU, with names and free memory."""
    import os

    import torch

    devices = [DeviceInfo("cpu", f"cpu ({os.cpu_count()} cores)")]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            name = torch.cuda.get_device_name(index)
            try:
                free, _total = torch.cuda.mem_get_info(index)
            except RuntimeError:
                free = None
            memory = f" ({free / 2**30:.1f} GiB free)" if free is not None else ""
            devices.append(DeviceInfo(f"cuda:{index}", f"cuda:{index} - {name}{memory}", free))
    return devices


def default_device() -> str:
    """The first GPU when there is one, else the CPU."""
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


def resolve_device(device: str | None):
    """Turn ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"auto"`` or None into a ``torch.device``.

    Raises
    ------
    ValueError
        For a GPU that is not visible, with the devices that are.
    """
    import torch

    if device in (None, "", "auto"):
        return torch.device(default_device())
    try:
        chosen = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {device!r}: use cpu or cuda:N") from exc
    if chosen.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = chosen.index or 0
        if index >= count:
            visible = ", ".join(d.id for d in available_devices())
            raise ValueError(f"device {device} is not visible here (available: {visible})")
        return torch.device("cuda", index)
    return chosen


def is_out_of_memory(error: BaseException) -> bool:
    """Whether an exception is a (CUDA or CPU allocator) out-of-memory error."""
    import torch

    if isinstance(error, torch.cuda.OutOfMemoryError | MemoryError):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()
