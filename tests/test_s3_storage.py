"""--storage s3://...: tables and Ray Train checkpoints on a real S3-compatible server (moto) on 127.0.0.1, and what
stops a run there (a lost worker with no restarts, SIGTERM, SIGINT): all end to end in three runs of one command."""

import io
import os
import signal
import socket
import subprocess
import sys
import time

import pyarrow.fs as pafs
import pytest

from tests.conftest import ROOT
from vae.training.faults import FAULT_EPOCH_ENV, FAULT_MARKER_ENV

pytestmark = pytest.mark.slow  # end to end through Ray: the full suite, not -m "not slow"


@pytest.fixture(scope="module")
def s3_env():
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    env.pop("RAY_ADDRESS", None)
    import boto3

    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="test",
                 aws_secret_access_key="test", region_name="us-east-1").create_bucket(Bucket="vae")
    yield env
    server.stop()


def _wait_for_rows(res, n: int) -> None:
    """Until the run has written `n` epoch files: one listing a poll (reading them all each time costs the moto
    server in this process a request per file)."""
    deadline = time.time() + 120
    while time.time() < deadline and len(_epoch_files(res)) < n:
        time.sleep(0.3)


def _epoch_files(res) -> dict:
    """When each epoch file was last written, by name."""
    return {i.base_name: i.mtime for i in res.fs.get_file_info(pafs.FileSelector(f"{res.path}/epochs",
                                                                                  allow_not_found=True))}


def _untouched(res, done: dict) -> bool:
    """Whether the epoch files in `done` (`_epoch_files` earlier) are still as they were: not written again."""
    return {name: mtime for name, mtime in _epoch_files(res).items() if name in done} == done


def _stopped_by(proc: subprocess.Popen, sig: int, code: int, res) -> tuple[str, int]:
    """Send `sig`; the job must end with `code` after a whole epoch, its trial marked, the tables and the
    checkpoint in S3 agreeing, and the resume command printed. (Its stdout, the last epoch.)"""
    import torch

    proc.send_signal(sig)
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == code, err[-2000:]
    assert "resume with: python -m jobs.train" in err and "interrupted" in err
    assert "*** SIGTERM" not in err and "Stack trace" not in err and "Traceback" not in err
    trial = res.read("trials").iloc[0]
    last = int(res.read("epochs").epoch.max())
    assert trial.status == "interrupted" and trial.epochs_done == last
    checkpoints = [i.path for i in res.fs.get_file_info(pafs.FileSelector(res.path))
                   if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_")]  # beside the tables
    saved = []
    for folder in checkpoints:
        with res.fs.open_input_file(f"{folder}/state.pt") as src:
            saved.append(int(torch.load(io.BytesIO(src.read()), weights_only=True)["epoch"]))
    assert max(saved) == last  # the tables and the checkpoint agree
    for name in (".lock", ".stop"):
        assert res.fs.get_file_info(f"{res.path}/{name}").type == pafs.FileType.NotFound, name
    assert sorted(res.read("epochs").epoch) == list(range(last + 1))  # each epoch once
    return out, last


def _resumed(out: str, after: int, stop: int) -> None:
    """A resumed run's stdout: it said where it resumed and trained only the epochs after `after`, up to `stop`."""
    assert f"epochs up to {after} are done" in out, out[-2000:]
    trained = [int(line.split()[1].split("/")[0]) for line in out.splitlines() if line.startswith("epoch ")]
    assert trained == list(range(after + 1, stop + 1)) and stop >= after + 2  # only what was left, from the next


def test_a_run_in_s3_that_fails_or_is_stopped_by_a_signal_resumes_from_there_with_the_same_command(
        s3_env, tmp_path, monkeypatch):
    """Tables and Ray Train checkpoints in S3, one command run three times. The first loses its worker in epoch
    2 with no restarts allowed: exit 1 and one line. Each rerun continues from the checkpoint in S3 (the epochs
    done are not written again, as a restart would) and is stopped by a signal: SIGTERM (a scheduler's stop),
    then Ctrl-C (SIGINT), each after a whole epoch, its trial marked and the command to resume it printed.
    (Storage, failure and both signals end to end in three runs.)"""
    for k, v in s3_env.items():  # for pyarrow's S3 client in this process, undone after the test
        if k.startswith("AWS_"):
            monkeypatch.setenv(k, v)
    from vae.tables.results import Results

    cmd = [sys.executable, "-m", "jobs.train", "--dataset", "gaussian2d", "--model", "linear", "--decoder-var", "1",
           "--iw-samples", "0", "--lr", "0.01", "--epochs", "400", "--max-failures", "0", "--storage", "s3://vae/runs",
           "--name", "s3run"]
    env = {**s3_env, FAULT_EPOCH_ENV: "2", FAULT_MARKER_ENV: str(tmp_path / "killed")}  # the first run only

    def start() -> subprocess.Popen:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)

    res = Results("s3://vae/runs/s3run")
    first = start()
    out, err = first.communicate(timeout=300)
    assert first.returncode == 1 and (tmp_path / "killed").exists(), out[-2000:] + err[-2000:]
    last_line = err.strip().splitlines()[-1]
    assert last_line.startswith("jobs.train: failed: ") and "results so far in s3://vae/runs/s3run" in last_line
    assert "Traceback" not in err
    done = _epoch_files(res)
    assert len(done) == 2  # epochs 0 and 1: the worker died in epoch 2
    second = start()
    _wait_for_rows(res, 4)
    out, last = _stopped_by(second, signal.SIGTERM, 143, res)
    _resumed(out, 1, last)
    assert _untouched(res, done)  # from S3's checkpoint
    done = _epoch_files(res)
    third = start()
    _wait_for_rows(res, last + 3)  # two epochs past the interrupted one
    out, stop = _stopped_by(third, signal.SIGINT, 130, res)
    _resumed(out, last, stop)
    assert _untouched(res, done)


