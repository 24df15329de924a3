"""Nothing mixed, nothing hung: run identity, one writer, impossible requests, damaged tables, YAML (the signals that stop a run: test_s3_storage)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import ROOT, recorded_run
from vae.tables.results import Results

TOY = ["--dataset", "gaussian2d", "--model", "linear", "--decoder-var", "1", "--iw-samples", "0"]


def test_a_rerun_with_other_settings_is_refused_before_ray_naming_each_field(tmp_path, capsys):
    from jobs import train

    before = recorded_run(tmp_path / "X", beta=1.0, lr=1e-3, epochs=3)
    code = train.main([*TOY, "--storage", str(tmp_path), "--name", "X", "--epochs", "5", "--beta", "4",
                       "--lr", "0.01"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "--beta 1.0 -> 4.0" in err and "--lr 0.001 -> 0.01" in err and "--epochs" not in err
    assert Results(str(tmp_path / "X")).read_json("run.json") == before  # not overwritten
    assert not (tmp_path / "X" / ".lock").exists()


def test_changing_only_the_budget_extends_the_run(tmp_path):
    from vae.config import TrainConfig, resolve
    from vae.tables.runs import check_identity

    recorded_run(tmp_path / "X", epochs=3)
    cfg = resolve(TrainConfig(dataset="gaussian2d", model="linear", decoder_var="1", iw_samples=0,
                              storage=str(tmp_path), name="X", epochs=5))
    assert check_identity(Results(str(tmp_path / "X")), "train", cfg.to_dict()) == \
        [f"extending {tmp_path}/X: --epochs 3 -> 5"]


def test_a_train_run_cannot_land_in_a_sweeps_folder(tmp_path, capsys):
    from jobs import train

    recorded_run(tmp_path / "S", kind="sweep")
    assert train.main([*TOY, "--storage", str(tmp_path), "--name", "S"]) == 2
    assert "holds a sweep run, not a train" in capsys.readouterr().err


def test_a_second_writer_is_refused_naming_the_holder_and_a_dead_holder_is_taken_over(tmp_path, capsys):
    from jobs import train
    from vae.tables.runs import RunError, RunLock

    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = tmp_path / "X" / ".lock"
        lock.parent.mkdir()
        lock.write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid, "started": "then"}))
        assert train.main([*TOY, "--storage", str(tmp_path), "--name", "X"]) == 2
        err = capsys.readouterr().err
        assert f"pid {holder.pid}" in err and socket.gethostname() in err and "started then" in err
        with pytest.raises(RunError, match="being written by another job"):
            RunLock(str(tmp_path / "X")).acquire()
    finally:
        holder.kill()
        holder.wait()
    mine = RunLock(str(tmp_path / "X"))
    mine.acquire()  # the holder is gone: stale, taken over
    assert mine.took_over["pid"] == holder.pid
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    mine.release()
    assert not lock.exists()


def test_more_workers_than_a_local_instance_has_fail_at_once(ray_cluster):
    from vae import launch
    from vae.config import TrainConfig
    from vae.tables.runs import RunError

    cfg = launch.settle_scaling(TrainConfig(dataset="gaussian2d", num_workers=3))
    with pytest.raises(RunError, match=r"needs 3 CPUs \(3 worker\(s\) x 1\).*cannot grow"):
        launch.check_resources(cfg)
    with pytest.raises(RunError, match="one trial holds 4 CPUs"):
        launch.check_trial_resources(4, 0)
    launch.check_resources(launch.settle_scaling(TrainConfig(dataset="gaussian2d", num_workers=2)))


def test_a_sweep_whose_trial_a_local_instance_cannot_hold_is_refused_not_left_waiting(ray_cluster, tmp_path, capsys):
    """Two Train workers of a whole CPU each (fractions round up to one) beside the trial's own process: more than
    the shared instance's 2 CPUs. Counted as two half CPUs it was let through, and Train's controller retried
    starting its workers for ever."""
    from jobs import sweep as sweep_job
    from tune.space import SweepConfig

    assert SweepConfig(workers_per_trial=2, cpus_per_trial=0.5).resources_held() == (2.01, 0.0)
    assert SweepConfig(workers_per_trial=1, cpus_per_trial=0.5, gpus_per_trial=0.5).resources_held() == (0.5, 0.5)
    code = sweep_job.main([*TOY, "--latent-dims", "2", "--lrs", "1e-2", "--betas", "1", "--epochs", "2",
                           "--workers-per-trial", "2", "--cpus-per-trial", "0.5", "--storage", str(tmp_path),
                           "--name", "wide"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "one trial holds 2.01 CPUs and 0 GPUs at once but the local Ray instance has 2 CPUs" in err[0]


@pytest.mark.parametrize("address, attaches", [(None, False), ("", False), ("local", False), ("auto", True),
                                               ("10.0.0.5:6379", True)])
def test_without_ray_address_a_job_starts_its_own_instance_never_one_a_ray_start_left(monkeypatch, address, attaches):
    """`ray.init()` alone attaches to the cluster a `ray start` (or a test's `ray.cluster_utils.Cluster`) last
    recorded on this machine; a job would then size and check that cluster as a local instance of its own."""
    import ray

    from vae import launch

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    for key in launch.LOCAL_TRAIN_ENV:
        monkeypatch.delenv(key, raising=False)
    if address is None:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    else:
        monkeypatch.setenv("RAY_ADDRESS", address)
    launch.connect()
    (kwargs,) = calls
    assert launch.attached() is attaches
    assert kwargs.get("address") == (None if attaches else "local")


def test_a_damaged_table_file_is_named_by_every_reader_and_set_aside_by_a_resume(tmp_path, capsys):
    from jobs import report
    from jobs import collapse_map
    from vae.config import TrainConfig
    from vae.training.loop import train_loop
    from vae.training.session import LocalSession

    train_loop(TrainConfig(dataset="gaussian2d", epochs=2, iw_samples=0, storage=str(tmp_path), name="d"),
               LocalSession())
    res = Results(str(tmp_path / "d"))
    bad = sorted((tmp_path / "d" / "epochs").glob("*.parquet"))[1]
    bad.write_bytes(bad.read_bytes()[:10])
    assert report.main([str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and bad.name in err and "Traceback" not in err
    with pytest.raises(SystemExit) as exit_info:
        collapse_map.main([str(tmp_path / "d")])
    assert exit_info.value.code == 2 and bad.name in capsys.readouterr().err
    assert res.set_aside_damaged() == [str(bad)]
    assert Path(str(bad) + ".damaged").exists() and len(res.read("epochs")) == 2


def _damage(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:10])


def test_a_resume_redoes_an_epoch_whose_rows_were_set_aside_from_the_checkpoint_before_it(tmp_path, capsys):
    import contextlib
    import shutil

    from vae.config import TrainConfig
    from vae.training.loop import train_loop
    from vae.training.session import LocalSession

    cfg = TrainConfig(dataset="gaussian2d", epochs=2, iw_samples=0, storage=str(tmp_path), name="r")
    root = tmp_path / "r"
    train_loop(cfg, LocalSession(str(root / "checkpoint_a")))  # epochs 1-2: checkpoint_a holds epoch 2
    shutil.copytree(root / "checkpoint_a", root / "checkpoint_b")
    train_loop(cfg.replace(epochs=4), LocalSession(str(root / "checkpoint_b")))  # epochs 3-4: checkpoint_b
    res = Results(str(root))
    before = res.read("epochs").sort_values("epoch").reset_index(drop=True)

    class Latest(LocalSession):
        @contextlib.contextmanager
        def latest_checkpoint(self):
            yield str(root / "checkpoint_b")

    _damage(sorted((root / "epochs").glob("*.parquet"))[3])  # epoch 3's rows
    assert len(res.set_aside_damaged()) == 1
    session = Latest(str(root / "checkpoint_b"))
    train_loop(cfg.replace(epochs=4), session)
    assert [r["epoch"] for r in session.reports] == [3, 4]  # from checkpoint_a (epoch 2), not from the start
    after = res.read("epochs").sort_values("epoch").reset_index(drop=True)
    assert list(after.epoch) == [0, 1, 2, 3, 4]
    pd.testing.assert_series_equal(after.test_loss, before.test_loss)  # seeded: the redone epochs agree
    assert "epoch 3 of r is missing from epochs/" in capsys.readouterr().err


def test_a_resume_with_no_checkpoint_before_the_missing_epoch_trains_again_from_the_start(tmp_path, capsys):
    from vae.config import TrainConfig
    from vae.training.loop import train_loop
    from vae.training.session import LocalSession

    cfg = TrainConfig(dataset="gaussian2d", epochs=3, iw_samples=0, storage=str(tmp_path), name="s")
    root = tmp_path / "s"
    train_loop(cfg, LocalSession(str(root / "ck")))
    res = Results(str(root))
    before = res.read("kl_per_dim").sort_values(["epoch", "dim"]).reset_index(drop=True)
    _damage(sorted((root / "kl_per_dim").glob("*.parquet"))[1])  # epoch 1's rows; the checkpoint holds 3
    res.set_aside_damaged()
    session = LocalSession(str(root / "ck"))
    train_loop(cfg, session)  # finished before: without the gap it would only report epoch 3 again
    assert [r["epoch"] for r in session.reports] == [1, 2, 3]
    after = res.read("kl_per_dim").sort_values(["epoch", "dim"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(after[["epoch", "dim", "kl"]], before[["epoch", "dim", "kl"]])
    assert "epoch 1 of s is missing from kl_per_dim/" in capsys.readouterr().err


def test_a_resume_that_finds_rows_but_no_checkpoint_says_it_trains_again_from_the_start(tmp_path, capsys):
    """Rows in the tables but no checkpoint to continue from (a worker killed before Ray registered the one it
    reported): the run trains from the start, writes the same rows, and says so instead of going on silently
    after the driver's "epochs up to N are done"."""
    from vae.config import TrainConfig
    from vae.training.loop import train_loop
    from vae.training.session import LocalSession

    cfg = TrainConfig(dataset="gaussian2d", epochs=2, iw_samples=0, storage=str(tmp_path), name="s")
    train_loop(cfg, LocalSession(str(tmp_path / "first")))
    res = Results(str(tmp_path / "s"))
    before = res.read("epochs").sort_values("epoch").reset_index(drop=True)
    assert "training again from the start" not in capsys.readouterr().err  # a fresh run has nothing to say
    session = LocalSession(str(tmp_path / "none-kept"))  # the same run, no checkpoint to resume from
    train_loop(cfg, session)
    assert [r["epoch"] for r in session.reports] == [1, 2]
    assert "no checkpoint of the epochs already in the tables" in capsys.readouterr().err  # (a job's run.json
    # gets it too, as `redone`, and its driver says it: test_the_driver_says_once_how_the_worker_resumed's path)
    after = res.read("epochs").sort_values("epoch").reset_index(drop=True)
    pd.testing.assert_frame_equal(after[["epoch", "test_loss"]], before[["epoch", "test_loss"]])


def test_first_gap_finds_the_earliest_missing_epoch_over_a_packs_members():
    from vae.training.resume import first_gap

    def rows(pairs):
        return {"epochs": set(pairs), "kl_per_dim": set(pairs)}

    full = [(t, e) for t in "ab" for e in range(4)]
    live = [{"status": "running", "metrics": {"epoch": 3}}] * 2
    assert first_gap(rows(full), "ab", live, 3) == (-1, "")
    have = rows(full)
    have["kl_per_dim"] -= {("b", 1)}
    assert first_gap(have, "ab", live, 3) == (1, "epoch 1 of b is missing from kl_per_dim/")
    # a member that diverged at epoch 2 wrote epochs/ only there, and nothing after it
    diverged = [{"status": "diverged", "metrics": {"epoch": 2}}, live[1]]
    have = rows([p for p in full if p[0] == "b"] + [("a", e) for e in range(2)])
    have["epochs"].add(("a", 2))
    assert first_gap(have, "ab", diverged, 3) == (-1, "")
    have["epochs"].discard(("a", 2))
    assert first_gap(have, "ab", diverged, 3)[0] == 2
    later = [{"status": "running", "metrics": {"epoch": 5}}] * 2
    assert first_gap(rows(full), "ab", later, 5)[0] == 4  # the rows stop before the checkpoint's epoch


def test_collapse_map_on_a_folder_without_results_exits_2_and_writes_nothing(tmp_path):
    from jobs import collapse_map

    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        collapse_map.main([str(tmp_path / "empty")])
    assert exit_info.value.code == 2 and list((tmp_path / "empty").iterdir()) == []


@pytest.mark.parametrize("content, message", [
    (b"a: &a [1,1,1,1,1,1,1,1,1]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
     b"d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\nepochs: [*d,*d,*d,*d,*d,*d,*d,*d,*d]\n", "expands (through aliases)"),
    (b"epochs: 3\nbeta: \xff\xfe\n", "is not UTF-8 text"),
    (b"epochs: 3\nepochs: 5\n", "gives 'epochs' more than once"),
    (b"epochs: 3\nlatent-dim: 2\nlatent_dim: 4\n", "gives 'latent_dim' more than once"),
    (b"", "is empty"),
    (b"# only a comment\n", "is empty"),
])
def test_hostile_or_broken_yaml_is_refused_in_one_short_line(tmp_path, content, message):
    path = tmp_path / "run.yaml"
    path.write_bytes(content)
    run = subprocess.run([sys.executable, "-m", "jobs.train", "--config", str(path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and message in run.stderr
    assert len(run.stderr) < 400 and run.stderr.count("\n") == 1


@pytest.mark.parametrize("name", ["run\n", "run ", "ru\tn", "r\x07"])
def test_names_with_whitespace_or_control_characters_are_refused(name):
    from vae.config import ConfigError, TrainConfig

    with pytest.raises(ConfigError, match="--name"):
        TrainConfig(name=name)


def test_an_unreadable_latest_checkpoint_falls_back_to_the_one_before(tmp_path):
    import contextlib
    import shutil

    from vae.config import TrainConfig, resolve
    from vae.training.loop import _set_up, train_loop
    from vae.training.session import LocalSession

    cfg = TrainConfig(dataset="gaussian2d", model="linear", decoder_var="1", epochs=2, iw_samples=0,
                      storage=str(tmp_path), name="ck")
    train_loop(cfg, LocalSession(str(tmp_path / "ck" / "checkpoint_a")))
    shutil.copytree(tmp_path / "ck" / "checkpoint_a", tmp_path / "ck" / "checkpoint_b")
    damaged = tmp_path / "ck" / "checkpoint_b" / "state.pt"
    damaged.write_bytes(damaged.read_bytes()[:100])  # the newer one is cut short

    class Latest(LocalSession):
        @contextlib.contextmanager
        def latest_checkpoint(self):
            yield str(tmp_path / "ck" / "checkpoint_b")

    Results(str(tmp_path / "ck")).write_json("run.json", {"kind": "train", "config": resolve(cfg).to_dict()})
    run = _set_up([resolve(cfg.replace(epochs=3))], Latest())
    assert run.restore() == 2
    note = Results(str(tmp_path / "ck")).read_json("run.json")["restored_from"]
    assert "checkpoint_b could not be read" in note and "checkpoint_a (epoch 2)" in note


def test_a_run_waiting_for_an_autoscaling_cluster_says_so_every_so_often(tmp_path, monkeypatch):
    from vae import launch
    from vae.config import TrainConfig

    monkeypatch.setattr(launch, "PENDING_EVERY_S", 0.05)
    lines = []
    follower = launch.EpochFollower(TrainConfig(dataset="gaussian2d", storage=str(tmp_path), name="w"),
                                    emit=lines.append, every=0.02)
    follower.pending = "the run needs 8 GPUs, the cluster has 0 now"
    follower.start()
    deadline = time.time() + 30  # the event (two reminders), not a delay
    while time.time() < deadline and sum(line.startswith("still waiting after") for line in lines) < 2:
        time.sleep(0.01)
    follower.stop()
    waiting = [line for line in lines if line.startswith("still waiting after")]
    assert len(waiting) >= 2 and all("needs 8 GPUs" in line for line in waiting)


def test_the_driver_says_once_how_the_worker_resumed(tmp_path):
    from vae import launch
    from vae.config import TrainConfig

    lines = []
    follower = launch.EpochFollower(TrainConfig(dataset="gaussian2d", storage=str(tmp_path), name="n"),
                                    emit=lines.append)
    res = Results(str(tmp_path / "n"))
    res.write_json("run.json", {"kind": "train"})
    follower.poll()
    res.update_json("run.json", redone="epoch 2 of n is missing from epochs/ ...: redoing epochs 2 on")
    follower.poll()
    follower.poll()
    assert lines == ["epoch 2 of n is missing from epochs/ ...: redoing epochs 2 on"]


def _shown(lines: list[str]) -> list[int]:
    """The epochs of the driver's epoch lines."""
    return [int(line.split()[1].split("/")[0]) for line in lines if line.startswith("epoch ")]


def test_the_driver_prints_each_epoch_once_reading_only_the_files_written_since_its_last_poll(tmp_path,
                                                                                              monkeypatch):
    """A long run's driver must not read all its epoch files every second (its poll grew with the run: 300 toy
    epochs cost the driver half the CPU the worker used): each poll reads only the files new since the last."""
    from vae import launch
    from vae.config import TrainConfig
    from vae.tables.results import epoch_row, file_key

    cfg = TrainConfig(dataset="gaussian2d", storage=str(tmp_path), name="f")
    res = Results(str(tmp_path / "f"))
    lines, reads = [], []
    follower = launch.EpochFollower(cfg, emit=lines.append)
    read = Results.read
    monkeypatch.setattr(Results, "read", lambda self, table, filter=None, files=None: (
        reads.append(None if files is None else [os.path.basename(f) for f in files]),
        read(self, table, filter, files))[1])

    def epoch(e: int, trial_id: str = cfg.run_id) -> str:
        res.write("epochs", [epoch_row(cfg, trial_id, e, 1.0, None, {"loss": 1.0})], file_key(trial_id, e))
        return file_key(trial_id, e)

    first = [epoch(0), epoch(1), epoch(0, "other")]
    follower.poll()
    assert reads == [sorted(first)] and _shown(lines) == [0, 1]
    reads.clear()
    follower.poll()  # nothing new
    assert reads == [[]] and len(lines) == 2
    reads.clear()
    new = epoch(2)
    follower.poll()
    assert reads == [[new]] and _shown(lines) == [0, 1, 2]


def test_the_test_only_hold_waits_in_its_step_until_released_and_never_again(tmp_path, monkeypatch):
    """The node-loss tests' hold (vae/training/faults.py): every rank stops half-way through the step asked for,
    says so in a file, and goes on only once released; other steps, and that step after the release, pass."""
    import threading

    from vae.training.faults import FAULT_HOLD_ENV, FAULT_MARKER_ENV, FaultPlan

    marker = str(tmp_path / "hold")
    monkeypatch.setenv(FAULT_HOLD_ENV, "2,4")
    monkeypatch.setenv(FAULT_MARKER_ENV, marker)
    plan = FaultPlan.from_env()
    assert plan.step_in(1, 10, 0) == -1 and plan.step_in(2, 10, 0) == 5 and plan.step_in(2, 10, 1) == 5
    for step in (2, 4):
        held = threading.Thread(target=plan.fire, args=(step,))
        held.start()
        while not list(tmp_path.glob(f"hold.held-{step}-*")):
            time.sleep(0.01)
        held.join(timeout=0.5)  # a hold that did not wait has returned by now; a real one waits for its release
        assert held.is_alive()
        (tmp_path / f"hold.release-{step}").touch()
        held.join(timeout=10)
        assert not held.is_alive() and not (tmp_path / "hold").exists()  # released, and nothing killed
        assert plan.step_in(step, 10, 0) == -1  # a restarted worker passes the step
    assert plan.step_in(3, 10, 0) == -1


KILL_WAITS = """
import os, sys
from vae.training.faults import FaultPlan
marker, ready = sys.argv[1], sys.argv[2]
def restartable():
    with open(ready + ".asked", "a") as fh:
        fh.write("asked\\n")
    return os.path.exists(ready)
FaultPlan(epoch=2, marker=marker).fire(2, restartable)
print("not killed")
"""


def test_the_test_only_kill_waits_until_the_step_befores_checkpoint_is_registered(tmp_path):
    """A kill half-way through step K first waits until the checkpoint of step K - 1 is one a restart would use
    (under Ray Train: registered in its run's snapshot); only then the process dies, by SIGKILL."""
    import pyarrow.fs as pafs

    from vae.training.faults import SNAPSHOT, checkpoint_registered

    marker, ready = str(tmp_path / "killed"), str(tmp_path / "ready")
    proc = subprocess.Popen([sys.executable, "-c", KILL_WAITS, marker, ready], cwd=ROOT)
    def asked() -> int:
        return len(Path(ready + ".asked").read_text().splitlines()) if os.path.exists(ready + ".asked") else 0

    deadline = time.time() + 60
    while asked() < 2 and time.time() < deadline:  # the event: asked, and asked again
        time.sleep(0.01)
    assert asked() >= 2 and proc.poll() is None  # waiting, not killed
    Path(ready).touch()
    assert proc.wait(timeout=30) == -9 and os.path.exists(marker)

    fs, snapshot = pafs.LocalFileSystem(), str(tmp_path / SNAPSHOT)
    assert not checkpoint_registered(fs, snapshot, 1)  # no snapshot yet
    Path(snapshot).write_text(json.dumps({"checkpoint_results": [{"metrics": {"epoch": 1}}, {"metrics": {"epoch": 2}}]}))
    assert checkpoint_registered(fs, snapshot, 2) and not checkpoint_registered(fs, snapshot, 3)
    Path(snapshot).write_text("{")  # cut short while Ray rewrote it: not registered, no error
    assert not checkpoint_registered(fs, snapshot, 1)


def test_a_fit_given_up_on_is_remembered_until_its_thread_ends():
    """`in_thread` gives up on a helper thread when `abandon()` says so (a lost node): `left_a_thread` then tells
    the CLI to end with os._exit after its last line, not in finalisers under that thread."""
    import threading

    from vae import launch

    release = threading.Event()
    assert launch.in_thread(lambda: 7) == 7 and not launch.left_a_thread()
    with pytest.raises(launch.Abandoned):
        launch.in_thread(release.wait, abandon=lambda: True)
    assert launch.left_a_thread()
    release.set()
    launch._LEFT[-1].join(timeout=10)
    assert not launch.left_a_thread()  # it ended after all: nothing left to step around
