"""The loop under Ray Train: two gloo workers, per-rank probes, a killed worker restarted from its checkpoint, a run on
its own instance beside another Ray instance."""

import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import ray.cloudpickle
import ray.train

import tests
from tests.conftest import ROOT

from vae import launch
from vae.config import TrainConfig, resolve
from vae.model.data import shard_indices
from vae.training.faults import FAULT_EPOCH_ENV, FAULT_MARKER_ENV
from vae.training.batches import shard_digest
from vae.training.loop import train_loop
from vae.training.session import LocalSession
from vae.tables.results import Results

pytestmark = pytest.mark.slow  # end to end through Ray: the full suite, not -m "not slow"


class RecordRanks(ray.train.UserCallback):
    """Runs in the Train controller: keeps what every rank reported, one JSON line per report."""

    def __init__(self, path: str):
        self.path = path

    def after_report(self, run_context, metrics, checkpoint):
        with open(self.path, "a") as fh:
            fh.write(json.dumps([{k: m.get(k) for k in ("epoch", "rank", "shard_digest", "param_checksum")}
                                 for m in metrics]) + "\n")


ray.cloudpickle.register_pickle_by_value(tests)  # the callback above reaches Ray's workers by value


def mnist_cfg(tmp_path, data_dir, **kw) -> TrainConfig:
    base = dict(dataset="mnist", data_dir=data_dir, subset=600, epochs=2, batch_size=64, latent_dim=4,
                hidden_dim=64, storage=str(tmp_path), name="ddp", iw_samples=10, iw_subset=50,
                cpus_per_worker=1, use_gpu=False)
    base.update(kw)
    return resolve(TrainConfig(**base))


def test_two_gloo_workers_train_disjoint_shards_in_step(ray_cluster, tmp_path, data_dir):
    cfg = mnist_cfg(tmp_path, data_dir, num_workers=2)
    probe = tmp_path / "ranks.jsonl"
    result = launch.fit(cfg, callbacks=[RecordRanks(str(probe))])
    assert result.error is None
    reports = [json.loads(line) for line in probe.read_text().splitlines()]
    assert [r[0]["epoch"] for r in reports] == [1, 2]
    for epoch, per_rank in enumerate(reports, start=1):
        assert sorted(m["rank"] for m in per_rank) == [0, 1]
        for m in per_rank:  # each rank trained on exactly its DistributedSampler-style shard
            assert m["shard_digest"] == shard_digest(shard_indices(600, m["rank"], 2, epoch, cfg.seed))
        assert per_rank[0]["param_checksum"] == pytest.approx(per_rank[1]["param_checksum"], rel=1e-9)
    assert len({tuple(sorted(shard_indices(600, r, 2, 1, 0).tolist())) for r in (0, 1)}) == 2
    assert set(shard_indices(600, 0, 2, 1, 0).tolist()).isdisjoint(shard_indices(600, 1, 2, 1, 0).tolist())
    res = Results(f"{tmp_path}/ddp")
    epochs = res.read("epochs")
    assert sorted(epochs.epoch) == [0, 1, 2] and set(epochs.num_workers) == {2}
    assert epochs.samples_per_second.iloc[1:].notna().all()
    assert len(res.read("kl_per_dim")) == 3 * 4
    assert res.read("trials").status.tolist() == ["finished"]
    # nor did any run on this local instance start the helpers `launch.trainer_class` leaves out (Ray's actor
    # table, from its GCS: a local instance serves no state API)
    from ray._private.state import state

    started = {a["ActorClassName"] for a in state.actor_table(None).values()}
    assert "TrainController" in started, started
    assert started.isdisjoint({"DatasetManager", "PlacementGroupCleaner", "_AutoscalingCoordinatorActor"}), started


def test_worker_killed_mid_epoch_restarts_from_checkpoint_within_one_run(ray_cluster, tmp_path, data_dir):
    base = mnist_cfg(tmp_path, data_dir, epochs=3, name="clean")
    train_loop(base, LocalSession())  # the clean run: the same loop in this process, on one thread as the worker
    cfg = base.replace(name="killed", max_failures=1)
    marker = tmp_path / "killed"
    probe = tmp_path / "ranks.jsonl"
    result = launch.fit(cfg, env_vars={FAULT_EPOCH_ENV: "2", FAULT_MARKER_ENV: str(marker)},
                        callbacks=[RecordRanks(str(probe))])
    assert marker.exists() and result.error is None
    # the restarted workers took up the epoch-1 checkpoint: epoch 1 was reported once, not trained again
    assert [json.loads(line)[0]["epoch"] for line in probe.read_text().splitlines()] == [1, 2, 3]
    killed = Results(f"{tmp_path}/killed").read("epochs").set_index("epoch").sort_index()
    clean = Results(f"{tmp_path}/clean").read("epochs").set_index("epoch").sort_index()
    assert list(killed.index) == [0, 1, 2, 3]  # every epoch exactly once
    # epoch noise and data order are seeded per epoch, so the restarted run retraces the clean one
    assert killed.test_loss.tolist() == pytest.approx(clean.test_loss.tolist(), rel=1e-4)


def test_a_run_on_its_own_instance_is_not_torn_down_by_another_instance_that_knows_none_of_its_actors(tmp_path):
    """Another Ray instance on the machine (a `ray start`, another job's) is where Ray's state API questions from a
    local instance's processes go, since that instance serves none: here a stand-in for its state API
    (`RAY_API_SERVER_ADDRESS`, what Ray resolves first) answers "not found" for every actor, as that instance
    would, once the run has trained two epochs. Ray Train's placement-group cleaner took that answer for its
    controller's death and removed the live run's placement group ("Destroying worker since its placement group
    was removed"); a run on its own instance goes without the cleaner (`launch.trainer_class`) and finishes."""
    run = Results(str(tmp_path / "beside"))

    class KnowsNoActor(BaseHTTPRequestHandler):
        def do_GET(self):
            deadline = time.monotonic() + 120
            while len(run.files("epochs")) < 3 and time.monotonic() < deadline:  # epoch 0 and two trained
                time.sleep(0.05)
            body = json.dumps({"result": True, "msg": "", "data": {"result": {"result": [], "total": 0}}}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    other = ThreadingHTTPServer(("127.0.0.1", 0), KnowsNoActor)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    env = {**os.environ, "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{other.server_port}"}
    env.pop("RAY_ADDRESS", None)
    try:
        job = subprocess.run([sys.executable, "-m", "jobs.train", "--dataset", "gaussian2d", "--model", "linear",
                              "--decoder-var", "1", "--iw-samples", "0", "--epochs", "20",
                              "--storage", str(tmp_path), "--name", "beside"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    finally:
        other.shutdown()
    assert job.returncode == 0, job.stdout[-1500:] + job.stderr[-1500:]
    assert sorted(run.read("epochs")["epoch"]) == list(range(21))
