"""Ray at the edge: connect to (or start) a cluster, fit a TorchTrainer, follow progress.

Nothing here is imported by the loop; `jobs/` calls these after validation. Ray, torch and the loop
load inside the functions that use them, so the Python API's readers (`vae.api.open_results`) stay light.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import platform
import re
import threading
import time
import warnings
from typing import Any, Callable

import pyarrow.dataset as ds

from vae.config import TrainConfig, config_yaml
from vae.tables.results import Results, run_root
from vae.tables.runs import RunError


# Ray settings for the local cluster that `connect` starts (a cluster we attach to keeps its own): Train's
# controller polls its workers every 2 s by default, so a finished run waited up to two polls (about 3.5 s
# measured) before `fit()` returned; a single machine is never drained by a cloud provider, so the preemption
# watcher (one more actor process to start on every run) has nothing to watch; and the raylet starts one idle
# Python worker per CPU when the driver connects, which no actor of ours takes (each gets a process of its own):
# two processes that only import Ray (about 1.2 CPU-s on this 2-CPU machine, measured with and without).
LOCAL_TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
                   "RAY_prestart_worker_first_driver": "0"}


def connect(verbose: bool = False, num_cpus: int | None = None) -> None:
    """Attach to the cluster in RAY_ADDRESS (`ray job submit` sets it for its jobs; `auto` finds a `ray start`
    cluster on this machine), or start a local one (RAY_ADDRESS unset, empty or `local`).

    Without RAY_ADDRESS the local instance is always a new one: `ray.init()` alone would attach to whatever
    cluster a `ray start` on this machine last recorded, which the run would then take for a local instance it
    may size and check as one. Ray's own log stream (worker prefixes, controller chatter) stays off unless
    `verbose`; progress comes from the results tables instead. A local cluster gets `LOCAL_TRAIN_ENV` (unless
    the environment already sets them).
    """
    import ray

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    if not verbose:
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's banner and tables off; our progress line instead
    if ray.is_initialized():
        return
    level = logging.INFO if verbose else logging.ERROR
    if not verbose:
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
    kwargs: dict[str, Any] = dict(logging_level=level, log_to_driver=verbose)
    if not attached():
        for key, value in LOCAL_TRAIN_ENV.items():  # inherited by the local raylet and so by every worker
            os.environ.setdefault(key, value)
        kwargs.update(address="local", include_dashboard=False)
        if num_cpus:
            kwargs["num_cpus"] = num_cpus
    ray.init(**kwargs)
    logging.getLogger("ray").setLevel(level)


def cluster_resources() -> tuple[int, int]:
    """(CPUs, GPUs) of the cluster we are attached to."""
    import ray

    res = ray.cluster_resources()
    return int(res.get("CPU", 0)), int(res.get("GPU", 0))


def settle_scaling(cfg: TrainConfig) -> TrainConfig:
    """Decide GPU use and CPUs per worker from the cluster when the user left them open."""
    cpus, gpus = cluster_resources()
    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else gpus > 0
    cpus_per_worker = cfg.cpus_per_worker or max(1, cpus // cfg.num_workers if cpus else 1)
    return cfg.replace(use_gpu=use_gpu, cpus_per_worker=cpus_per_worker)


PENDING_EVERY_S = 60.0  # while a run waits for an autoscaling cluster, say so this often


def attached() -> bool:
    """Whether we joined a cluster started elsewhere (it may autoscale) rather than starting a local one."""
    return os.environ.get("RAY_ADDRESS", "") not in ("", "local")


def check_resources(cfg: TrainConfig, emit: Callable[[str], None] = print) -> str:
    """Refuse (RunError) a request the cluster can never meet: a local instance cannot grow. On a cluster
    we attached to, which may autoscale, say what is pending instead and let Ray wait for it."""
    cpus, gpus = cluster_resources()
    need_cpu = cfg.num_workers * (cfg.cpus_per_worker or 1)
    need_gpu = cfg.num_workers if cfg.use_gpu else 0
    short = [f"{need} {kind} ({cfg.num_workers} worker(s) x {need // cfg.num_workers})"
             for need, have, kind in ((need_cpu, cpus, "CPUs"), (need_gpu, gpus, "GPUs")) if need > have]
    if not short:
        return ""
    have = f"the cluster has {cpus} CPUs and {gpus} GPUs"
    if not attached():
        raise RunError(f"--num-workers: the run needs {' and '.join(short)} but {have} and a local Ray "
                       "instance cannot grow; ask for fewer workers or --cpus-per-worker")
    emit(f"waiting for the cluster to grow: the run needs {' and '.join(short)}, {have} now (the autoscaler "
         "adds nodes up to its max_workers; Ctrl-C to give up)")
    return f"the run needs {' and '.join(short)}, {have} when it started"


def check_trial_resources(need_cpu: float, need_gpu: float) -> None:
    """The same for one sweep trial (`SweepConfig.resources_held`): a trial that a local instance cannot hold
    never starts (with Train workers, their controller retries for ever)."""
    cpus, gpus = cluster_resources()
    if attached() or (need_cpu <= cpus and need_gpu <= gpus):
        return
    raise RunError(f"--cpus-per-trial/--gpus-per-trial/--workers-per-trial: one trial holds {need_cpu:g} CPUs and "
                   f"{need_gpu:g} GPUs at once but the local Ray instance has {cpus} CPUs and {gpus} GPUs and "
                   "cannot grow")


class Abandoned(RuntimeError):
    """`in_thread` stopped waiting: its `abandon()` said so."""


_LEFT: list[threading.Thread] = []  # helper threads `in_thread` gave up on, still inside `fn`


def left_a_thread() -> bool:
    """Whether a helper thread that `in_thread` gave up on is still running. A process that ends normally then
    runs Python's and Ray's finalisers under that thread, which is inside Ray's client (seen: SIGSEGV after the
    job's last line); the CLI ends such a process with `os._exit` once it has said everything."""
    return any(t.is_alive() for t in _LEFT)


