"""--storage s3://...: tables and Ray Train checkpoints on a real S3-compatible server (moto) on 127.0.0.1."""

import os
import socket
import subprocess
import sys

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


def test_tables_and_checkpoints_live_in_s3_and_a_run_resumes_from_there(s3_env, tmp_path, monkeypatch):
    args = [sys.executable, "-m", "jobs.train", "--dataset", "gaussian2d", "--epochs", "3", "--iw-samples", "5",
            "--storage", "s3://vae/runs", "--name", "s3run", "--max-failures", "0"]
    env = {**s3_env, FAULT_EPOCH_ENV: "2", FAULT_MARKER_ENV: str(tmp_path / "killed")}
    for k, v in s3_env.items():  # for pyarrow's S3 client in this process, undone after the test
        if k.startswith("AWS_"):
            monkeypatch.setenv(k, v)
    import pyarrow.fs as pafs

    from vae.tables.results import Results

    fs, path = pafs.FileSystem.from_uri("s3://vae/runs/s3run")

    def written(step: int) -> dict:  # when each epoch file up to the pack's step `step` was last written
        files = fs.get_file_info(pafs.FileSelector(f"{path}/epochs", recursive=False))
        return {i.base_name: i.mtime for i in files if any(i.base_name.endswith(f".e{e:05d}.parquet")
                                                          for e in range(step + 1))}

    first = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 1 and (tmp_path / "killed").exists(), first.stdout[-2000:] + first.stderr[-2000:]
    done = written(1)
    second = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    assert "epochs up to 1 are done" in second.stdout, second.stdout[-2000:]
    # it continued from epoch 1's checkpoint in S3: epochs 0 and 1 were not written again (a restart rewrites them)
    assert len(done) == 2 and written(1) == done

    res = Results("s3://vae/runs/s3run")
    epochs = res.read("epochs")
    assert sorted(epochs.epoch) == [0, 1, 2, 3]
    assert res.read("trials").status.tolist() == ["finished"]
    names = [i.base_name for i in fs.get_file_info(pafs.FileSelector(path, recursive=False))]
    assert any(n.startswith("checkpoint_") for n in names), names  # Ray Train's checkpoints beside the tables
