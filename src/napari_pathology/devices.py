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
    if _mps_available():
        devices.append(DeviceInfo("mps", "mps - Apple GPU"))
    return devices


def _mps_available() -> bool:
    import torch

    backend = getattr(torch.backends, "mps", None)
    try:
        return bool(backend is not None and backend.is_available())
    except (AttributeError, RuntimeError):
        return False


def default_device() -> str:
    """The first GPU when there is one, else the CPU."""
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


def resolve_device(device: str | None):
    """Turn ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``, ``"auto"`` or None into a ``torch.device``.

    Every other string is refused, and so is a device this machine or this
    build of torch does not have (a GPU index past the last one, ``mps``
    without Apple's backend).

    Raises
    ------
    ValueError
        One line naming the device and listing the devices that exist here.
    """
    import torch

    text = "" if device is None else str(device).strip().lower()
    if text in ("", "auto"):
        return torch.device(default_device())
    kind, _, index_text = text.partition(":")
    if kind not in ("cpu", "cuda", "mps") or (index_text and not index_text.isdigit()):
        raise ValueError(f"unknown device {device!r}: use auto, cpu or cuda:N (available: {_visible()})")
    index = int(index_text) if index_text else None
    if kind == "cpu":
        return torch.device("cpu")
    if kind == "mps":
        if not _mps_available():
            raise ValueError(f"device {device!r} is not in this build of torch (available: {_visible()})")
        return torch.device("mps")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if (index or 0) >= count:
        raise ValueError(f"device {device!r} is not visible here (available: {_visible()})")
    return torch.device("cuda", index or 0)


def _visible() -> str:
    return ", ".join(d.id for d in available_devices())


def is_out_of_memory(error: BaseException) -> bool:
    """Whether an exception is a (CUDA or CPU allocator) out-of-memory error."""
    import torch

    if isinstance(error, torch.cuda.OutOfMemoryError | MemoryError):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()