def in_thread(fn: Callable[..., Any], *args: Any, abandon: Callable[[], bool] | None = None) -> Any:
    """fn(*args) on a helper thread while the main thread waits (and so can run signal handlers);
    its result, or its exception raised here; `Abandoned` once `abandon()` is true (the helper thread, a
    daemon, is left to end with Ray's shutdown)."""
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["value"] = fn(*args)
        except BaseException as e:  # handed to the caller
            out["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)
        if abandon is not None and abandon():
            _LEFT.append(thread)
            raise Abandoned("abandoned")
    if "error" in out:
        raise out["error"]
    return out["value"]


def shutdown_quietly() -> None:
    """End this job's Ray (its local instance, workers included), without Ray's own noise."""
    import ray

    try:
        ray.shutdown()
    except Exception:  # already going down
        pass


OUR_ERRORS = ("StorageError", "DataError", "CheckpointError", "ConfigError", "RunError")


def error_line(error: BaseException | None) -> str:
    """One line for a failed run: our own error's message when a worker raised one, else the last line."""
    if error is None:
        return "no trial row was written"
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    for line in reversed(lines):
        for name in OUR_ERRORS:
            if name + ":" in line:
                return line[line.index(name):]
    return f"{type(error).__name__}: {lines[-1] if lines else ''}"


def format_epoch(row: dict[str, Any], total: int, latent_dim: int) -> str:
    def num(v: float, spec: str = ".2f") -> str:
        return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)

    speed = row.get("samples_per_second")
    trained = "before training" if int(row["epoch"]) == 0 else f"train {num(row['train_loss'])}"
    return (f"epoch {int(row['epoch'])}/{total}  {trained}  test {num(row['test_loss'])} "
            f"(recon {num(row['test_recon'])}, KL {num(row['test_kl'])})  in use {int(row['units_in_use'])}/"
            f"{latent_dim} (active {int(row['active_units'])})  MI {num(row['mutual_info'])}"
            + (f"  {num(speed, ',.0f')} samples/s" if speed is not None and not math.isnan(speed) else ""))


# What the loop notes in run.json when it resumed other than from the latest checkpoint (vae/training/loop.py)
RESUME_NOTES = ("restored_from", "redone")


