"""Device strings: every one validated, in one line that lists what exists."""

from __future__ import annotations

import pytest

from napari_pathology import devices
from napari_pathology.devices import available_devices, resolve_device


@pytest.mark.parametrize("text", ["cpu", "CPU", " cpu ", "auto", "", None])
def test_cpu_and_auto_resolve(text) -> None:
    assert resolve_device(text).type in ("cpu", "cuda", "mps")


def test_mps_on_a_build_without_it_is_refused_listing_the_devices(monkeypatch) -> None:
    monkeypatch.setattr(devices, "_mps_available", lambda: False)
    with pytest.raises(ValueError, match=r"'mps' is not in this build of torch \(available: cpu") as info:
        resolve_device("mps")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("text", ["xla", "meta", "gpu", "cuda:x", "cuda:-1", "cuda:0:1", "vulkan"])
def test_unknown_device_strings_are_refused(text) -> None:
    with pytest.raises(ValueError, match=r"unknown device .* \(available: cpu"):
        resolve_device(text)


def test_a_gpu_past_the_last_is_refused() -> None:
    with pytest.raises(ValueError, match=r"'cuda:99' is not visible here \(available: cpu"):
        resolve_device("cuda:99")


def test_available_devices_start_with_the_cpu() -> None:
    assert available_devices()[0].id == "cpu"
