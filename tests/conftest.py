"""Shared fixtures: MNIST found the way the CLI finds it, and one local Ray for the suite.

MNIST is looked for where `jobs.train` looks: `$VAE_DATA_DIR`, else the repository's `./data` (where the README's
first command, run from the repository, downloads it; resolved from the repository, not from where pytest runs). When a selected test needs it and it is nowhere, the session fetches it once,
before any test runs, through the project's own download path; with `VAE_OFFLINE=1` (CI) it stops at
once instead, naming both ways out. No test itself ever reaches the network.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from vae.config import DATA_DIR_ENV, OFFLINE_ENV, default_data_dir, offline

ROOT = Path(__file__).resolve().parents[1]

try:  # CI runs hypothesis derandomised (the same examples every run); a failure prints how to replay it
    from hypothesis import settings

    settings.register_profile("ci", derandomize=True, print_blob=True)
    if os.environ.get("CI"):
        settings.load_profile("ci")
except ImportError:  # hypothesis comes with the test extra
    pass
# $VAE_DATA_DIR, else the repository's ./data (where the README's first command puts it), wherever pytest runs from
DATA_DIR = default_data_dir() if os.environ.get(DATA_DIR_ENV) else str(ROOT / "data")
os.environ[DATA_DIR_ENV] = DATA_DIR  # subprocesses (jobs, Ray workers) look in the same folder
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


def _mnist_is_here() -> bool:
    return (Path(DATA_DIR) / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file()


def pytest_collection_finish(session: pytest.Session) -> None:
    """Fetch MNIST once if a selected test needs it and it is not on disk (or stop, when offline)."""
    if _mnist_is_here() or not any("data_dir" in getattr(item, "fixturenames", ()) for item in session.items):
        return
    if offline():
        pytest.exit(f"MNIST is not in {DATA_DIR}: point {DATA_DIR_ENV} at a folder that holds it, "
                    f"or unset {OFFLINE_ENV} to let the tests download it there once", returncode=2)
    from vae.model.data import DataError, download_mnist

    print(f"\nMNIST is not in {DATA_DIR}: downloading it there once for the tests", file=sys.stderr, flush=True)
    try:
        download_mnist(DATA_DIR)
    except DataError as e:
        pytest.exit(str(e), returncode=2)


@pytest.fixture(scope="session")
def data_dir() -> str:
    if not _mnist_is_here():
        pytest.fail(f"MNIST not found under {DATA_DIR}: set {DATA_DIR_ENV}")
    return DATA_DIR


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray instance for every test that needs Ray (started once, ended at exit)."""
    import ray

    from vae import launch

    os.environ.pop("RAY_ADDRESS", None)
    launch.connect(verbose=False, num_cpus=2)
    yield ray
    ray.shutdown()
