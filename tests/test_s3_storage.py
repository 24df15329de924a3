"""--storage s3://...: tables and Ray Train checkpoints on a real S3-compatible server (moto) on 127.0.0.1, and the
signals that stop a run: both end to end in one pair of runs."""

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


def test_a_signal_stops_a_run_in_s3_after_a_whole_epoch_and_the_printed_command_resumes_it_from_there(
        s3_env, monkeypatch):
    """Tables and Ray Train checkpoints in S3. SIGTERM (a scheduler's stop) ends the run after a whole epoch,
    its trial marked and the command to resume it printed; that command continues from the next epoch out of
    S3 (the epochs done are not written again, as a restart would), and Ctrl-C (SIGINT) stops it the same way:
    both signals and the storage end to end in two runs."""
    for k, v in s3_env.items():  # for pyarrow's S3 client in this process, undone after the test
        if k.startswith("AWS_"):
            monkeypatch.setenv(k, v)
    from vae.tables.results import Results

    cmd = [sys.executable, "-m", "jobs.train", "--dataset", "gaussian2d", "--model", "linear", "--decoder-var", "1",
           "--iw-samples", "0", "--lr", "0.01", "--epochs", "400", "--storage", "s3://vae/runs", "--name", "sig"]

    def start() -> subprocess.Popen:
        return subprocess.Popen(cmd, cwd=ROOT, env=s3_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)

    res = Results("s3://vae/runs/sig")
    first = start()
    _wait_for_rows(res, 4)
    _, last = _stopped_by(first, signal.SIGTERM, 143, res)
    done = _epoch_files(res)
    assert len(done) == last + 1
    again = start()
    _wait_for_rows(res, last + 3)  # two epochs past the interrupted one
    out, stop = _stopped_by(again, signal.SIGINT, 130, res)
    assert f"epochs up to {last} are done" in out
    trained = [int(line.split()[1].split("/")[0]) for line in out.splitlines() if line.startswith("epoch ")]
    assert trained == list(range(last + 1, stop + 1)) and stop >= last + 2  # only what was left, from the next
    files = _epoch_files(res)
    assert {name: files[name] for name in done} == done  # continued from S3, not trained from the start
