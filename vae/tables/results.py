"""The results contract: every Parquet table's name, schema, writer and reader.

A run (or sweep) lives under `<storage>/<name>/`, one folder per table. Each
write is one Parquet file, written under a hidden temporary name and renamed
into place, and keyed so that a retried epoch replaces its file instead of
adding a second one. `pandas.read_parquet("<storage>/<name>/epochs")` reads a
table; `read_table` does the same through pyarrow.fs for any storage URI.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from typing import Any, Iterable, Mapping

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from vae.axes import AXES

# The run settings that become columns of `epochs/` and `trials/` (the science, not the plumbing).
CONFIG_FIELDS = [
    ("dataset", pa.string()), ("model", pa.string()), ("latent_dim", pa.int64()),
    ("hidden_dim", pa.int64()), ("hidden_widths", pa.string()), ("activation", pa.string()),
    ("decoder_var", pa.string()), ("decoder", pa.string()), ("decoder_context", pa.int64()),
    ("decoder_layers", pa.int64()), ("mitigation", pa.string()), ("objective", pa.string()), ("objective_k", pa.int64()),
    ("beta", pa.float64()),
    ("kl_warmup_epochs", pa.float64()), ("free_bits", pa.float64()), ("num_mc", pa.int64()),
    ("epochs", pa.int64()), ("until_settled", pa.bool_()), ("max_epochs", pa.int64()),
    ("batch_size", pa.int64()), ("lr", pa.float64()), ("lr_schedule", pa.string()),
    ("seed", pa.int64()), ("subset", pa.int64()), ("num_workers", pa.int64()),
    ("active_threshold", pa.float64()), ("kl_threshold", pa.float64()),
]
CONFIG_COLUMNS = [name for name, _ in CONFIG_FIELDS]
KEY = [("trial_id", pa.string())]
# active_units: Var_x E_q[z_j] > active_threshold; units_in_use: active and test KL >= kl_threshold
# (vae.tables.collapse): each written where it is computed, under its own name.
UNIT_FIELDS = [("active_units", pa.int64()), ("units_in_use", pa.int64())]
TEST_FIELDS = [("test_loss", pa.float64()), ("test_recon", pa.float64()), ("test_kl", pa.float64())]

METRIC_FIELDS = [
    ("kl_weight", pa.float64()), ("train_loss", pa.float64()), ("train_recon", pa.float64()),
    ("train_kl", pa.float64()), *TEST_FIELDS, *UNIT_FIELDS, ("mutual_info", pa.float64()),
    ("epoch_seconds", pa.float64()), ("samples_per_second", pa.float64()),
    ("kernels", pa.string()),  # which implementation trained: "torch" (vae/model/fast.py; kept for older tables' readers)
    ("lr_now", pa.float64()),  # the learning rate the epoch trained at (its schedule's)
    ("units_undecided", pa.int64()), ("settled", pa.bool_()),  # vae/training/settle.py, after this epoch
    ("test_examples", pa.int64()),  # test images the test columns were measured on (--eval-subset; the last: all)
]
_ARROW = {int: pa.int64(), float: pa.float64(), str: pa.string()}

SCHEMAS: dict[str, pa.Schema] = {
    # one row per (trial_id, epoch); epoch 0 is the test before the first step
    "epochs": pa.schema(KEY + [("epoch", pa.int64())] + CONFIG_FIELDS + METRIC_FIELDS),
    # test-set mean KL and activity Var_x(E_q[z_j]) of each latent dimension
    "kl_per_dim": pa.schema(KEY + [("epoch", pa.int64()), ("dim", pa.int64()),
                                   ("kl", pa.float64()), ("activity", pa.float64())]),
    # one row per trial: its config, where it stopped, and its final metrics
    "trials": pa.schema(KEY + CONFIG_FIELDS + [
        ("status", pa.string()),  # running | finished | diverged | failed | stopped | interrupted
        ("error", pa.string()), ("epochs_done", pa.int64()),
        ("train_loss", pa.float64()), *TEST_FIELDS, *UNIT_FIELDS, ("mutual_info", pa.float64()),
        ("iw_nll", pa.float64()), ("wall_seconds", pa.float64()),
        ("iw_seconds", pa.float64()),  # the IW NLL bound's own wall time
        # vae/training/settle.py: had the collapse state settled when the trial ended, and since when (-1: never)
        ("settled", pa.bool_()), ("settle_epoch", pa.int64()), ("units_undecided", pa.int64()),
        ("end_reason", pa.string()),  # why training stopped: budget, settled at epoch N, diverged, ...
        ("pack_id", pa.string()),  # the packed trial that trained it (vae/training/pack.py); its own id when alone
        ("pack_slots", pa.int64()),  # the slots of that pack (1: alone)
        ("pack_offset", pa.int64()),  # the pack's step when it took its slot (0 unless a refilled slot's)
        ("pack_slot_steps", pa.int64()),  # slots x steps that pack had trained when this row was written
    ]),
    # test-set encoder means (latest epoch) with labels, for latent-space plots
    "latents": pa.schema(KEY + [("epoch", pa.int64()), ("index", pa.int64()), ("label", pa.int64()),
                                ("mu", pa.list_(pa.float32()))]),
    # pixel arrays (MNIST) or 2-D points (gaussian2d); kind says which figure they feed
    "images": pa.schema(KEY + [("epoch", pa.int64()),
                               ("kind", pa.string()),  # see IMAGE_KINDS
                               ("index", pa.int64()), ("pair", pa.int64()),  # pair: interpolation path, else -1
                               ("values", pa.list_(pa.float32()))]),
    # one row per cell of a sweep (the cell axes of vae.axes, then beta), over repeats
    "collapse_map": pa.schema([(a.key, _ARROW[a.kind]) for a in AXES if a.cell] + [
        ("beta", pa.float64()),
        ("n_trials", pa.int64()), ("units_in_use_mean", pa.float64()), ("units_in_use_min", pa.float64()),
        ("units_in_use_max", pa.float64()), ("fraction_in_use", pa.float64()), ("total_kl", pa.float64()),
        ("mutual_info", pa.float64()), ("test_loss", pa.float64()), ("iw_nll", pa.float64()),
        ("frac_collapsed", pa.float64()), ("frac_partial", pa.float64()), ("frac_diverged", pa.float64()),
        ("status", pa.string()),  # the cell's majority class
        # per cell: where the fraction in use first falls below 1/2
        ("critical_beta", pa.float64()), ("critical_beta_lower", pa.float64()),
        ("critical_beta_upper", pa.float64()), ("monotone", pa.bool_()),
        ("active_threshold", pa.float64()), ("kl_threshold", pa.float64()),  # what "in use" meant here
        ("frac_settled", pa.float64()),  # share of the cell's trials whose collapse state had settled
        ("units_in_use_std", pa.float64()),  # spread over seeds (repeats)
        ("units_undecided_mean", pa.float64()),
        # the linear VAE with a fixed decoder variance: units theory keeps (eigenvalues > beta * sigma^2,
        # Lucas et al. 2019), and whether an eigenvalue lies too close to beta * sigma^2 to judge
        ("theory_units", pa.float64()), ("theory_close", pa.bool_()),
    ]),
    # the training split's covariance eigenvalues, largest first (the linear VAE's theory reads them)
    "spectrum": pa.schema([("dataset", pa.string()), ("subset", pa.int64()), ("index", pa.int64()),
                           ("eigenvalue", pa.float64())]),
}
IMAGE_KINDS = ("original", "reconstruction", "prior_sample", "interpolation", "manifold",  # images
               "generated", "generated_noisy")  # 2-D toy points (original: the true test points)
SAFE_KEY = re.compile(r"[^A-Za-z0-9._-]")


class StorageError(RuntimeError):
    """Results could not be written; the message names the path."""


class DamagedTable(StorageError):
    """A table file that cannot be read; the message names it."""


def filesystem(root: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and path for a local path or a URI (s3://, gs://, ...)."""
    if "://" in root:
        return pafs.FileSystem.from_uri(root)
    return pafs.LocalFileSystem(), os.path.abspath(root)


