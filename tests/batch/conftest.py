"""Fixtures of the cohort runner's tests: small synthetic slides and one local dask cluster for the module."""

from __future__ import annotations

from pathlib import Path

import pytest

#: The slide stem whose first attempt kills its dask worker (see CRASH_ONCE_ENV).
CRASH_STEM = "crash-once"


@pytest.fixture(scope="session")
def small_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Slide table of 3 synthetic 2048 px slides at 0.5 um/px (1 negative, 2 macro-metastasis)."""
    from napari_pathology.cohort import write_synthetic_cohort
    from napari_pathology.progress import run_to_completion

    folder = tmp_path_factory.mktemp("batch-cohort")
    job = write_synthetic_cohort(folder, 3, 7, size=2048, negative_fraction=0.34, micro_fraction=0)
    return run_to_completion(job)


@pytest.fixture(scope="session")
def crash_flag(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The flag file the crash hook writes when it kills a worker."""
    return tmp_path_factory.mktemp("crash") / "crashed"


@pytest.fixture(scope="session")
def dask_scheduler(crash_flag: Path) -> str:
    """Address of a LocalCluster(processes=True, n_workers=2, threads_per_worker=1), 2 retries.

    Its workers carry the test-only crash hook for slides named ``crash-once``.
    """
    import os

    from distributed import Client, LocalCluster

    from napari_pathology.batch import CRASH_ONCE_ENV

    os.environ[CRASH_ONCE_ENV] = f"{CRASH_STEM}|{crash_flag}"  # inherited by the worker processes
    try:
        cluster = LocalCluster(
            n_workers=2, processes=True, threads_per_worker=1, dashboard_address=":0",
            scheduler_kwargs={"allowed_failures": 2}, silence_logs=40,
        )  # fmt: skip
    finally:
        del os.environ[CRASH_ONCE_ENV]
    client = Client(cluster)
    client.wait_for_workers(2, timeout=120)
    client.close()
    yield cluster.scheduler_address
    cluster.close()
