"""Test-only fault injection, half-way through one step of a pack (an epoch, for a run or a pack without a
queue): SIGKILL a worker once, or hold every worker until the test has done what it needs mid-step.

The reliability tests set in the environment of the processes they start (Ray Train workers, Tune trials, jobs):
- `VAE_FAULT_KILL_EPOCH=K` and `VAE_FAULT_MARKER=<file>`: rank 0 is killed in step K; the marker records that
  the kill happened, so the restarted worker goes on;
- `VAE_FAULT_HOLD_EPOCH=K[,K2,...]` and `VAE_FAULT_MARKER=<file>`: every worker, in step K, writes
  `<file>.held-K-<pid>` and waits until `<file>.release-K` exists (a node can then be stopped while its worker is
  mid-step, however fast the machine); the same in each step listed. Once released, later workers pass that
  step without holding. (A hold and a kill are meant for different steps: in the same step the hold wins.)
A kill waits, first, until the step before's checkpoint is one a restart would use (under Ray Train: until the
controller has registered it, `checkpoint_registered`). Killed in the moment between a worker's report and
that, a restart goes back one checkpoint more: a fault of its own, which the tests would otherwise meet by chance.
The plan is read once, when the loop sets up; the training step only compares a step number.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass
from typing import Callable

FAULT_EPOCH_ENV, FAULT_HOLD_ENV, FAULT_MARKER_ENV = "VAE_FAULT_KILL_EPOCH", "VAE_FAULT_HOLD_EPOCH", "VAE_FAULT_MARKER"
HOLD_LIMIT = 600.0  # seconds a held worker waits for its release before it goes on anyway
SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record, in its run folder, of the checkpoints it registered


def checkpoint_registered(fs, path: str, step: int) -> bool:
    """Whether the Ray Train snapshot at `path` (on pyarrow filesystem `fs`) holds a checkpoint of step `step` or
    later: the controller polls its workers for their reports, so a checkpoint a worker has reported is not yet
    one a restart uses."""
    try:
        with fs.open_input_stream(path) as src:
            results = json.loads(src.read().decode())["checkpoint_results"]
        return any(r["metrics"].get("epoch", -1) >= step for r in results)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _step(name: str) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.strip().lstrip("-").isdigit() else -1


def _steps(name: str) -> tuple[int, ...]:
    return tuple(int(v) for v in os.environ.get(name, "").split(",") if v.strip().isdigit())


@dataclass(frozen=True)
class FaultPlan:
    epoch: int = -1  # the step whose rank 0 is killed (-1: none)
    marker: str = ""
    holds: tuple[int, ...] = ()  # the steps in which every rank waits for `marker + '.release-<step>'`

    @classmethod
    def from_env(cls) -> "FaultPlan":
        return cls(_step(FAULT_EPOCH_ENV), os.environ.get(FAULT_MARKER_ENV, ""), _steps(FAULT_HOLD_ENV))

    def released(self, epoch: int) -> bool:
        return os.path.exists(f"{self.marker}.release-{epoch}")

    def step_in(self, epoch: int, steps: int, rank: int) -> int:
        """The batch of the pack's step `epoch` at which rank `rank` is killed or held (-1: none)."""
        killed = epoch == self.epoch and rank == 0 and not self.done()
        held = epoch in self.holds and bool(self.marker) and not self.released(epoch)
        return steps // 2 if killed or held else -1

    def done(self) -> bool:
        return bool(self.marker) and os.path.exists(self.marker)

    def fire(self, epoch: int, restartable: Callable[[], bool] = lambda: True) -> None:
        """What step_in planned for this batch of step `epoch`: hold until released, or the kill, once
        `restartable()` says the step before's checkpoint is one a restart would use."""
        if epoch in self.holds:
            open(f"{self.marker}.held-{epoch}-{os.getpid()}", "w").close()
            _wait(lambda: self.released(epoch), 0.05)
            return
        _wait(restartable, 0.1)
        if self.marker:
            open(self.marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)


def _wait(condition: Callable[[], bool], poll: float) -> None:
    """Until `condition()`, asked every `poll` seconds, or HOLD_LIMIT seconds have passed."""
    deadline = time.monotonic() + HOLD_LIMIT
    while not condition() and time.monotonic() < deadline:
        time.sleep(poll)
