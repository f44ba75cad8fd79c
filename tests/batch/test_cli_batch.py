"""``napari-pathology batch``: exit statuses 0/1/2, one-line usage errors, the summary table."""

from __future__ import annotations

import csv
import socket

import pytest

from napari_pathology.cli import main


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_an_unreachable_scheduler_is_one_line_and_exit_2(small_cohort, tmp_path, capsys, monkeypatch) -> None:
    from napari_pathology.batch import cluster

    monkeypatch.setattr(cluster, "CONNECT_TIMEOUT_S", 1.0)
    address = f"tcp://127.0.0.1:{free_port()}"
    status = main(["batch", str(small_cohort), "--model", "nuclear-density", "--out", str(tmp_path),
                   "--scheduler", address, "--quiet"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert status == 2
    assert err.count("\n") == 0 and f"cannot reach the dask scheduler at {address}" in err


@pytest.mark.parametrize(
    ("words", "message"),
    [
        (["nope.csv", "--model", "nuclear-density"], "no such slide table or folder"),
        (["TABLE", "--features-only"], "--features-only needs --encoder"),
        (["TABLE"], "batch needs --model"),
        (["TABLE", "--model", "nuclear-density", "--workers", "2", "--scheduler", "tcp://x:1"], "--workers"),
        (["TABLE", "--model", "nuclear-density", "--workers", "0"], "--workers"),
        (["TABLE", "--model", "no-such-model"], "no-such-model"),
    ],
)
def test_usage_errors_exit_2_in_one_line(small_cohort, tmp_path, capsys, words, message) -> None:
    words = [
        str(small_cohort) if w == "TABLE" else str(tmp_path / w) if w == "nope.csv" else w for w in words
    ]
    assert main(["batch", *words, "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.count("\n") == 0


@pytest.mark.slow
def test_a_broken_slide_fails_alone_and_exits_1(small_cohort, tmp_path, capsys, dask_scheduler) -> None:
    broken = tmp_path / "broken.tif"
    broken.write_bytes(b"\x00" * 4096)
    good = next(small_cohort.parent.glob("*negative.tif"))
    table = tmp_path / "table.csv"
    table.write_text(f"slide,label\n{broken},tumour\n{good},normal\n")
    out = tmp_path / "out"
    words = [
        "batch",
        str(table),
        "--model",
        "nuclear-density",
        "--out",
        str(out),
        "--scheduler",
        dask_scheduler,
    ]
    assert main(words) == 1
    captured = capsys.readouterr()
    assert "failed: broken.tif: Cannot open" in captured.out and "1 done" in captured.out
    with open(out / "cohort.csv", newline="", encoding="utf-8") as handle:
        rows = {row["slide"]: row for row in csv.DictReader(handle)}
    assert rows["broken.tif"]["status"] == "failed" and "broken.tif" in rows["broken.tif"]["error"]
    assert rows[good.name]["status"] == "done" and rows[good.name]["slide_score"]
    # the rerun skips the done slide and tries the broken one again
    assert main([*words, "--quiet"]) == 1
    assert "1 skipped" in capsys.readouterr().out