def run_root(storage: str, name: str) -> str:
    return storage.rstrip("/") + "/" + name


def config_row(config: Any) -> dict[str, Any]:
    values = config if isinstance(config, Mapping) else config.to_dict()
    return {k: values[k] for k in CONFIG_COLUMNS}


NAN = float("nan")


def epoch_row(config: Any, trial_id: str, epoch: int, kl_weight: float, train: Mapping[str, float] | None,
              test: Mapping[str, float] | None, active_units: int = 0, units_in_use: int = 0,
              mutual_info: float = NAN, seconds: float = 0.0, kernels: str = "", lr_now: float = NAN,
              units_undecided: int = 0, settled: bool = False, test_examples: int = 0) -> dict[str, Any]:
    """A row of `epochs/`: train is {loss, recon, kl, samples} (None at epoch 0), test {loss, recon, kl}
    (None when the epoch diverged)."""
    train, test = train or {}, test or {}
    return {"trial_id": trial_id, "epoch": epoch, **config_row(config), "kl_weight": kl_weight,
            "train_loss": train.get("loss", NAN), "train_recon": train.get("recon", NAN),
            "train_kl": train.get("kl", NAN), "test_loss": test.get("loss", NAN),
            "test_recon": test.get("recon", NAN), "test_kl": test.get("kl", NAN), "active_units": active_units,
            "units_in_use": units_in_use, "mutual_info": mutual_info, "epoch_seconds": seconds,
            "samples_per_second": train["samples"] / seconds if train and seconds > 0 else NAN,
            "kernels": kernels, "lr_now": lr_now, "units_undecided": units_undecided, "settled": settled,
            "test_examples": test_examples}