class EpochFollower(threading.Thread):
    """Prints each new `epochs/` row of one trial while the run goes on, and the loop's resume notes."""

    def __init__(self, cfg: TrainConfig, emit: Callable[[str], None] = print, every: float = 1.0):
        super().__init__(daemon=True)
        self.cfg, self.emit, self.every = cfg, emit, every
        self.results = Results(run_root(cfg.storage, cfg.name))
        self.seen: set[int] = set()
        self.files_read: set[str] = set()  # epoch files already read (`_rows`)
        self.shown = False  # an epoch line was printed (until then: say what the cluster must still provide)
        self.pending = ""  # what the cluster must still provide (an autoscaling cluster): said every so often
        self.pending_said = 1
        self.stop_event = threading.Event()
        self.notes_said: set[str] = set()
        self.nodes: dict[str, tuple[str, float]] | None = None  # id -> (address, CPUs) (`watch`); None: unwatched
        self.gone: dict[str, str] = {}  # lost nodes: id -> address
        self.short_since: float | None = None  # since when the nodes left cannot hold the workers
        self.lost = ""  # why the run ended on a lost node (the driver's last line)

    def _rows(self):
        """The trial's rows in the epoch files not read before: each poll lists the folder and reads what is new
        (a file is renamed into place whole), so a long run's poll costs what it adds, not all it has written."""
        new = [f for f in self.results.files("epochs") if f not in self.files_read]
        rows = self.results.read("epochs", ds.field("trial_id") == self.cfg.run_id, files=new)
        self.files_read.update(new)
        return rows

    def resumed_after(self) -> int | None:
        """Epochs already in the table (a rerun of the same name): marked seen; the last one, or None."""
        done = self._rows().epoch
        self.seen.update(int(e) for e in done)
        return int(done.max()) if len(done) else None

    def poll(self) -> None:
        try:
            info = self.results.read_json("run.json") or {}
            df = self._rows()  # last: the files it reads are marked read
        except Exception:  # a file being renamed in place: try again on the next tick
            return
        for key in RESUME_NOTES:  # how the worker resumed (an older checkpoint, epochs redone): said once
            if info.get(key) and key not in self.notes_said:
                self.notes_said.add(key)
                self.emit(info[key])
        for row in df.sort_values("epoch").to_dict("records"):
            if int(row["epoch"]) not in self.seen:
                self.seen.add(int(row["epoch"]))
                self.shown = True
                self.emit(format_epoch(row, self.cfg.budget, self.cfg.latent_dim))

    def run(self) -> None:
        started = time.monotonic()
        while not self.stop_event.wait(self.every):
            self.poll()
            if self.nodes is not None:
                self.watch_nodes()
            waited = time.monotonic() - started
            if self.pending and not self.shown and waited > PENDING_EVERY_S * self.pending_said:
                self.pending_said += 1
                self.emit(f"still waiting after {waited:.0f}s: {self.pending}")

    def watch(self) -> None:
        """Watch the cluster's nodes while the run goes on (`watch_nodes`); from the thread that connected."""
        self.nodes = alive_nodes()

    def watch_nodes(self) -> None:
        """A node that was alive is gone: say which, in which epoch, and what happens next. Ray Train restarts
        its workers from the latest checkpoint (within --max-failures) where the nodes left hold them; where
        they cannot for `--node-wait` seconds, the run is given up (`lost`: the driver stops waiting for it and
        exits 1, saying how to resume)."""
        try:
            now = alive_nodes()
        except Exception:  # the GCS busy or gone: look again on the next tick
            return
        done = max(self.seen) if self.seen else 0
        for node, (address, _) in self.nodes.items():
            if node not in now:
                self.gone[node] = address
                self.emit(f"lost node {address} ({node[:8]}) during epoch {done + 1}: Ray Train restarts the "
                          f"workers from the checkpoint of epoch {done} (--max-failures {self.cfg.max_failures})")
        self.nodes = now
        need = self.cfg.num_workers * (self.cfg.cpus_per_worker or 1)
        have = sum(cpus for _, cpus in now.values())
        if not self.gone or have >= need:
            self.short_since = None
            return
        self.short_since = self.short_since or time.monotonic()
        if time.monotonic() - self.short_since >= self.cfg.node_wait and not self.lost:
            lost = ", ".join(f"{a} ({n[:8]})" for n, a in self.gone.items())
            self.lost = (f"lost node {lost}: the nodes left have {have:g} CPUs, the {self.cfg.num_workers} workers "
                         f"need {need:g}, and none came back in {self.cfg.node_wait:g}s (--node-wait); "
                         f"{self.cfg.name} stopped after epoch {done} (tables and checkpoint agree): resume with "
                         "the same command once the cluster has the capacity again, or with fewer --num-workers")

    def stop(self) -> None:
        self.stop_event.set()
        self.join()
        self.poll()


def alive_nodes() -> dict[str, tuple[str, float]]:
    """The cluster's live nodes: id -> (address, CPUs)."""
    import ray

    return {n["NodeID"]: (n["NodeManagerAddress"], float(n.get("Resources", {}).get("CPU", 0.0)))
            for n in ray.nodes() if n.get("Alive")}


