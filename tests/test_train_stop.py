"""Stop never waits for more than one save (issue 16, item 10); without validation best is the latest."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import torch

import napari_pathology.training.loop as loop
from napari_pathology.models import create_model, load_checkpoint
from napari_pathology.training import LoopSettings, checkpoint_paths, fit


def batches(stop: threading.Event | None = None, at: int = -1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    n = 0
    while True:
        n += 1
        if stop is not None and n == at:
            stop.set()  # Stop pressed while this step trains
        yield torch.rand(2, 3, 32, 32, generator=g), torch.randint(0, 2, (2,), generator=g)


def run(job):
    events = []
    try:
        while True:
            events.append(next(job))
    except StopIteration as done:
        return done.value, events


def counting(monkeypatch) -> dict[str, int]:
    calls = {"save": 0, "recalibrate": 0}
    save, recalibrate = loop.save_checkpoint, loop.recalibrate_batch_norm

    def counted_save(*args, **kwargs):
        calls["save"] += 1
        return save(*args, **kwargs)

    def counted_recalibrate(*args, **kwargs):
        calls["recalibrate"] += 1
        return recalibrate(*args, **kwargs)

    monkeypatch.setattr(loop, "save_checkpoint", counted_save)
    monkeypatch.setattr(loop, "recalibrate_batch_norm", counted_recalibrate)
    return calls


def test_without_validation_each_save_writes_the_weights_once(tmp_path: Path, monkeypatch) -> None:
    calls = counting(monkeypatch)
    torch.manual_seed(0)
    model = create_model("nuclear-density").train()
    settings = LoopSettings(4, tmp_path / "m.pt", eval_every=2, log_every=1, precise_bn_batches=0)
    result, _ = run(fit(model, batches(), torch.optim.SGD(model.parameters(), lr=1e-3), settings))
    best, last, _state = checkpoint_paths(tmp_path / "m.pt")
    assert calls["save"] == 2  # two saves, each once (not best and last apart)
    assert best.read_bytes() == last.read_bytes() and result.best == best


def test_stop_skips_validation_and_recalibration_and_saves_once(tmp_path: Path, monkeypatch) -> None:
    calls = counting(monkeypatch)
    validated = []
    stop = threading.Event()
    torch.manual_seed(0)
    model = create_model("nuclear-density").train()
    settings = LoopSettings(50, tmp_path / "m.pt", eval_every=2, log_every=1, precise_bn_batches=3)

    def validate(m):
        validated.append(1)
        return {"score": float(len(validated))}

    job = fit(
        model, batches(stop, at=3), torch.optim.SGD(model.parameters(), lr=1e-3), settings,
        validate=validate, stop=stop,
    )  # fmt: skip
    result, events = run(job)
    assert result.stopped and result.step == 3
    # one validation (step 2: recalibrated, best and last saved), then Stop at step 3: one save of last only
    assert len(validated) == 1 and calls["recalibrate"] == 1 and calls["save"] == 3
    _best, last, _state = checkpoint_paths(tmp_path / "m.pt")
    assert load_checkpoint(last).provenance["step"] == 3
    assert [e.kind for e in events].count("validation") == 1


def test_stop_during_recalibration_keeps_the_batches_done(tmp_path: Path) -> None:
    stop = threading.Event()
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).train()
    seen = []

    def forward(m, x):
        seen.append(1)
        stop.set()  # pressed during the first recalibration batch
        return m(x)

    n = loop.recalibrate_batch_norm(model, forward, batches(), 8, torch.device("cpu"), stop=stop)
    assert len(seen) == 1 and n > 0
    norm = model[1]
    assert int(norm.num_batches_tracked) == 1 and norm.momentum == 0.1  # the mean of the one batch done
    assert torch.isfinite(norm.running_mean).all() and norm.running_mean.abs().sum() > 0
