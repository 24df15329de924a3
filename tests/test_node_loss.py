"""A node lost mid-run, on a multi-node Ray cluster simulated on this one machine (`ray.cluster_utils.Cluster`:
one raylet per node, each with its own CPUs; the head has none, so every worker and trial runs on a node we can
stop). The jobs attach to it through RAY_ADDRESS, as on a real cluster."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import time

import pyarrow.fs as pafs
import pytest

from tests.conftest import ROOT, free_port
from vae.tables.results import Results
from vae.training.faults import FAULT_HOLD_ENV, FAULT_MARKER_ENV, SNAPSHOT, checkpoint_registered

pytestmark = pytest.mark.slow

@pytest.fixture
def cluster(monkeypatch):
    """Its processes ask its own state API (Ray Train's placement-group cleaner runs on the head and asks whether
    the run's controller lives): left to themselves they would ask the latest other Ray instance on the machine
    (a concurrent test's), which knows none of our actors, and the cleaner would take that for a dead
    controller (docs/failures.md). The raylets, and so every worker, inherit this process's environment."""
    from ray.cluster_utils import Cluster

    port = free_port()
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", f"http://127.0.0.1:{port}")
    c = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 0, "dashboard_port": port})
    yield c
    c.shutdown()


def _env(cluster) -> dict[str, str]:
    return {**os.environ, "RAY_ADDRESS": cluster.address, "OMP_NUM_THREADS": "1"}


def _hold(monkeypatch, tmp_path, steps: str = "2") -> str:
    """Every worker started from now on waits half-way through each of `steps` (after the step before's
    checkpoint) until the test releases it (vae/training/faults.py), so a node stops mid-step however fast the
    machine. Set before the nodes start: their raylets, and so the workers, inherit this process's environment."""
    hold = str(tmp_path / "hold")
    monkeypatch.setenv(FAULT_HOLD_ENV, steps)
    monkeypatch.setenv(FAULT_MARKER_ENV, hold)
    return hold


def _held(hold: str, workers: int, run: str | None = None, step: int = 2) -> None:
    """`workers` workers hold in `step`; with `run` (a Ray Train run's folder), also Train's controller has
    registered the step before's checkpoint (it polls its workers for their reports: a checkpoint reported is not
    yet one a restart would use)."""
    _wait_for(lambda: len(glob.glob(f"{hold}.held-{step}-*")) >= workers)
    if run:
        _wait_for(lambda: checkpoint_registered(pafs.LocalFileSystem(), f"{run}/{SNAPSHOT}", step - 1))


def _release(hold: str, step: int = 2) -> None:
    open(f"{hold}.release-{step}", "w").close()


def _wait_for(condition, timeout: float = 240.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.2)


def _nodes_of(cluster, actor_class: str) -> list[str]:
    """The nodes of the live actors of `actor_class`, from the head's state API over HTTP (no driver to start)."""
    from ray.util.state import list_actors

    actors = list_actors(address=f"http://{cluster.webui_url}", filters=[("state", "=", "ALIVE")],
                         raise_on_missing_output=False)
    return sorted({a.node_id for a in actors if a.class_name == actor_class})


def _stop(cluster, node) -> None:
    """Stop `node`'s Ray and wait until the head has marked it dead: a restart that Ray Train starts before then
    can still place a worker there (seen under load: one more failure, and two more workers to start, for one
    loss)."""
    from ray.util.state import list_nodes

    cluster.remove_node(node)
    _wait_for(lambda: [n.state for n in list_nodes(address=f"http://{cluster.webui_url}",
                                                    filters=[("node_id", "=", node.node_id)],
                                                    raise_on_missing_output=False)] == ["DEAD"])


def _train(tmp_path, data_dir, name: str, **flags: str) -> list[str]:
    args = {"dataset": "mnist", "data-dir": data_dir, "subset": "3000", "epochs": "5", "latent-dim": "4",
            "hidden-dim": "64", "num-workers": "2", "cpus-per-worker": "1", "iw-samples": "0",
            "storage": str(tmp_path), "name": name, **flags}
    return [sys.executable, "-m", "jobs.train"] + [x for k, v in args.items() for x in (f"--{k}", v)]


def _epochs(root: str):
    return Results(root).read("epochs")


