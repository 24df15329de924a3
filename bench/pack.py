"""python -m bench.pack: packed trials (vae/training/pack.py) against the same configurations trained one per trial.

Every figure is a ratio within this one command, on this machine:
1. the 2-D toy, linear VAE, 48 log-spaced betas x 2 learning rates, 15 epochs: whole `jobs.sweep` wall
   (start-up included) and member-epochs per second of training, `--pack 48` against `--pack 1`;
2. MNIST, linear VAE, latent 20, 8 betas: member-epochs per second, a pack of 8 against trials alone;
3. MNIST, the pytorch/examples MLP (784-400-20), 4 lrs x 6 betas, 10,000 images, 5 epochs: the same, and
   the pack's products against the oneDNN matrix-product limit that bench.bench measures;
4. peak memory per member (a pack of K against a pack of 1, peak RSS of fresh processes);
5. one packed training step as stacked batched products (ours) against torch.func's vmap of the plain model,
   and a whole training step's rate a member by the pack's slots (1 to 24 seed MLPs): what a slot costs;
6. the seed MLP under Ray Train against in process, with Ray's worker niceness (15) and with 0.

"Member-epochs per second of training" counts only the epochs' training time (the `epoch_seconds` of the
rows: a pack's epoch is counted once, for all its members). Trials alone are timed on a share of the
configurations (`--alone`), since their rate per member-epoch does not depend on beta or lr.

`--gpu` runs the GPU comparison instead (the seed MLP, configurations trained per hour, `--pack 64`
against trials alone at a quarter of the GPU each) and fails with one line where CUDA is absent.

Imports: torch, the loop and bench.bench (which imports torch) load inside the functions that run in the
child processes or need them, so the driver that starts and times those processes stays torch-free.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import pandas as pd

from bench import pages
from bench.bench import matmul_limit, no_cuda, ours_in_process, run_job
from bench.pages import cpu_model
from vae.config import TrainConfig, resolve
from vae.tables.results import Results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def log_betas(n: int, lo: float = 0.05, hi: float = 20.0) -> list[float]:
    return [float(f"{lo * (hi / lo) ** (i / (n - 1)):.4g}") for i in range(n)]


def training_rate(root: str) -> tuple[float, int]:
    """(member-epochs per second of training, member-epochs) from a run's tables: each pack's epoch is
    counted once (its members share its `epoch_seconds`)."""
    epochs = pack_steps(root)
    seconds = epochs.drop_duplicates(["pack_id", "step"]).epoch_seconds.sum()
    return len(epochs) / seconds, len(epochs)


def pack_steps(root: str):
    """A run's trained epochs (epoch >= 1) with the pack and the pack's step each was trained in (a refilled
    slot's epoch e is its pack's step pack_offset + e): the pack's steps are what took the time."""
    res = Results(root)
    epochs = res.read("epochs")
    epochs = epochs[epochs.epoch >= 1]
    trials = res.read("trials").set_index("trial_id")
    offset = epochs.trial_id.map(trials.pack_offset.fillna(0).astype(int).to_dict()).astype(int)
    return epochs.assign(pack_id=epochs.trial_id.map(trials.pack_id.to_dict()), step=epochs.epoch + offset)


# ------------------------------------------------------------------ 1. the toy sweep, under Ray Tune
def toy_sweep(storage: str, name: str, pack: int, betas: int, epochs: int, env: dict[str, str]) -> dict[str, float]:
    args = [sys.executable, "-m", "jobs.sweep", "--dataset", "gaussian2d", "--model", "linear", "--decoder-var", "1",
            "--latent-dims", "2", "--lrs", "1e-3,3e-3", "--betas", ",".join(map(str, log_betas(betas))),
            "--epochs", str(epochs), "--iw-samples", "0", "--pack", str(pack), "--storage", storage, "--name", name]
    t0 = time.perf_counter()
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"sweep {name} failed: {proc.stderr.strip().splitlines()[-1:]}")
    rate, n = training_rate(f"{storage}/{name}")
    return {"wall": wall, "rate": rate, "member_epochs": n}


