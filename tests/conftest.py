"""Shared fixtures: MNIST found the way the CLI finds it, and one local Ray for the suite.

MNIST is looked for where `jobs.train` looks: `$VAE_DATA_DIR`, else the repository's `./data` (where the README's
first command, run from the repository, downloads it; resolved from the repository, not from where pytest runs). When a selected test needs it and it is nowhere, the session fetches it once,
before any test runs, through the project's own download path; with `VAE_OFFLINE=1` (CI) it stops at
once instead, naming both ways out. No test itself ever reaches the network.
"""

from __future__ import annotations

import fcntl
import os
import random
import socket
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


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port free now, for a Ray head's fixed ones (the dashboard's default, 8265, is one for the whole machine,
    and pytest-xdist's workers may start two heads at once). Drawn between Ray's worker ports (10002-19999) and
    the kernel's ephemeral range, where every outgoing connection and every port-0 listener (Ray's own among
    them) takes one and could take ours before the head binds it; never the same one twice in a process."""
    range_file = Path("/proc/sys/net/ipv4/ip_local_port_range")
    ephemeral = int(range_file.read_text().split()[0]) if range_file.exists() else 32768
    draw = random.SystemRandom()
    while True:
        port = draw.randrange(20000, ephemeral) if ephemeral > 21000 else 0  # 0: a range set low, the kernel's pick
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def watch_torch(env: dict[str, str], folder: Path) -> Path:
    """Have a `python -m jobs.sweep` process started with `env` leave a file (the returned path) as it exits
    if it imported torch (about 2.4 CPU-s, which an unpacked sweep's driver never needs: its trials import
    torch in their own processes): a sitecustomize.py in `folder`, first on the PYTHONPATH. The run itself is
    as a user's; Ray's workers, which inherit `env`, are not watched."""
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / "driver-imported-torch"
    (folder / "sitecustomize.py").write_text(
        "import atexit, os, sys\n"
        "if sys.orig_argv[1:3] == ['-m', 'jobs.sweep']:\n"
        f"    atexit.register(lambda: 'torch' in sys.modules and open({str(marker)!r}, 'w').close())\n")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(folder), env.get("PYTHONPATH", "")]))
    return marker


def recorded_run(root: Path, kind: str = "train", **config) -> dict:
    """A run.json as an earlier start of the toy linear VAE (plus `config`) would have left it in `root`."""
    from vae.config import TrainConfig, resolve
    from vae.tables.results import Results

    cfg = resolve(TrainConfig(dataset="gaussian2d", model="linear", decoder_var="1", iw_samples=0,
                              storage=str(root.parent), name=root.name, **config)).to_dict()
    info = {"kind": kind, "command": "python -m jobs.train ...", "config": cfg}
    Results(str(root)).write_json("run.json", info)
    return info


def _mnist_is_here() -> bool:
    return (Path(DATA_DIR) / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file()


def _uses_ray(item: pytest.Item | None) -> bool:
    return item is not None and "ray_cluster" in getattr(item, "fixturenames", ())


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(session: pytest.Session, items: list[pytest.Item]) -> None:
    """The tests on the shared Ray instance (`ray_cluster`) first and together, as one pytest-xdist group: one
    worker runs them all on one instance, which ends after the last of them (`pytest_runtest_teardown`), instead
    of each worker starting its own and keeping it idle, at about 8 % of a core, to the end. Then the slow tests
    (a stable sort): the workers start the long end-to-end runs early and fill in with the short ones, instead of
    one worker ending alone on a long test. Then MNIST (`_fetch_mnist`): here, not later, so that a pytest-xdist
    worker can still drop its tests."""
    items.sort(key=lambda item: (not _uses_ray(item), item.get_closest_marker("slow") is None))
    for item in items:
        if _uses_ray(item):
            item.add_marker(pytest.mark.xdist_group("ray"))
    if not _mnist_is_here() and any("data_dir" in getattr(item, "fixturenames", ()) for item in items):
        _fetch_mnist(session, items)


def _fetch_mnist(session: pytest.Session, items: list[pytest.Item]) -> None:
    """Fetch MNIST once for the selected tests that need it (or stop the session, when offline)."""
    if offline():
        return _stop(session, items, f"MNIST is not in {DATA_DIR}: point {DATA_DIR_ENV} at a folder that holds it, "
                                     f"or unset {OFFLINE_ENV} to let the tests download it there once")
    from vae.model.sources import DataError, download_mnist

    Path(DATA_DIR).mkdir(parents=True, exist_ok=True)
    with open(Path(DATA_DIR) / ".download.lock", "w") as lock:  # pytest-xdist's workers: one downloads, the other waits
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _mnist_is_here():
            return
        print(f"\nMNIST is not in {DATA_DIR}: downloading it there once for the tests", file=sys.stderr, flush=True)
        try:
            download_mnist(DATA_DIR)
        except DataError as e:
            _stop(session, items, str(e))


def _stop(session: pytest.Session, items: list[pytest.Item], message: str) -> None:
    """End the session before any test runs, with `message` and exit code 2. A pytest-xdist worker runs none of
    its tests and hands the message to the controller (an exit there would only restart the worker)."""
    if not hasattr(session.config, "workerinput"):
        pytest.exit(message, returncode=2)
    items.clear()
    session.shouldstop = message


@pytest.fixture(autouse=True)
def one_thread():
    """Every test starts on one torch thread and leaves the count as it found it. Two runs a test compares then
    block their matrix products the same way (with two threads, a pack's wider products and a trial's alone are
    blocked differently and drift apart by about 1e-4 in 3 epochs), a run that sets its own count
    (`cpus_per_worker`) does not leak it into the next test, and pytest-xdist's two workers share 2 cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def data_dir() -> str:
    if not _mnist_is_here():
        pytest.fail(f"MNIST not found under {DATA_DIR}: set {DATA_DIR_ENV}")
    return DATA_DIR


def _connect() -> None:
    from vae import launch

    os.environ.pop("RAY_ADDRESS", None)
    launch.connect(verbose=False, num_cpus=2)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray instance for the tests that need Ray: started by the first, ended after the last of a run of
    them (`pytest_runtest_teardown`; the collection puts them together), and at exit."""
    import ray

    _connect()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def linear_sweep(ray_cluster, tmp_path_factory) -> str:
    """The folder of a finished sweep of the linear VAE on the toy data, whose collapse theory gives (the data's
    covariance eigenvalues 1.5 and 0.5, decoder variance 1: units die at beta 0.5 and 1.5): run once for the
    tests that read one."""
    from jobs import sweep as sweep_job

    storage = tmp_path_factory.mktemp("linear")
    assert sweep_job.main(["--dataset", "gaussian2d", "--model", "linear", "--decoder-var", "1", "--latent-dims", "2",
                           "--lrs", "1e-2", "--betas", "0.2,1,3", "--epochs", "6", "--iw-samples", "5",
                           "--storage", str(storage), "--name", "linear"]) == 0
    return str(storage / "linear")


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A test on the shared instance after it was ended (another run of them, in a selection of tests) starts it again."""
    if _uses_ray(item) and "ray" in sys.modules:
        import ray

        if not ray.is_initialized():
            _connect()


@pytest.hookimpl(trylast=True)  # after the test's own fixtures are torn down
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """The shared instance ends once the next test does not use it: idle, it costs about 8 % of a core."""
    if _uses_ray(item) and not _uses_ray(nextitem):
        import ray

        ray.shutdown()
