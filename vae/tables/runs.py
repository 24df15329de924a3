"""A run folder's identity and its one writer.

**Identity.** `run.json` says what a folder holds (a `train` run or a `sweep`) and the config that made it.
A rerun under the same name continues it only if every field that defines its results is the same;
changing only the epoch budget extends it. Anything else is refused before Ray starts, naming each
differing field with both values, and nothing is written (`check_identity`).

**One writer.** `RunLock` holds `<root>/.lock`, an owner record (host, pid, start time, command), while a
job runs. A second job that starts the same run is refused with the holder's record. A holder that died
does not block forever: on its own host a lock whose pid is gone is taken over at once; from another host
(or on bucket storage, where the pid cannot be checked) a lock whose heartbeat (the holder rewrites it
every `HEARTBEAT_S`) is older than `STALE_S` is stale. On a local path the holder also keeps an exclusive
`flock` on the file for its whole run: a starter checks and rewrites the record only while it holds that
kernel lock, so of any number of jobs starting at once exactly one proceeds, a dead holder's lock is freed by
the kernel, and a take-over never deletes a file another job may have just written. On bucket storage
pyarrow.fs has no create-if-absent, so the lock is written and read back, which narrows but does not close the
window in which two starts at the same instant could both proceed. A run folder that cannot be created or
written (a read-only mount, a parent that is a file) is refused in one line naming it, before Ray starts.
"""

from __future__ import annotations

import fcntl
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
PLUMBING = ("storage", "name", "data_dir", "num_workers", "use_gpu", "cpus_per_worker", "max_failures", "node_wait",
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
        self._fd: int | None = None  # a local lock's file, flock-ed while the job runs

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
        if self._fd is not None:  # the local lock's heartbeat: the same file, rewritten (its mtime is the beat)
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, payload, 0)
            return True
        self.res.fs.create_dir(self.res.path, recursive=True)
        with self.res.fs.open_output_stream(self.path) as out:
            out.write(payload)
        return self._read() == self.record  # read back: another writer in the same instant loses here

    def _refuse(self, holder: dict | None) -> RunError:
        who = (f"host {holder.get('host')}, pid {holder.get('pid')}, started {holder.get('started')}" if holder
               else "starting at this moment")
        return RunError(f"--name: {self.res.root} is being written by another job ({who}); wait for it or pick "
                        "another --name")

    def acquire(self) -> None:
        """Take the lock or raise RunError naming its live holder, or the folder that cannot be written."""
        try:
            if self.local:
                self._acquire_local()
            else:
                self._acquire_remote()
        except OSError as e:
            raise RunError(f"--storage: cannot write the run folder {self.res.path}: "
                           f"{e.strerror or type(e).__name__}") from None
        self._beat = threading.Thread(target=self._heartbeat, daemon=True)
        self._beat.start()

    def _acquire_local(self) -> None:
        """Check the record and write ours while holding the file's flock (kept until `release`)."""
        os.makedirs(self.res.path, exist_ok=True)
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self._refuse(self._read()) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # a holder released (unlinked) the file we opened: open the one there now
                os.close(fd)
                continue
            holder = self._read()
            if holder and holder != self.record and not self._stale(holder):  # alive, if without the flock
                os.close(fd)
                raise self._refuse(holder)
            self.took_over = holder or None
            payload = json.dumps(self.record).encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, payload, 0)
            self._fd = fd
            return
        raise RunError(f"--name: could not take the lock {self.path}; try again")

    def _acquire_remote(self) -> None:
        for _ in range(3):
            holder = self._read() if self.res.fs.get_file_info(self.path).type == pafs.FileType.File else None
            if holder is not None and not self._stale(holder):
                raise self._refuse(holder)
            if holder is not None:
                self.took_over = holder
                try:
                    self.res.fs.delete_file(self.path)
                except OSError:
                    pass
            if self._write(exclusive=True):
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
        if self._fd is not None:  # unlink while still holding the flock, then let go
            try:
                os.unlink(self.path)
            except OSError:
                pass
            os.close(self._fd)
            self._fd = None
            return
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