# ------------------------------------------------------------------ 2-4. in process, no Ray
def run_pack(spec: dict[str, Any]) -> dict[str, float]:
    """A child process: train `spec["points"]` as one pack (or each alone, `spec["alone"]`) and report
    the training rate and the process's peak RSS."""
    from vae.training.loop import train_loop, train_pack
    from vae.training.session import LocalSession

    common = {k: v for k, v in spec["common"].items()}
    cfgs = [TrainConfig(**common, **p, storage=spec["storage"], name=spec["name"], trial_id=f"m{i}")
            for i, p in enumerate(spec["points"])]
    if spec.get("alone"):
        for c in cfgs:
            train_loop(c, LocalSession())
    else:
        train_pack(cfgs, LocalSession())
    rate, n = training_rate(f"{spec['storage']}/{spec['name']}")
    return {"rate": rate, "member_epochs": n, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def child(spec: dict[str, Any]) -> dict[str, float]:
    proc = subprocess.run([sys.executable, "-m", "bench.pack", "--child", json.dumps(spec)], cwd=ROOT,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{spec['name']} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def packed_vs_alone(storage: str, name: str, common: dict, points: list[dict], alone: int) -> dict[str, float]:
    packed = child({"common": common, "points": points, "storage": storage, "name": f"{name}-pack"})
    solo = child({"common": common, "points": points[:alone], "storage": storage, "name": f"{name}-alone",
                  "alone": True})
    return {"packed": packed["rate"], "alone": solo["rate"], "ratio": packed["rate"] / solo["rate"],
            "rss_pack": packed["peak_rss_mb"], "rss_one": solo["peak_rss_mb"]}


# ------------------------------------------------------------------ 5. bmm against vmap
def step_times(k: int, reps: int = 30) -> dict[str, float]:
    """Seconds per forward + backward of a pack of k seed MLPs at batch 128: stacked batched products (ours,
    vae/training/pack.py) against torch.func.vmap over torch.func.functional_call of the plain model."""
    import torch

    from vae.training import pack
    from vae.model.models import build_model

    models = []
    for s in range(k):
        torch.manual_seed(s)
        models.append(build_model("mlp", 784, 20, 400, None))
    packed = pack.stack_models(models)
    params, buffers = torch.func.stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")

    def one(p, b, x, eps):
        return torch.func.functional_call(base, (p, b), (x, eps))

    vmapped = torch.func.vmap(one, in_dims=(0, 0, 0, 1))
    x = torch.rand(k, 128, 784)
    eps = torch.randn(1, k, 128, 20)

    def ours():
        recon, kl = packed(x, eps)
        (recon.mean(-1) + kl.sum(-1).mean(-1)).sum().backward()

    def theirs():
        recon, kl = vmapped(params, buffers, x, eps)
        (recon.mean(-1) + kl.sum(-1).mean(-1)).sum().backward()

    out = {}
    for label, fn in (("bmm", ours), ("vmap", theirs)):
        for _ in range(3):
            fn()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        out[label] = (time.perf_counter() - t0) / reps
    return out


def rate_by_slots(slots: tuple[int, ...] = (1, 2, 4, 8, 24), reps: int = 10) -> dict[int, float]:
    """Member-samples per second of a whole training step (forward, backward, Adam) of a pack of K seed MLPs
    (784-400-20) at batch 128 on one thread, each member with its own batch: what a slot costs, by slots.
    Timed in interleaved rounds (this machine drifts); the median of 3 rounds."""
    import torch

    from vae.model import fast
    from vae.model.models import model_for
    from vae.training import pack
    from vae.training.step import train_step

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    runs = {}
    for k in slots:
        cfg = resolve(TrainConfig(dataset="mnist", latent_dim=20, name="bench"))
        models = []
        for s in range(k):
            torch.manual_seed(s)
            models.append(model_for(cfg, 784))
        model = fast.accelerate(pack.stack(models))
        x = torch.rand(k, 128, 784) if k > 1 else torch.rand(128, 784)
        eps = torch.randn(1, k, 128, 20) if k > 1 else torch.randn(1, 128, 20)
        runs[k] = (model, pack.optimizer(model, [1e-3] * k), x, eps)
    rates: dict[int, list[float]] = {k: [] for k in slots}
    for _ in range(3):
        for k, (model, opt, x, eps) in runs.items():
            for _ in range(2):
                train_step(model, opt, x, eps, 1.0, 0.0, False)
            t0 = time.perf_counter()
            for _ in range(reps):
                train_step(model, opt, x, eps, 1.0, 0.0, False)
            rates[k].append(k * 128 * reps / (time.perf_counter() - t0))
    torch.set_num_threads(threads)
    return {k: statistics.median(v) for k, v in rates.items()}


# ------------------------------------------------------------------ 6. Ray Train's gap, and niceness
def ray_gap(storage: str, env: dict[str, str], data_dir: str, reps: int = 2) -> list[tuple[str, float, str]]:
    """Samples/s of epochs 2-3 of the seed MLP on full MNIST: in process, under Ray Train as Ray starts its
    workers (nice 15), and with RAY_worker_niceness=0 (what Ray's job supervisor uses for drivers)."""

    def ray_rate(name: str, extra: dict[str, str]) -> float:
        run_job(["jobs.train", "--dataset", "mnist", "--epochs", "3", "--iw-samples", "0", "--storage", storage,
                 "--name", name], {**env, **extra})
        e = Results(f"{storage}/{name}").read("epochs")
        return float(e[e.epoch >= 2].samples_per_second.mean())

    local, nice15, nice0 = [], [], []
    for r in range(reps):  # back to back in each repetition: the machine's speed drifts over minutes
        local.append(ours_in_process(data_dir, 3, storage, f"gap-local{r}", os.cpu_count() or 1)["samples_per_second"])
        nice15.append(ray_rate(f"gap-ray15-{r}", {}))
        nice0.append(ray_rate(f"gap-ray0-{r}", {"RAY_worker_niceness": "0"}))
    med = statistics.median
    return [("in process: samples/s (seed MLP, full MNIST)", med(local), "samples/s"),
            ("Ray Train, worker at nice 15 (Ray's default): samples/s", med(nice15), "samples/s"),
            ("Ray Train, RAY_worker_niceness=0: samples/s", med(nice0), "samples/s"),
            ("Ray Train nice 15 / in process", med([a / b for a, b in zip(nice15, local)]), "x"),
            ("Ray Train nice 0 / nice 15", med([a / b for a, b in zip(nice0, nice15)]), "x")]


# ------------------------------------------------------------------ GPU
def gpu_bench(storage: str, env: dict[str, str], configs: int) -> list[tuple[str, float, str]]:
    """The seed MLP on one GPU: configurations trained per hour, --pack 64 against trials alone sharing the
    GPU four at a time (--gpus-per-trial 0.25); the data resident on the device."""
    lrs, betas = "1e-4,3e-4,1e-3,3e-3", ",".join(map(str, log_betas(configs // 4, 0.1, 8.0)))
    rows = []
    for label, extra in (("alone, --gpus-per-trial 0.25", ["--pack", "1", "--gpus-per-trial", "0.25"]),
                         ("--pack 64", ["--pack", "64", "--gpus-per-trial", "1"])):
        name = "gpu-" + label.split()[0].strip("-")
        args = [sys.executable, "-m", "jobs.sweep", "--dataset", "mnist", "--latent-dims", "20", "--lrs", lrs,
                "--betas", betas, "--epochs", "5", "--iw-samples", "0", "--storage", storage, "--name", name, *extra]
        t0 = time.perf_counter()
        proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"{name} failed: {proc.stderr.strip().splitlines()[-1:]}")
        rows.append((f"GPU {label}: configurations per hour", configs / wall * 3600, "configs/h"))
    rows.append(("GPU --pack 64 / alone", rows[1][1] / rows[0][1], "x (target >= 10)"))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.pack", description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("VAE_DATA_DIR", "./data"))
    parser.add_argument("--betas", type=int, default=48, help="toy sweep: log-spaced betas (x 2 learning rates)")
    parser.add_argument("--epochs", type=int, default=15, help="toy sweep: epochs a configuration")
    parser.add_argument("--alone", type=int, default=3, help="configurations timed one per trial in sections 2-3")
    parser.add_argument("--skip-sweep", action="store_true", help="skip section 1 (Ray Tune)")
    parser.add_argument("--skip-ray-gap", action="store_true", help="skip section 6 (Ray Train against in process)")
    parser.add_argument("--gpu", action="store_true", help="the GPU comparison (needs CUDA)")
    parser.add_argument("--out", default="bench-pack.parquet")
    parser.add_argument("--page", default=os.path.join(ROOT, "docs", "packing.md"),
                        help="the Markdown page to write (default docs/packing.md, docs/packing-gpu.md with --gpu; "
                             "'' for none)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_pack(json.loads(args.child))))
        return 0

    if args.gpu and no_cuda("bench.pack"):
        return 2
    env = {**os.environ, "VAE_DATA_DIR": os.path.abspath(args.data_dir)}
    env.pop("RAY_ADDRESS", None)
    rows: list[dict[str, Any]] = []

    def add(name: str, value: float, unit: str, note: str = "") -> None:
        rows.append({"measure": name, "value": value, "unit": unit, "note": note, "cpu": cpu_model()})
        print(f"{name:<62} {value:>12,.2f} {unit:<12} {note}", flush=True)

    print(f"bench.pack: {cpu_model()}, {os.cpu_count()} CPUs", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        if args.gpu:
            for name, value, unit in gpu_bench(tmp, env, 64):
                add(name, value, unit)
            pd.DataFrame(rows).to_parquet(args.out, index=False)
            if args.page:
                page(args.page.replace("packing.md", "packing-gpu.md"), argv, rows, "Packed trials on a GPU")
            return 0
        n = 2 * args.betas
        if not args.skip_sweep:
            alone = toy_sweep(tmp, "toy-alone", 1, args.betas, args.epochs, env)
            packed = toy_sweep(tmp, "toy-pack", args.betas, args.betas, args.epochs, env)
            add(f"toy linear sweep, {n} configs x {args.epochs} epochs: wall, alone", alone["wall"], "s")
            add(f"toy linear sweep: wall, --pack {args.betas}", packed["wall"], "s")
            add("toy sweep wall: alone / packed", alone["wall"] / packed["wall"], "x", "target >= 3")
            add("toy sweep training: member-epochs/s, alone", alone["rate"], "m-epochs/s")
            add(f"toy sweep training: member-epochs/s, --pack {args.betas}", packed["rate"], "m-epochs/s")
            add("toy sweep training: packed / alone", packed["rate"] / alone["rate"], "x", "target >= 10")
        data = os.path.abspath(args.data_dir)
        lin = packed_vs_alone(tmp, "lin", {"dataset": "mnist", "data_dir": data, "model": "linear", "decoder_var": "1",
                                           "latent_dim": 20, "lr": 3e-3, "epochs": 2, "iw_samples": 0},
                              [{"beta": b} for b in log_betas(8, 1.0, 40.0)], args.alone)
        add("MNIST linear, latent 20, 8 betas: member-epochs/s alone", lin["alone"], "m-epochs/s")
        add("MNIST linear: member-epochs/s, a pack of 8", lin["packed"], "m-epochs/s")
        add("MNIST linear: packed / alone", lin["ratio"], "x", "target >= 3")
        points = [{"lr": lr, "beta": b} for lr in (1e-4, 3e-4, 1e-3, 3e-3) for b in (0.1, 0.3, 1, 2, 4, 8)]
        mlp = packed_vs_alone(tmp, "mlp", {"dataset": "mnist", "data_dir": data, "subset": 10_000, "epochs": 5,
                                           "iw_samples": 0}, points, args.alone)
        add("MNIST MLP 784-400-20, 24 configs, 10k images: m-epochs/s alone", mlp["alone"], "m-epochs/s")
        add("MNIST MLP: member-epochs/s, a pack of 24", mlp["packed"], "m-epochs/s")
        add("MNIST MLP: packed / alone", mlp["ratio"], "x", "target >= 1.3")
        limit = max(matmul_limit(3, onednn=True) + matmul_limit(3))
        add("MNIST MLP pack: samples/s against the matrix-product limit", 100 * mlp["packed"] * 10_000 / limit, "%",
            f"limit {limit:,.0f} samples/s (the faster of oneDNN and torch.matmul)")
        add("peak RSS per member (MLP pack of 24 vs a trial alone)",
            (mlp["rss_pack"] - mlp["rss_one"]) / (len(points) - 1), "MiB", "beyond one trial's")
        add("peak RSS, a pack of 24 (MLP)", mlp["rss_pack"], "MiB")
        by_slots = rate_by_slots()
        for k, rate in by_slots.items():
            add(f"a training step by slots: {k} seed MLP(s), member-samples/s (1 thread)", rate, "samples/s",
                f"{100 * rate / by_slots[max(by_slots)]:.0f}% of the largest pack's rate a member")
        times = step_times(24)
        add("pack of 24 MLPs, forward+backward: stacked bmm", 1000 * times["bmm"], "ms")
        add("pack of 24 MLPs, forward+backward: torch.func.vmap", 1000 * times["vmap"], "ms")
        add("vmap / bmm (time)", times["vmap"] / times["bmm"], "x", "> 1: bmm (ours) is faster")
        if not args.skip_ray_gap:
            for name, value, unit in ray_gap(tmp, env, data):
                add(name, value, unit)
    pd.DataFrame(rows).to_parquet(args.out, index=False)
    print(f"bench.pack: wrote {args.out}")
    if args.page:
        page(args.page, argv, rows, "Packed trials against trials alone")
    return 0


def page(path: str, argv: list[str] | None, rows: list[dict[str, Any]], title: str) -> None:
    """docs/packing.md (or packing-gpu.md) from this run's rows; the method is this module's docstring."""
    how = __doc__.split("\n\n", 1)[1].rsplit("\n\nImports:", 1)[0]
    body = [how, ""] + pages.table(["measure", "value", "unit", "note"],
                                   [(r["measure"], pages.number(r["value"]), r["unit"], r["note"]) for r in rows])
    body += ["How packs are cut and what they may differ in: docs/sweeps.md (`--pack`)."]
    print(pages.write(path, title, "bench.pack", argv, body))


if __name__ == "__main__":
    sys.exit(main())