def test_a_training_job_continues_on_the_nodes_left_then_ends_saying_so_when_none_can_hold_it_and_resumes(
        cluster, tmp_path, data_dir, monkeypatch):
    """Three one-CPU nodes, two workers. Mid-epoch 2 the node of one worker stops: Ray Train restarts the workers
    from epoch 1's checkpoint on the two nodes left, within --max-failures. Mid-epoch 4 the node of another stops
    and nothing replaces it: one CPU is left for two workers, so the job waits --node-wait seconds and ends with
    exit 1 naming the nodes and how to resume; a rerun once a node is back trains only the epochs not done."""
    hold = _hold(monkeypatch, tmp_path, "2,4")
    nodes = {n.node_id: n for n in (cluster.add_node(num_cpus=1) for _ in range(3))}
    root = f"{tmp_path}/lost"
    # --max-failures 4: room for a second failure for one loss, which a restart that Train starts before the GCS
    # has marked the node dead can cause (a user's cluster has no `_stop` to wait for that)
    cmd = _train(tmp_path, data_dir, "lost", **{"max-failures": "4", "node-wait": "5"})
    job = subprocess.Popen(cmd, cwd=ROOT, env=_env(cluster), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
    _held(hold, 2, root, step=2)  # both workers half-way through epoch 2, epoch 1's checkpoint registered
    done = glob.glob(f"{root}/epochs/*.e0000[01].parquet")
    before = {p: os.stat(p).st_mtime_ns for p in done}
    busy = _nodes_of(cluster, "RayTrainWorker")
    assert len(busy) == 2, busy
    _stop(cluster, nodes.pop(busy[-1]))
    _release(hold, step=2)
    _held(hold, 2, root, step=4)  # the restarted workers half-way through epoch 4, epoch 3's checkpoint registered
    assert len(done) == 2 and {p: os.stat(p).st_mtime_ns for p in done} == before  # restarted from epoch 1's
    busy = _nodes_of(cluster, "RayTrainWorker")
    assert len(busy) == 2 and set(busy) <= set(nodes), busy  # on the two nodes left
    _stop(cluster, nodes.pop(busy[-1]))
    _release(hold, step=4)
    out, _ = job.communicate(timeout=300)
    lines = out.strip().splitlines()
    assert job.returncode == 1, out[-3000:]
    lost = [line for line in lines if line.startswith("jobs.train: lost node ") and "during epoch" in line]
    assert [int(line.split("during epoch ")[1].split(":")[0]) for line in lost] == [2, 4], out[-3000:]
    assert lines[-1].startswith("jobs.train: lost node "), lines[-1]
    assert "none came back in 5s (--node-wait)" in lines[-1] and "resume with the same command" in lines[-1]
    done = int(_epochs(root).epoch.max())
    assert done == 3
    first = glob.glob(f"{root}/epochs/*.e00000.parquet")
    before = {p: os.stat(p).st_mtime_ns for p in first}
    cluster.add_node(num_cpus=1)  # the capacity is back
    again = subprocess.run(cmd, cwd=ROOT, env=_env(cluster), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"resuming lost: epochs up to {done} are done" in again.stdout
    assert first and {p: os.stat(p).st_mtime_ns for p in first} == before  # continued, not trained from the start
    epochs = _epochs(root)
    assert sorted(epochs.epoch) == list(range(6)) and set(epochs.num_workers) == {2}  # no epoch lost or doubled
    assert Results(root).read("trials").status.tolist() == ["finished"]


def test_a_sweep_that_loses_a_node_retries_its_trials_there_from_their_checkpoints(cluster, tmp_path, monkeypatch):
    """A packed sweep spread over two nodes (one trial on each); one node stops mid-trial: its trial is retried
    from its checkpoint on the node left, and every configuration ends with each epoch once."""
    hold = _hold(monkeypatch, tmp_path)
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    root = f"{tmp_path}/sw"
    args = [sys.executable, "-m", "jobs.sweep", "--dataset", "gaussian2d", "--model", "gaussian-mlp",
            "--latent-dims", "2", "--lrs", "1e-3,3e-3", "--betas", "0.5,1,2", "--epochs", "5", "--subset", "20000",
            "--iw-samples", "0", "--pack", "3", "--cpus-per-trial", "1", "--max-failures", "2",
            "--storage", str(tmp_path), "--name", "sw"]
    job = subprocess.Popen(args, cwd=ROOT, env=_env(cluster), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
    _held(hold, 2)  # both packs half-way through step 2, past their step-1 checkpoints
    started = {p: os.stat(p).st_mtime_ns for p in glob.glob(f"{root}/epochs/*.e00000.parquet")}
    busy = _nodes_of(cluster, "ImplicitFunc")
    assert len(busy) == 2, busy
    _stop(cluster, next(n for n in nodes if n.node_id == busy[-1]))
    _release(hold)
    out, _ = job.communicate(timeout=600)
    assert job.returncode == 0, out[-3000:]
    trials = Results(root).read("trials")
    assert len(trials) == 6 and set(trials.status) == {"finished"}
    epochs = Results(root).read("epochs")
    assert len(epochs) == 6 * 6 and not epochs.duplicated(["trial_id", "epoch"]).any()
    assert {p: os.stat(p).st_mtime_ns for p in started} == started  # the retried pack resumed, not restarted