def kl_rows(trial_id: str, epoch: int, kl: Iterable[float], activity: Iterable[float]) -> list[dict[str, Any]]:
    """The rows of `kl_per_dim/` for one epoch."""
    return [{"trial_id": trial_id, "epoch": epoch, "dim": j, "kl": float(k), "activity": float(a)}
            for j, (k, a) in enumerate(zip(kl, activity))]


def trial_row(config: Any, trial_id: str, status: str, error: str, epochs_done: int,
              final: Mapping[str, Any], wall_seconds: float, pack_id: str = "", pack_slots: int = 1,
              pack_offset: int = 0, pack_slot_steps: int = 0) -> dict[str, Any]:
    """The row of `trials/`: where the trial stopped and its final metrics (NaN / 0 where it has none)."""
    row = {"trial_id": trial_id, **config_row(config), "status": status, "error": error, "pack_id": pack_id or trial_id,
           "pack_slots": int(pack_slots), "pack_offset": int(pack_offset), "pack_slot_steps": int(pack_slot_steps),
           "epochs_done": int(epochs_done), "wall_seconds": float(wall_seconds),
           "settled": bool(final.get("settled", False)), "settle_epoch": int(final.get("settle_epoch", -1)),
           "units_undecided": int(final.get("units_undecided", 0)), "end_reason": str(final.get("end_reason", ""))}
    for k in ("train_loss", "test_loss", "test_recon", "test_kl", "mutual_info", "iw_nll", "iw_seconds"):
        row[k] = float(final.get(k, NAN))
    for k in ("active_units", "units_in_use"):
        row[k] = int(final.get(k, 0))
    return row


def pack_utilisation(trials: pd.DataFrame) -> pd.DataFrame:
    """How full each pack ran, from `trials/` rows: per pack_id its slots, the steps it ran (the latest
    `pack_offset + epochs_done` of its members), the member-epochs trained, the slot-steps it trained (the
    latest `pack_slot_steps` of its members: fewer than slots x steps once it gave up ended slots; slots x steps
    where its rows do not say), and the slot utilisation member-epochs / slot-steps. A trial alone is a pack of
    one slot, always full while it ran."""
    cols = ["pack_id", "slots", "steps", "member_epochs", "slot_steps", "utilisation"]
    if trials.empty:
        return pd.DataFrame(columns=cols)
    t = trials.assign(pack_slots=trials.pack_slots.fillna(1).clip(lower=1).astype(int),
                      pack_offset=trials.pack_offset.fillna(0).astype(int),
                      pack_slot_steps=trials.pack_slot_steps.fillna(0).astype(int))
    out = t.assign(end=t.pack_offset + t.epochs_done).groupby("pack_id").agg(
        slots=("pack_slots", "max"), steps=("end", "max"), member_epochs=("epochs_done", "sum"),
        recorded=("pack_slot_steps", "max")).reset_index()
    out["slot_steps"] = out.recorded.where(out.recorded > 0, out.slots * out.steps)
    return out.assign(utilisation=out.member_epochs / out.slot_steps.clip(lower=1))[cols]


def slot_utilisation(packs: pd.DataFrame) -> float:
    """All packs' member-epochs over their slot-steps (`pack_utilisation`'s rows): how full the sweep's packs ran."""
    return float(packs.member_epochs.sum() / max(1, packs.slot_steps.sum()))


def file_key(trial_id: str, epoch: int | None = None) -> str:
    key = SAFE_KEY.sub("_", trial_id)
    return f"{key}.e{epoch:05d}.parquet" if epoch is not None else f"{key}.parquet"


