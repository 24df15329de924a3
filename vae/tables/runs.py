"""A run folder's identity and its one writer.

**Identity.** `run.json` says what a folder holds (a `train` run or a `sweep`) and the config that made it.
A rerun under the same name continues it only if every field that defines its results is the same;
changing only the epoch budget extends it. Anything else is refused before Ray starts, naming each
differing field with both values, and nothing is written (`check_identity`).

**One writer.** `RunLock` holds `<root>/.lock`, an owner record (host, pid, start time, command), while a
job runs. A second job that starts the same run is refused with the holder's record. A holder that died
does not block forever: on its own host a lock whose pid is gone is taken over at once; from another host
(or on bucket storage, where the pid cannot be checked) a lock whose heartbeat (the holder rewrites it
every `HEARTBEAT_S`) is older than `STALE_S` is stale. On a local path the lock is created atomically
(O_EXCL); on bucket storage pyarrow.fs has no create-if-absent, so the lock is written and read back, which
narrows but does not close the window in which two starts at the same instant could both proceed.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from typing import Any, Mapping, Sequence

import pyarrow.fs as pafs

from vae.tables.results import Results

LOCK = ".lock"
HEARTBEAT_S = 10.0
STALE_S = 60.0
BUDGET_FIELDS = ("epochs", "max_epochs")  # a rerun may change these: it extends the run
# Settings that change where or how fast a run goes, not its results.
PLUMBING = ("storage", "name", "data_dir", "num_workers", "use_gpu", "cpus_per_worker", "max_failures",
            "iw_samples", "iw_subset", "trial_id", "workers_per_trial", "cpus_per_trial", "gpus_per_trial",
            "max_concurrent", "scheduler", "num_samples", "tracker")


class RunError(RuntimeError):
    """A run that may not start as asked; the message is one line for the user."""


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_identity(res: Results, kind: str, config: Mapping[str, Any]) -> list[str]:
    """Refuse (RunError) a start that would mix configs in an existing folder; returns notes to print
    (an extended budget). A folder without run.json is new."""
    info = res.read_json("run.json")
    if info is None:
        if res.exists() and not res.read("trials").empty:
            raise RunError(f"{res.root} holds results but no run.json; pick another --name")
        return []
    if info.get("kind") != kind:
        raise RunError(f"--name: {res.root} holds a {info.get('kind')} run, not a {kind}; pick another --name")
    recorded = info.get("config", {})
    differ = [k for k in config if k not in PLUMBING and k not in BUDGET_FIELDS and k in recorded
              and recorded[k] != config[k]]
    if differ:
        changes = ", ".join(f"--{k.replace('_', '-')} {_show(recorded[k])} -> {_show(config[k])}" for k in differ)
        raise RunError(f"--name: {res.root} was run with other settings ({changes}); rerun with the same "
                       "settings to resume it, or pick another --name")
    notes = []
    for k in BUDGET_FIELDS:
        if k in recorded and k in config and recorded[k] != config[k]:
            notes.append(f"--{k.replace('_', '-')} {recorded[k]} -> {config[k]}")
    return [f"extending {res.root}: " + ", ".join(notes)] if notes else []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """`<root>/.lock` while this process writes the run (see the module docstring)."""

    def __init__(self, root: str, command: Sequence[str] = ()):
        self.res = Results(root)
        self.path = f"{self.res.path}/{LOCK}"
        self.record = {"host": socket.gethostname(), "pid": os.getpid(),
                       "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(command)[:300]}
        self.local = isinstance(self.res.fs, pafs.LocalFileSystem)
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self.took_over: dict | None = None

    def _read(self) -> dict | None:
        try:
            with self.res.fs.open_input_stream(self.path) as src:
                return json.loads(src.read().decode() or "{}")
        except (OSError, ValueError):
            return None

    def _age(self) -> float:
        info = self.res.fs.get_file_info(self.path)
        mtime = info.mtime.timestamp() if info.mtime is not None else 0.0
        return time.time() - mtime

    def _stale(self, holder: dict) -> bool:
        if holder.get("host") == self.record["host"] and isinstance(holder.get("pid"), int):
            return not _alive(holder["pid"]) or holder["pid"] == os.getpid()
        return self._age() > STALE_S

    def _write(self, exclusive: bool) -> bool:
        payload = json.dumps(self.record).encode()
        if self.local:
            os.makedirs(self.res.path, exist_ok=True)
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC), 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as fh:
                fh.write(payload)
            return True
        self.res.fs.create_dir(self.res.path, recursive=True)
        with self.res.fs.open_output_stream(self.path) as out:
            out.write(payload)
        return self._read() == self.record  # read back: another writer in the same instant loses here

    def acquire(self) -> None:
        """Take the lock or raise RunError naming its live holder."""
        for _ in range(3):
            holder = self._read() if self.res.fs.get_file_info(self.path).type == pafs.FileType.File else None
            if holder is not None and not self._stale(holder):
                raise RunError(f"--name: {self.res.root} is being written by another job (host {holder.get('host')}, "
                               f"pid {holder.get('pid')}, started {holder.get('started')}); wait for it or pick "
                               "another --name")
            if holder is not None:
                self.took_over = holder
                try:
                    self.res.fs.delete_file(self.path)
                except OSError:
                    pass
            if self._write(exclusive=True):
                self._beat = threading.Thread(target=self._heartbeat, daemon=True)
                self._beat.start()
                return
        raise RunError(f"--name: could not take the lock {self.path}; try again")

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._write(exclusive=False)
            except OSError:
                pass

    def release(self) -> None:
        self._stop.set()
        if self._read() == self.record:
            try:
                self.res.fs.delete_file(self.path)
            except OSError:
                pass

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