def test_a_sweeps_saved_state_naming_a_deleted_checkpoint_in_s3_gets_the_newest_copied_there(
        s3_env, linear_sweep, monkeypatch):
    """What `--resume` mends before Tune restores (tune/sweep.py; end to end on local storage in
    tests/test_sweep.py), on an object store, which renames no folder: a finished sweep copied into S3, the
    checkpoint its saved state names for a trial deleted, as Tune's own deletion can leave it."""
    for k, v in s3_env.items():
        if k.startswith("AWS_"):
            monkeypatch.setenv(k, v)
    from tune.sweep import checkpoints_named_by_saved_state, stand_in_for_deleted_checkpoints
    from vae.tables.results import Results

    root = "s3://vae/sweeps/linear"
    fs = Results(root).fs
    pafs.copy_files(linear_sweep, "vae/sweeps/linear", source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)
    here = {os.path.relpath(f, linear_sweep): os.path.relpath(n, linear_sweep)
            for f, n in checkpoints_named_by_saved_state(linear_sweep).items()}
    named = checkpoints_named_by_saved_state(root)
    assert {os.path.relpath(f, "vae/sweeps/linear"): os.path.relpath(n, "vae/sweeps/linear")
            for f, n in named.items()} == here and len(here) == 3
    folder, gone = sorted(named.items())[0]
    kept = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(folder))
                  if i.base_name.startswith("checkpoint_") and i.path != gone)
    assert kept
    fs.delete_dir(gone)
    assert stand_in_for_deleted_checkpoints(root) == [(gone, kept[-1])]

    def read(path: str) -> bytes:
        with fs.open_input_stream(f"{path}/state.pt") as src:
            return src.read()

    assert read(gone) == read(kept[-1])
    assert stand_in_for_deleted_checkpoints(root) == []  # nothing named is missing now
