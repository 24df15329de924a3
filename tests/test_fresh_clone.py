"""The README's second command works in a fresh clone: MNIST where the first command put it (./data)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _checkout(dest: Path) -> None:
    """The files a clone of this tree would hold (tracked plus new, not ignored): no ../shared, no data."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs a git checkout")
def test_the_tests_find_mnist_where_the_first_command_downloads_it(data_dir, tmp_path):
    clone = tmp_path / "clone" / "vae-collapse"  # nothing named shared/ beside it
    _checkout(clone)
    shutil.copytree(Path(data_dir) / "MNIST" / "raw", clone / "data" / "MNIST" / "raw")
    env = {k: v for k, v in os.environ.items() if k not in ("VAE_DATA_DIR", "PYTEST_ADDOPTS")}
    env["VAE_OFFLINE"] = "1"  # were ./data not found, the session would stop instead of downloading
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_data.py"],
                         cwd=clone, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "error" not in run.stdout.splitlines()[-1]


@pytest.mark.parametrize("processes", [[], ["-n", "0"]], ids=["xdist-workers", "one-process"])
def test_offline_without_mnist_stops_at_once_naming_both_ways_out(tmp_path, processes):
    """In pytest-xdist's workers (the default) the stop reaches the controller; in one process, pytest.exit."""
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    env.update(VAE_DATA_DIR=str(tmp_path / "empty"), VAE_OFFLINE="1")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *processes,
                          "tests/test_data.py::test_mnist_is_seed_one_intensities"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    out = run.stdout + run.stderr
    assert "MNIST is not in" in out and "VAE_DATA_DIR" in out and "unset VAE_OFFLINE" in out
    assert "passed" not in out  # no test ran


def test_the_cli_refuses_to_download_when_offline(tmp_path, monkeypatch):
    from vae.model.data import load_mnist
    from vae.model.sources import DataError

    monkeypatch.setenv("VAE_OFFLINE", "1")
    with pytest.raises(DataError, match="VAE_OFFLINE=1 forbids downloading"):
        load_mnist(str(tmp_path))


def test_the_installed_pytest_keeps_xdist_groups_on_one_worker(tmp_path):
    """The suite runs its tests on the shared Ray instance as one pytest-xdist group (tests/conftest.py). On
    pytest 9.2 xdist 3.8's loadgroup drops the groups without a word (pytest-dev/pytest-xdist#1386): each worker
    then starts an instance of its own. This fails there, so a pytest that breaks it is not installed unnoticed."""
    (tmp_path / "test_groups.py").write_text(
        "import pytest\n\n"
        "@pytest.mark.xdist_group('g')\n@pytest.mark.parametrize('i', range(4))\ndef test_grouped(i):\n    pass\n\n"
        "@pytest.mark.parametrize('i', range(4))\ndef test_free(i):\n    pass\n")
    run = subprocess.run([sys.executable, "-m", "pytest", "-c", os.devnull, "-p", "no:cacheprovider", "-n", "2",
                          "--dist", "loadgroup", "-v", "test_groups.py"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stdout[-2000:]
    grouped = [line for line in run.stdout.splitlines() if "test_grouped" in line and "PASSED" in line]
    assert len(grouped) == 4 and all(line.rstrip().endswith("@g") for line in grouped), run.stdout[-2000:]
    assert len({line.split()[0] for line in grouped}) == 1, run.stdout[-2000:]  # one worker ran the group
