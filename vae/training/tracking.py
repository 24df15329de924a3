"""Experiment trackers, opt-in (`--tracker tensorboard|mlflow`): each trial's per-epoch metrics, written from
rank 0 inside the loop (where Ray Train V2 expects tracking calls), beside the Parquet tables, which stay
the record. Both packages are an optional extra (`pip install 'vae-collapse[trackers]'`), imported only
when asked for.

- TensorBoard: event files in `<run>/tensorboard/<trial_id>/`.
- MLflow: one MLflow run per trial (run name and tag `vae.trial_id` = the trial id, its config as params),
  in the experiment named after the run or sweep; the store is `$MLFLOW_TRACKING_URI`, else a local file
  store `<run>/mlruns`. A resumed trial logs into its own MLflow run again.
"""

from __future__ import annotations

import math
import os
import pathlib
import time
from typing import Any

from vae.tables.results import config_row, run_root

TRACKED = ("train_loss", "train_recon", "train_kl", "test_loss", "test_recon", "test_kl", "active_units",
           "units_in_use", "units_undecided", "mutual_info", "kl_weight", "lr_now", "samples_per_second")
MLFLOW_STATUS = {"finished": "FINISHED", "diverged": "FAILED", "interrupted": "KILLED"}


def _values(row: dict[str, Any]) -> dict[str, float]:
    """The row's tracked metrics that have a value (epoch 0 has no training: those are NaN and left out)."""
    out = {}
    for key in TRACKED:
        value = row.get(key)
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            out[key] = float(value)
    return out


class TensorBoardTracker:
    def __init__(self, cfg: Any, trial_id: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=f"{run_root(cfg.storage, cfg.name)}/tensorboard/{trial_id}")

    def log(self, row: dict[str, Any]) -> None:
        for key, value in _values(row).items():
            self.writer.add_scalar(key, value, global_step=int(row["epoch"]))
        self.writer.flush()

    def close(self, status: str) -> None:
        self.writer.close()


def mlflow_uri(cfg: Any) -> str:
    """Where MLflow runs go: $MLFLOW_TRACKING_URI, else `<run>/mlruns` as a local file store. MLflow 3 keeps the
    file store in maintenance mode and asks for MLFLOW_ALLOW_FILE_STORE=true to use it; this default sets that
    (a SQLite store needs SQLAlchemy, which mlflow-skinny does not bring: give sqlite:///... yourself)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return pathlib.Path(run_root(cfg.storage, cfg.name), "mlruns").as_uri()


class MLflowTracker:
    def __init__(self, cfg: Any, trial_id: str):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(mlflow_uri(cfg))
        experiment = self.client.get_experiment_by_name(cfg.name)
        if experiment is None:
            try:
                experiment_id = self.client.create_experiment(cfg.name)
            except Exception:  # another trial of the sweep created it first
                experiment_id = self.client.get_experiment_by_name(cfg.name).experiment_id
        else:
            experiment_id = experiment.experiment_id
        found = self.client.search_runs([experiment_id], f"tags.`vae.trial_id` = '{trial_id}'", max_results=1)
        if found:
            self.run_id = found[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            run = self.client.create_run(experiment_id, run_name=trial_id, tags={"vae.trial_id": trial_id})
            self.run_id = run.info.run_id
            self.client.log_batch(self.run_id, params=self._params(cfg))

    @staticmethod
    def _params(cfg: Any) -> list:
        from mlflow.entities import Param

        return [Param(k, str(v)) for k, v in config_row(cfg).items()]

    def log(self, row: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, int(row["epoch"]))
                                                   for k, v in _values(row).items()])

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, MLFLOW_STATUS.get(status, "FINISHED"))


TRACKERS = {"tensorboard": TensorBoardTracker, "mlflow": MLflowTracker}


def open_tracker(cfg: Any, trial_id: str):
    """The tracker `cfg.tracker` asks for, for one trial, or None."""
    cls = TRACKERS.get(cfg.tracker)
    return cls(cfg, trial_id) if cls else None
