"""``napari-pathology run`` killed mid-run (SIGTERM, SIGKILL), resumed, and refused in one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from napari_pathology.analysis import load_result
from napari_pathology.cli import main

#: A model whose forward pass is slow (so a kill lands mid-run), injected in place of the registry.
SCRIPT = textwrap.dedent(
    """
    import sys, time
    import torch
    from torch import nn
    import napari_pathology.analysis.engine as engine
    import napari_pathology.models as models
    from napari_pathology.models import ModelSpec, PathologyModel

    class Dark(nn.Module):
        def __init__(self, delay):
            super().__init__()
            self.delay = delay
            self.tiles_seen = 0
            self.register_buffer("dark_level", torch.tensor(0.5))

        def forward(self, x):
            time.sleep(self.delay)
            self.tiles_seen += len(x)
            frac = (x.mean(1) < self.dark_level).float().mean((1, 2)).clamp(1e-6, 1 - 1e-6)
            return torch.stack([torch.log(1 - frac), torch.log(frac)], 1)

    SPEC = ModelSpec(
        name="test-slow", family="test", task="test", classes=("normal", "tumour"), input_size=32,
        mpp=2.0, stride=32, normalization="unit", aggregator="max", tta=False,
    )

    def install(delay, save_every):
        engine.PARTIAL_SAVE_SECONDS = save_every
        models.resolve_model = lambda name, **_: PathologyModel(Dark(delay), SPEC)

    if __name__ == "__main__":
        install(float(sys.argv[1]), float(sys.argv[2]))
        from napari_pathology.cli import main
        sys.exit(main(sys.argv[3:]))
    """
)

TOTAL = 256  # 1024 px at 1 um/px, 32 px tiles at 2 um/px: 16 x 16


@pytest.fixture
def setup(tmp_path: Path) -> dict:
    image = np.full((1024, 1024, 3), (230, 180, 200), np.uint8)
    image[256:512, 384:640] = (60, 30, 90)
    slide = tmp_path / "slide.png"
    Image.fromarray(image).save(slide)
    script = tmp_path / "slow_run.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out"
    args = ["run", str(slide), "--model", "test-slow", "--out", str(out), "--mpp", "1", "--tissue", "none",
            "--batch-size", "8", "--quiet"]  # fmt: skip
    return {"script": script, "args": args, "folder": out / "slide" / "test-slow", "tmp": tmp_path}


def start(setup: dict, delay: float = 0.15) -> subprocess.Popen:
    command = [sys.executable, str(setup["script"]), str(delay), "0", *setup["args"]]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=setup["tmp"])  # fmt: skip


def wait_for_tiles(folder: Path, more_than: int, process: subprocess.Popen, timeout: float = 120) -> int:
    """Tiles in the saved result once it holds more than ``more_than``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        try:
            done = load_result(folder).tiles_done
        except ValueError:
            done = -1
        if done > more_than:
            return done
        time.sleep(0.1)
    process.kill()
    raise AssertionError(f"no saved result with more than {more_than} tiles in {timeout} s")


def test_sigterm_and_sigkill_mid_run_keep_the_finished_tiles_and_a_rerun_resumes(setup, monkeypatch, capsys):
    folder = setup["folder"]
    process = start(setup)
    wait_for_tiles(folder, 0, process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143, stderr
    kept = load_result(folder)
    assert kept.partial and 0 < kept.tiles_done < TOTAL
    assert f"partial result kept in {folder} ({kept.tiles_done}/{TOTAL} tiles)" in stderr
    assert "Traceback" not in stderr

    process = start(setup)  # resumes from the SIGTERM's result, then is killed without warning
    after_kill = wait_for_tiles(folder, kept.tiles_done, process)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    killed = load_result(folder)  # atomic: the last periodic save loads, whole
    assert killed.partial and after_kill <= killed.tiles_done < TOTAL

    import importlib.util

    spec = importlib.util.spec_from_file_location("slow_run", setup["script"])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    seen = []
    import napari_pathology.models as models

    def fast(name, **_):
        model = module.PathologyModel(module.Dark(0.0), module.SPEC)
        seen.append(model)
        return model

    monkeypatch.setattr(models, "resolve_model", fast)
    assert main(setup["args"]) == 0
    assert seen[0].net.tiles_seen == TOTAL - killed.tiles_done  # resumed, not restarted
    assert not load_result(folder).partial
    assert f"results: {folder}" in capsys.readouterr().out


def test_an_interrupt_before_any_tile_says_nothing_was_kept(setup) -> None:
    process = start(setup, delay=30.0)  # the first batch never finishes
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (setup["tmp"] / "out" / "slide").exists():
        time.sleep(0.1)
    time.sleep(1.0)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "nothing was kept" in stderr and "partial result kept" not in stderr
    assert not (setup["folder"] / "result.json").exists()


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [("--nms-threshold", "nan", "nms-threshold"), ("--nms-radius", "-1", "nms-radius"),
     ("--stride", "0", "stride"), ("--batch-size", "0", "batch-size"), ("--min-tissue", "2", "min-tissue")],
)  # fmt: skip
def test_bad_run_settings_are_one_line_before_any_work(setup, capsys, option, value, message) -> None:
    args = [*setup["args"][:2], "--model", "nuclear-density", *setup["args"][4:], option, value]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (setup["tmp"] / "out" / "slide").exists()


def test_a_stride_larger_than_the_slide_is_said_not_no_tissue(setup, capsys) -> None:
    args = [*setup["args"][:2], "--model", "nuclear-density", *setup["args"][4:6], "--mpp", "1",
            "--stride", "4096", "--quiet"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "larger than slide.png" in err and "tissue" not in err.lower()


def test_an_output_that_cannot_be_written_is_refused_before_the_slide_is_read(setup, capsys) -> None:
    blocker = setup["tmp"] / "blocker"
    blocker.write_text("a file")
    args = list(setup["args"])
    args[args.index("--out") + 1] = str(blocker)
    args[args.index("--model") + 1] = "nuclear-density"
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert str(blocker) in err and len(err.splitlines()) == 1


@pytest.mark.skipif(os.name != "posix", reason="signals")
def test_sigterm_handler_is_restored_after_run(setup, monkeypatch) -> None:
    previous = signal.getsignal(signal.SIGTERM)
    args = [*setup["args"][:2], "--model", "nuclear-density", *setup["args"][4:], "--stride", "0"]
    main(args)
    assert signal.getsignal(signal.SIGTERM) == previous
