"""The real cluster path: a Ray head started here, jobs sent with `ray job submit`, tables read back.

The test ends the head process it started (never `ray stop`, which would kill every Ray on the machine).
"""

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from tests.conftest import DATA_DIR, ROOT, free_port
from vae.tables.results import Results

# end to end through Ray: the full suite, not -m "not slow"; one pytest-xdist worker runs both on one head
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray-head")]

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def head():
    ports = {k: free_port() for k in ("gcs", "dash", "agent", "agent_grpc", "metrics", "client", "rt_env")}
    temp = tempfile.mkdtemp(prefix="rh-", dir="/tmp")  # short: Ray's socket paths have a length limit
    # Ray 2.60 clusters use token auth: a token of our own for this head and its job CLI (not ~/.ray's).
    token = Path(temp) / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN_PATH": str(token)}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_TOKEN", None)
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={ports['gcs']}", "--num-cpus=2",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={ports['dash']}",
         f"--dashboard-agent-listen-port={ports['agent']}", f"--dashboard-agent-grpc-port={ports['agent_grpc']}",
         f"--metrics-export-port={ports['metrics']}", f"--ray-client-server-port={ports['client']}",
         f"--runtime-env-agent-port={ports['rt_env']}", f"--temp-dir={temp}", "--disable-usage-stats"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{ports['dash']}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            break
        except urllib.error.HTTPError:  # it answers (401 under token auth: the job CLI sends the token)
            break
        except OSError:
            time.sleep(1)
    else:
        proc.terminate()
        pytest.fail("the Ray head's job server did not come up")
    yield address, env
    # The head we started, and only it, at once (its graceful stop takes about 33 s, idle or not, and nothing of it
    # is kept): every process of the session it leads (workers take process groups of their own), and any that
    # left the session, found by its temp folder.
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    for p in psutil.process_iter(["cmdline"]):
        try:
            if os.getsid(p.pid) == proc.pid or any(temp in arg for arg in p.info["cmdline"] or ()):
                p.kill()
        except (OSError, psutil.Error):  # gone already
            pass
    shutil.rmtree(temp, ignore_errors=True)  # the head's temp folder (outside tmp_path: socket paths are short)


def submit(address: str, env: dict, *args: str) -> tuple[str, str]:
    runtime_env = json.dumps({"env_vars": {"OMP_NUM_THREADS": "1", "VAE_DATA_DIR": DATA_DIR}})
    proc = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", ".",
                           "--runtime-env-json", runtime_env, "--", "python", "-m", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return proc.stdout + proc.stderr, ("SUCCEEDED" if "succeeded" in (proc.stdout + proc.stderr).lower()
                                       and proc.returncode == 0 else "FAILED")


def test_submitted_training_and_sweep_jobs_succeed_and_write_tables(head, tmp_path, data_dir):
    address, env = head
    out, status = submit(address, env, "jobs.train", "--dataset", "mnist", "--subset", "512", "--epochs", "2",
                         "--latent-dim", "4", "--hidden-dim", "32", "--iw-samples", "5",
                         "--storage", str(tmp_path), "--name", "submitted")
    assert status == "SUCCEEDED", out[-3000:]
    assert "epoch 2/2" in out and "jobs.train: finished: submitted" in out
    assert sorted(Results(f"{tmp_path}/submitted").read("epochs").epoch) == [0, 1, 2]
    out, status = submit(address, env, "jobs.sweep", "--dataset", "gaussian2d", "--model", "linear",
                         "--decoder-var", "1", "--latent-dims", "2", "--lrs", "1e-2", "--betas", "0.3,3",
                         "--epochs", "2", "--iw-samples", "5", "--storage", str(tmp_path), "--name", "swept")
    assert status == "SUCCEEDED", out[-3000:]
    assert len(Results(f"{tmp_path}/swept").read("collapse_map")) == 2


def test_a_job_with_a_bad_argument_fails_with_the_one_line_message(head):
    address, env = head
    out, status = submit(address, env, "jobs.train", "--lr", "-1")
    assert status == "FAILED"
    assert "jobs.train: error: --lr: must be a number in (0, 100] (got -1.0)" in out
