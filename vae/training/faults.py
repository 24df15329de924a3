"""Test-only fault injection: SIGKILL a worker half-way through one step of its pack (an epoch, for a run or
a pack without a queue), once.

The reliability tests set `VAE_FAULT_KILL_EPOCH=K` (and `VAE_FAULT_MARKER=<file>`, which records that the
kill happened, so the restarted worker goes on) in the environment of the processes they start: Ray Train
workers, Tune trials, jobs. The plan is read once, when the loop sets up; the training step only compares
a step number.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

FAULT_EPOCH_ENV, FAULT_MARKER_ENV = "VAE_FAULT_KILL_EPOCH", "VAE_FAULT_MARKER"


@dataclass(frozen=True)
class FaultPlan:
    epoch: int = -1  # -1: no fault
    marker: str = ""

    @classmethod
    def from_env(cls) -> "FaultPlan":
        epoch = os.environ.get(FAULT_EPOCH_ENV, "")
        return cls(int(epoch) if epoch.strip().lstrip("-").isdigit() else -1, os.environ.get(FAULT_MARKER_ENV, ""))

    def step_in(self, epoch: int, steps: int, rank: int) -> int:
        """The batch of the pack's step `epoch` at which rank `rank` is killed (-1: none)."""
        return steps // 2 if epoch == self.epoch and rank == 0 and not self.done() else -1

    def done(self) -> bool:
        return bool(self.marker) and os.path.exists(self.marker)

    def kill(self) -> None:
        if self.marker:
            open(self.marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
