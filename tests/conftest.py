"""Shared fixtures: the MNIST folder (never the network) and one local Ray for the suite."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = os.environ.get("VAE_DATA_DIR") or str(ROOT.parent / "shared" / "data")
os.environ["VAE_DATA_DIR"] = DATA_DIR
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


@pytest.fixture(scope="session")
def data_dir() -> str:
    if not (Path(DATA_DIR) / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
        pytest.fail(f"MNIST not found under {DATA_DIR}: set VAE_DATA_DIR (tests never download)")
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