class Results:
    """Writer and reader of one run's tables (`<storage>/<name>/<table>/`)."""

    def __init__(self, root: str):
        self.root = root.rstrip("/")
        self.fs, self.path = filesystem(self.root)

    # ---------------------------------------------------------------- write
    def write(self, table: str, rows: Iterable[Mapping[str, Any]] | pd.DataFrame, key: str) -> str:
        """Write rows as `<table>/<key>` atomically (temp file + rename), replacing any old file."""
        schema = SCHEMAS[table]
        frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows), columns=schema.names)
        missing = [c for c in schema.names if c not in frame.columns]
        if missing:
            raise ValueError(f"{table}: rows lack columns {missing}")
        data = pa.Table.from_pandas(frame[schema.names], schema=schema, preserve_index=False)
        folder = f"{self.path}/{table}"
        final = f"{folder}/{key}"
        tmp = f"{folder}/.tmp-{uuid.uuid4().hex}-{key}"
        try:
            self.fs.create_dir(folder, recursive=True)
            with self.fs.open_output_stream(tmp) as out:
                pq.write_table(data, out, compression="zstd")
            self.fs.move(tmp, final)
        except OSError as e:
            try:
                self.fs.delete_file(tmp)
            except OSError:
                pass
            raise StorageError(f"cannot write results to {final}: {e}") from None
        return final

    def write_json(self, name: str, payload: Mapping[str, Any]) -> None:
        self.write_text(name, json.dumps(payload, indent=2, default=str))

    def update_json(self, name: str, **fields: Any) -> None:
        """Add fields to an existing JSON file beside the tables (nothing when it does not exist)."""
        payload = self.read_json(name)
        if payload is not None:
            self.write_json(name, {**payload, **fields})

    def write_text(self, name: str, text: str) -> None:
        """`<root>/<name>`, written under a temporary name and renamed into place."""
        final = f"{self.path}/{name}"
        tmp = f"{self.path}/.tmp-{uuid.uuid4().hex}-{name}"
        try:
            self.fs.create_dir(self.path, recursive=True)
            with self.fs.open_output_stream(tmp) as out:
                out.write(text.encode())
            self.fs.move(tmp, final)
        except OSError as e:
            raise StorageError(f"cannot write {final}: {e}") from None

    # ---------------------------------------------------------------- a stop request (signals, jobs.train)
    STOP = ".stop"

    def request_stop(self, reason: str) -> None:
        """Ask the run's loop to stop after the epoch in flight (it checks at every epoch's end)."""
        with self.fs.open_output_stream(f"{self.path}/{self.STOP}") as out:
            out.write(reason.encode())

    def stop_requested(self) -> str | None:
        """The reason a stop was requested, or None."""
        path = f"{self.path}/{self.STOP}"
        if self.fs.get_file_info(path).type != pafs.FileType.File:
            return None
        with self.fs.open_input_stream(path) as src:
            return src.read().decode() or "stop requested"

    def clear_stop(self) -> None:
        try:
            self.fs.delete_file(f"{self.path}/{self.STOP}")
        except (OSError, FileNotFoundError):
            pass

    # ---------------------------------------------------------------- read
    def exists(self) -> bool:
        return self.fs.get_file_info(self.path).type != pafs.FileType.NotFound

    def files(self, table: str) -> list[str]:
        """The table's files: `*.parquet`, not hidden (temporary files and moved-aside `.damaged` ones are not)."""
        folder = f"{self.path}/{table}"
        if self.fs.get_file_info(folder).type != pafs.FileType.Directory:
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(folder))
        return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(".parquet")
                      and not i.base_name.startswith((".", "_")))

    def read(self, table: str, filter: ds.Expression | None = None,
             files: list[str] | None = None) -> pd.DataFrame:
        """The whole table (or only its `files`, paths from `files(table)`) as a DataFrame with the contract's
        columns (empty if absent).

        A file that cannot be read raises `DamagedTable` naming it (`set_aside_damaged` moves it away)."""
        schema = SCHEMAS[table]
        files = self.files(table) if files is None else files
        if not files:
            return schema.empty_table().to_pandas()
        try:
            dataset = ds.dataset(files, schema=schema, format="parquet", filesystem=self.fs)
            return dataset.to_table(filter=filter).to_pandas()
        except (pa.ArrowInvalid, OSError) as e:
            bad = self.damaged_files(table) or files
            raise DamagedTable(f"cannot read {bad[0]}: {str(e).splitlines()[0][:200]} (a resume moves it aside "
                               "as <file>.damaged)") from None

    def damaged_files(self, table: str) -> list[str]:
        """The table's files whose Parquet footer cannot be read."""
        bad = []
        for path in self.files(table):
            try:
                with self.fs.open_input_file(path) as src:
                    pq.read_metadata(src)
            except (pa.ArrowInvalid, OSError):
                bad.append(path)
        return bad

    def set_aside_damaged(self) -> list[str]:
        """Move every unreadable table file to `<file>.damaged` (kept for inspection, no longer read);
        returns the files moved."""
        moved = []
        for table in SCHEMAS:
            for path in self.damaged_files(table):
                self.fs.move(path, path + ".damaged")
                moved.append(path)
        return moved

    def read_json(self, name: str) -> dict[str, Any] | None:
        path = f"{self.path}/{name}"
        if self.fs.get_file_info(path).type != pafs.FileType.File:
            return None
        with self.fs.open_input_stream(path) as src:
            return json.loads(src.read().decode())
