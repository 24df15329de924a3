"""One writer per run, for real: many processes starting at once, unwritable storage, foreign checkpoints."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STARTER = """
import os, sys, time
from pathlib import Path
from vae.tables.runs import RunError, RunLock
base, n, rounds = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
deadline = time.time() + 90  # never spin past the test's own limit
for r in range(rounds):  # one process a starter for every round: its imports paid once
    room = base / f"room{r}"
    (room / f"ready-{os.getpid()}").touch()
    while len(list(room.glob("ready-*"))) < n and time.time() < deadline:  # a barrier: every starter at acquire()
        pass
    lock = RunLock(str(base / f"r{r}"))
    try:
        lock.acquire()
    except RunError as e:
        (room / f"done-{os.getpid()}").touch()
        print(r, "refused", e, flush=True)
        continue
    print(r, "took" + (" over" if lock.took_over else ""), flush=True)
    while len(list(room.glob("done-*"))) < n - 1 and time.time() < deadline:  # hold it until the others are answered
        time.sleep(0.01)
    lock.release()
"""


class Foreign:
    """An object a checkpoint file might hold: torch.load(weights_only=True) refuses to build it."""


@pytest.mark.parametrize("stale", [False, True])
def test_of_many_jobs_starting_at_once_exactly_one_proceeds(tmp_path, stale):
    """Eight processes race for the lock, ten times; with a dead holder's record in place (stale), the
    take-over is atomic too: never two holders, never a record deleted under a fresh one."""
    rounds, n = 10, 8
    for r in range(rounds):
        (tmp_path / f"room{r}").mkdir()
        if stale:
            dead = subprocess.Popen([sys.executable, "-c", "pass"])
            dead.wait()
            (tmp_path / f"r{r}").mkdir()
            (tmp_path / f"r{r}" / ".lock").write_text(
                json.dumps({"host": socket.gethostname(), "pid": dead.pid, "started": "then"}))
    procs = [subprocess.Popen([sys.executable, "-c", STARTER, str(tmp_path), str(n), str(rounds)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True) for _ in range(n)]
    try:
        outs = [p.communicate(timeout=120)[0].strip().splitlines() for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(len(lines) == rounds for lines in outs), outs
    for r in range(rounds):
        said = [line.split(" ", 1)[1] for lines in outs for line in lines if line.split(" ", 1)[0] == str(r)]
        took = [o for o in said if o.startswith("took")]
        assert len(took) == 1, (r, said)
        assert all(o.startswith("refused") and "being written by another job" in o for o in said if o not in took)
        assert took[0] == ("took over" if stale else "took")
        assert not (tmp_path / f"r{r}" / ".lock").exists()  # released by its one holder


def test_storage_that_cannot_be_written_is_refused_in_one_line_before_ray(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for job in ("jobs.train", "jobs.sweep"):
        extra = ["--latent-dims", "2", "--betas", "1"] if job == "jobs.sweep" else []
        proc = subprocess.run([sys.executable, "-m", job, "--dataset", "gaussian2d", "--epochs", "1", *extra,
                               "--storage", str(blocker / "results"), "--name", "n"], cwd=ROOT, capture_output=True,
                              text=True, timeout=120, env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
        lines = [line for line in proc.stderr.splitlines() + proc.stdout.splitlines() if line.strip()]
        assert proc.returncode == 2, (job, proc.stdout, proc.stderr)
        assert len([line for line in lines if "cannot write" in line]) == 1 and "Traceback" not in proc.stderr
        assert str(blocker) in proc.stderr + proc.stdout and "Not a directory" in proc.stderr + proc.stdout
        assert "Ray" not in proc.stderr  # refused before any cluster work


def test_load_model_refuses_a_file_that_holds_objects_in_one_line(tmp_path):
    import torch

    import vae
    from vae.config import TrainConfig
    from vae.training.checkpoint import CheckpointError
    from vae.training.loop import train_loop
    from vae.training.session import LocalSession

    cfg = TrainConfig(dataset="gaussian2d", model="linear", decoder_var="1", epochs=1, iw_samples=0,
                      storage=str(tmp_path), name="m")
    train_loop(cfg, LocalSession(str(tmp_path / "m" / "checkpoint_000000")))
    assert vae.load_model(str(tmp_path / "m")).epoch == 1

    torch.save({"format": "vae-collapse-checkpoint/1", "payload": Foreign()},
               tmp_path / "m" / "checkpoint_000000" / "state.pt")
    with pytest.raises(CheckpointError) as refused:
        vae.load_model(str(tmp_path / "m"))
    message = str(refused.value)
    assert "\n" not in message and "not a checkpoint this project wrote" in message and "not loaded" in message