def record_run(root: str, kind: str, argv: list[str], config: dict[str, Any]) -> None:
    """`run.json` beside the tables: the command, config, start time and versions, for the report."""
    import ray

    res = Results(root)
    res.write_json("run.json", {
        "kind": kind, "command": " ".join(["python -m", f"jobs.{kind}", *argv]), "config": config,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "versions": {"python": platform.python_version(), "torch": torch_version(), "ray": ray.__version__}})
    # what `--config` takes back as is: rerunning it reproduces (or resumes) the run
    res.write_text("config.yaml", f"# python -m jobs.{kind} --config config.yaml\n"
                   + config_yaml(config))


def torch_version() -> str:
    """`torch.__version__` (with its build label, such as +cu130), read from torch's version.py: a sweep's
    driver never imports torch (about 2.4 CPU-s); its trials do, in their own processes."""
    spec = importlib.util.find_spec("torch")  # finds the package without importing it
    with open(os.path.join(os.path.dirname(spec.origin), "version.py")) as f:
        return re.search(r"^__version__\s*=\s*['\"]([^'\"]+)", f.read(), re.M).group(1)


def trainer_class() -> type:
    """Ray Train's `TorchTrainer` without three of the helpers it starts for every run (Ray 2.60 has no switch for
    any; the pin in pyproject.toml and the tests that train under Ray hold this override to that version):

    - its datasets callback, which starts a `DatasetManager` actor, one more process (about 2 CPU-s), to hand out
      Ray Data shards: we give it no datasets (the loop reads its own data, vae/model/data.py);
    - on a local instance (not `attached()`), its placement-group cleaner, a detached actor that removes the
      run's placement group once the run's controller is dead, for a cluster that outlives a crashed
      controller. A local instance ends with this process, so it has nothing to do there, and it asks wrongly:
      it looks the controller up through the state API, which a local instance does not serve
      (`include_dashboard=False`), so the question goes to the latest other Ray instance on the machine (a
      `ray start`, another job's), which takes our controller for dead and has the cleaner remove a live run's
      placement group (docs/failures.md);
    - on a local instance, the resource requests of its scaling policy to an autoscaling coordinator, a
      detached actor (one more process, about 2 CPU-s, importing Ray Data) that passes them on to an
      autoscaler: a local instance has none, and cannot grow (`check_resources` refuses what it cannot hold).
    """
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    from ray.train.v2._internal.execution.scaling_policy import FixedScalingPolicy

    local = not attached()
    dropped = (DatasetsCallback, PlacementGroupCleanerCallback) if local else (DatasetsCallback,)

    class LocalFixedScalingPolicy(FixedScalingPolicy):
        """A fixed worker group that asks no autoscaler for its resources (the base class creates the
        coordinator on the controller's start and asks it again on each decision; its cancel does nothing when
        it was never created)."""

        def after_controller_start(self, train_run_context):
            pass

        def _maybe_send_resource_request(self):
            pass

    class Trainer(TorchTrainer):
        def _create_default_callbacks(self):
            return [c for c in super()._create_default_callbacks() if not isinstance(c, dropped)]

        def _initialize_and_run_controller(self, **kwargs):
            if local and type(kwargs.get("scaling_policy")) is FixedScalingPolicy:
                kwargs["scaling_policy"] = LocalFixedScalingPolicy(self.scaling_config)
            return super()._initialize_and_run_controller(**kwargs)

    return Trainer


def fit(cfg: TrainConfig, env_vars: dict[str, str] | None = None, callbacks: list | None = None,
        run_name: str = "", run_storage: str = ""):
    """Run `train_loop` on `cfg.num_workers` Ray Train workers; returns the `ray.train.Result`.

    Ray Train's run (checkpoints) is `run_storage/run_name`, by default the
    results folder `storage/name` itself. Rerunning the same run resumes from
    its latest checkpoint. A failed run raises `ray.train.TrainingFailedError`.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

    from vae.training.loop import train_func

    resources = {"CPU": cfg.cpus_per_worker or 1}
    if cfg.use_gpu:
        resources["GPU"] = 1
    trainer = trainer_class()(
        train_func,
        train_loop_config=cfg.to_dict(),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=bool(cfg.use_gpu),
                                     resources_per_worker=resources),
        run_config=RunConfig(name=run_name or cfg.name, storage_path=run_storage or cfg.storage,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             worker_runtime_env={"env_vars": env_vars} if env_vars else None,
                             callbacks=callbacks),
    )
    return trainer.fit()
