"""Where the training loop runs: alone, in a Ray Train worker, or in a Tune trial.

A session tells the loop its rank, world size and device, wraps the model
for data parallelism, hands it the latest checkpoint folder, and takes its
per-epoch report. The loop itself never imports Ray: the Ray sessions import it inside their methods,
so `LocalSession` (plain tests, benchmarks) never loads it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from typing import Any, Iterator

import torch

from vae.training.faults import checkpoint_registered


class LocalSession:
    """One process, no Ray: plain tests and benchmarks.

    With `checkpoint_dir` the latest checkpoint is kept there, so a second
    call with the same folder resumes.
    """

    rank = 0
    world_size = 1

    def __init__(self, checkpoint_dir: str | None = None, device: str = "cpu"):
        self.checkpoint_dir = checkpoint_dir
        self.device = torch.device(device)
        self.reports: list[dict[str, Any]] = []

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)

    def restartable(self, step: int) -> bool:
        """Whether step `step`'s checkpoint (reported) is one a restart would use: here and in a Tune trial,
        as soon as `report` returns."""
        return True

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[str | None]:
        found = self.checkpoint_dir and os.path.isfile(os.path.join(self.checkpoint_dir, "state.pt"))
        yield self.checkpoint_dir if found else None

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        self.reports.append(metrics)
        if checkpoint_dir and self.checkpoint_dir:
            os.makedirs(self.checkpoint_dir, exist_ok=True)
            shutil.copy2(os.path.join(checkpoint_dir, "state.pt"),
                         os.path.join(self.checkpoint_dir, ".state.pt.tmp"))
            os.replace(os.path.join(self.checkpoint_dir, ".state.pt.tmp"),
                       os.path.join(self.checkpoint_dir, "state.pt"))


class RayTrainSession:
    """A worker of a Ray Train `TorchTrainer` (DDP over gloo on CPU, NCCL on GPU)."""

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def latest_checkpoint(self):
        import ray.train

        return _folder_of(ray.train.get_checkpoint())

    def restartable(self, step: int) -> bool:
        """Once the controller has registered it in its run's snapshot (vae/training/faults.py)."""
        import ray.train

        storage = ray.train.get_context().get_storage()  # Train's own run folder (a sweep's trial has its own)
        return checkpoint_registered(storage.storage_filesystem, storage.checkpoint_manager_snapshot_path, step)

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        import ray.train

        ckpt = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=ckpt)


class TuneSession(LocalSession):
    """A Tune function trial that trains in its own process (one worker)."""

    def __init__(self, device: str = "cpu") -> None:
        super().__init__(None, device)

    def latest_checkpoint(self):
        from ray import tune

        return _folder_of(tune.get_checkpoint())

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        from ray import tune

        ckpt = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        tune.report(metrics, checkpoint=ckpt)


@contextlib.contextmanager
def _folder_of(ckpt) -> Iterator[str | None]:
    """A Ray checkpoint (Train's or Tune's) as a local folder while the block runs; None: no checkpoint."""
    if ckpt is None:
        yield None
    else:
        with ckpt.as_directory() as folder:
            yield folder


def from_rank0(values: list[float], world_size: int, device: torch.device) -> list[float]:
    """Rank 0's values on every rank, in one broadcast (the loop's decisions: stop, a member ends, where to
    resume); as they are in a run of one process."""
    import torch.distributed as dist  # only data-parallel runs need it

    if world_size > 1 and dist.is_initialized():
        t = torch.tensor([float(v) for v in values], device=device)
        dist.broadcast(t, src=0)
        return t.tolist()
    return [float(v) for v in values]
