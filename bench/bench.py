"""python -m bench.bench: our training speed against the seed's own loop and the matrix-product limit.

Everything runs in this one command on the same machine, model (784-400-20 MLP VAE), batch size 128 and
thread count, so every figure is a ratio against a baseline measured in the same run. Prints a table,
writes it as Parquet (`--out`, default bench-results.parquet) and as the Markdown page docs/performance.md
(`--page`; bench/pages.py), so a rerun updates the page.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from bench import pages
from bench.pages import cpu_model
from vae.config import TrainConfig
from vae.training.loop import train_loop
from vae.tables.results import Results
from vae.training.session import LocalSession

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 128
LONG = 5  # epochs of the longer Ray Train run


def median_spread(values: list[float]) -> tuple[float, float]:
    return statistics.median(values), (max(values) - min(values)) if len(values) > 1 else 0.0


# ------------------------------------------------------------------ 1. the seed's loop
class SeedVAE(torch.nn.Module):
    """pytorch/examples vae/main.py's model, as the seed writes it (nn.Linear layers, F.relu)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc21, self.fc22 = torch.nn.Linear(784, 400), torch.nn.Linear(400, 20), torch.nn.Linear(400, 20)
        self.fc3, self.fc4 = torch.nn.Linear(20, 400), torch.nn.Linear(400, 784)

    def forward(self, x):
        h1 = F.relu(self.fc1(x))
        mu, logvar = self.fc21(h1), self.fc22(h1)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return self.fc4(F.relu(self.fc3(z))), mu, logvar


def seed_loss(model: SeedVAE, x: torch.Tensor) -> torch.Tensor:
    logits, mu, logvar = model(x.view(-1, 784))
    return F.binary_cross_entropy_with_logits(logits, x.view(-1, 784), reduction="sum") \
        - 0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())


def baseline_epoch(data_dir: str, seed: int, warmup: int = 20, subset: int = 0) -> float:
    """pytorch/examples vae/main.py: MNIST + ToTensor + DataLoader, .item() every step; samples/s (an epoch of
    the first `subset` training images; 0: all)."""
    torch.manual_seed(seed)
    train = datasets.MNIST(data_dir, train=True, download=False, transform=transforms.ToTensor())
    loader = DataLoader(torch.utils.data.Subset(train, range(subset)) if subset else train,
                        batch_size=BATCH, shuffle=True)
    model = SeedVAE()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    seen, start, total = 0, None, 0.0
    for i, (x, _) in enumerate(loader):
        if i == warmup:
            start, seen = time.perf_counter(), 0
        loss = seed_loss(model, x)
        opt.zero_grad()
        loss.backward()
        total += loss.item()
        opt.step()
        seen += len(x)
    return seen / (time.perf_counter() - start)


def baseline_test_loss(data_dir: str, epochs: int) -> float:
    """The seed's loop for `epochs`, then its test loss (nats per image, one z sample)."""
    torch.manual_seed(0)
    train = DataLoader(datasets.MNIST(data_dir, train=True, transform=transforms.ToTensor()), batch_size=BATCH,
                       shuffle=True)
    test = DataLoader(datasets.MNIST(data_dir, train=False, transform=transforms.ToTensor()), batch_size=1000)
    model = SeedVAE()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        for x, _ in train:
            loss = seed_loss(model, x)
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return sum(seed_loss(model, x).item() for x, _ in test) / 10_000


# ------------------------------------------------------------------ 2. ours, in process
def ours_in_process(data_dir: str, epochs: int, storage: str, name: str, threads: int,
                    subset: int = 0) -> dict[str, Any]:
    """`train_loop` with one worker and no Ray, in a fresh Python process of its own (the loop tunes its
    process's allocator, which must not colour the other measurements).

    Returns the last epoch's samples/s, test loss and wall (from the end of the epoch before).
    """
    env = dict(os.environ)
    spec = json.dumps({"data_dir": data_dir, "epochs": epochs, "storage": storage, "name": name,
                       "threads": threads, "subset": subset})
    proc = subprocess.run([sys.executable, "-m", "bench.bench", "--child", spec], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"train_loop run {name} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _child(spec: dict) -> dict[str, float]:
    cfg = TrainConfig(dataset="mnist", data_dir=spec["data_dir"], epochs=spec["epochs"], storage=spec["storage"],
                      name=spec["name"], iw_samples=0, cpus_per_worker=spec["threads"], subset=spec["subset"])

    class Timed(LocalSession):  # when each epoch's report (training, evaluation, tables, checkpoint) is done
        def report(self, metrics, checkpoint_dir):
            super().report(metrics, checkpoint_dir)
            reported.append(time.perf_counter())

    reported: list[float] = []
    train_loop(cfg, Timed())
    last = Results(f"{spec['storage']}/{spec['name']}").read("epochs").sort_values("epoch").iloc[-1]
    # the last epoch's wall from the end of the one before: what Ray's per-epoch figure also counts
    return {"samples_per_second": float(last.samples_per_second), "test_loss": float(last.test_loss),
            "epoch_wall": reported[-1] - reported[-2] if len(reported) > 1 else float("nan")}


# ------------------------------------------------------------------ 4. the matrix-product limit
def matmul_limit(reps: int = 5, steps: int = 300, onednn: bool = False) -> list[float]:
    """Samples/s if a step cost only its matrix products (forward and backward of the MLP's layers).

    `onednn`: the same products through oneDNN (torch.ops.mkldnn) instead of torch.matmul: a second ceiling.
    """
    b = BATCH
    x = torch.rand(b, 784)
    w1, wh, w3, w4 = torch.randn(400, 784), torch.randn(40, 400), torch.randn(400, 20), torch.randn(784, 400)
    b1, b4 = torch.randn(400), torch.randn(784)
    h, z, h3 = torch.randn(b, 400), torch.randn(b, 20), torch.randn(b, 400)
    g4, gh, gh3, gh1 = torch.randn(b, 784), torch.randn(b, 40), torch.randn(b, 400), torch.randn(b, 400)
    if onednn:
        def mm(a, w, bias=None):  # a @ w.T (+ bias)
            return torch.ops.mkldnn._linear_pointwise(a, w, bias, "none", [], "")
    else:
        def mm(a, w, bias=None):
            return torch.matmul(a, w.t()) if bias is None else torch.addmm(bias, a, w.t())

    def step():
        mm(x, w1, b1), mm(h, wh), mm(z, w3), mm(h3, w4, b4)  # forward
        mm(g4.t(), h3.t()), mm(g4, w4.t()), mm(gh3.t(), z.t()), mm(gh3, w3.t()), mm(gh.t(), h.t()), \
            mm(gh, wh.t()), mm(gh1.t(), x.t())  # backward: weight and input gradients (none for the data)

    for _ in range(50):
        step()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        out.append(b * steps / (time.perf_counter() - t0))
    return out


# ------------------------------------------------------------------ 3 and 5. under Ray, as a user runs it
def run_job(args: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return time.perf_counter() - t0


def peak_rss_mb(data_dir: str, storage: str, subset: int = 0) -> float:
    code = ("import resource, sys; sys.path.insert(0, %r)\n"
            "from vae.config import TrainConfig; from vae.training.loop import train_loop; from vae.training.session import LocalSession\n"
            "train_loop(TrainConfig(dataset='mnist', data_dir=%r, epochs=1, storage=%r, name='rss', iw_samples=100,"
            " subset=%d), LocalSession())\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)") % (ROOT, data_dir, storage, subset)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def no_cuda(prog: str) -> bool:
    """True (and one line on stderr) where --gpu cannot run: no CUDA device."""
    if torch.cuda.is_available():
        return False
    print(f"{prog}: --gpu: no CUDA device here (torch.cuda.is_available() is False)", file=sys.stderr)
    return True


def gpu(data_dir: str) -> int:
    """The GPU figures: the seed MLP on one GPU under Ray Train (NCCL, prepare_model), then bench.pack --gpu."""
    if no_cuda("bench.bench"):
        return 2
    env = {**os.environ, "VAE_DATA_DIR": os.path.abspath(data_dir)}
    env.pop("RAY_ADDRESS", None)
    with tempfile.TemporaryDirectory() as tmp:
        for workers in sorted({1, torch.cuda.device_count()}):
            name = f"gpu{workers}"
            run_job(["jobs.train", "--dataset", "mnist", "--epochs", "3", "--use-gpu", "--num-workers", str(workers),
                     "--iw-samples", "100", "--storage", tmp, "--name", name], env)
            e = Results(f"{tmp}/{name}").read("epochs")
            print(f"jobs.train --use-gpu, {workers} worker(s): samples/s {e[e.epoch >= 2].samples_per_second.mean():,.0f}, "
                  f"test loss {e.test_loss.iloc[-1]:.2f}", flush=True)
    # bench.pack --gpu in its own process (bench.pack imports this module: no import back)
    return subprocess.run([sys.executable, "-m", "bench.pack", "--gpu", "--data-dir", data_dir], cwd=ROOT).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("VAE_DATA_DIR", "./data"))
    parser.add_argument("--reps", type=int, default=3, help="repetitions of each speed measurement")
    parser.add_argument("--quality-epochs", type=int, default=10,
                        help="epochs for the same-test-loss check (0: skip it)")
    parser.add_argument("--skip-ray", action="store_true", help="skip the Ray Train and sweep measurements")
    parser.add_argument("--subset", type=int, default=0,
                        help="in-process figures on epochs of the first N training images (at least 5000; "
                             "default 0: all 60,000, as the page reports)")
    parser.add_argument("--out", default="bench-results.parquet")
    parser.add_argument("--page", default=os.path.join(ROOT, "docs", "performance.md"),
                        help="the Markdown page to write (default docs/performance.md; '' for none)")
    parser.add_argument("--gpu", action="store_true",
                        help="the GPU figures instead (bench.pack --gpu: packed against unpacked trials on one GPU, "
                             "and jobs.train --use-gpu through NCCL); fails with one line without CUDA")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # one train_loop run, for ours_in_process
    args = parser.parse_args(argv)
    if args.subset and not 5000 <= args.subset <= 60_000:
        parser.error(f"--subset {args.subset}: 0 (all) or 5000 to 60000 (the seed loop times after 20 batches)")
    if args.gpu:
        return gpu(args.data_dir)
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return 0
    threads = torch.get_num_threads()
    rows: list[dict] = []

    def add(name: str, values: list[float], unit: str, note: str = "") -> None:
        med, spread = median_spread(values)
        rows.append({"measure": name, "median": med, "spread": spread, "unit": unit, "n": len(values), "note": note,
                     "cpu": cpu})
        print(f"{name:<44} {med:>12,.2f} {unit:<10} (spread {spread:,.2f}, n={len(values)}) {note}", flush=True)

    cpu = cpu_model()
    print(f"bench: {cpu}, {threads} torch threads, batch {BATCH}, {os.cpu_count()} CPUs", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        # Each repetition measures every contender back to back, and each ratio is taken within its
        # repetition: this shared machine's speed drifts by tens of percent over minutes.
        base, ours, limit, limit_dnn, per_epoch_local = [], [], [], [], []
        for r in range(args.reps):
            base.append(baseline_epoch(args.data_dir, r, subset=args.subset))
            # epoch 2: after a warm-up epoch
            run = ours_in_process(args.data_dir, 2, tmp, f"ours{r}", threads, args.subset)
            ours.append(run["samples_per_second"])
            per_epoch_local.append(run["epoch_wall"])
            limit.append(matmul_limit(1)[0])
            limit_dnn.append(matmul_limit(1, onednn=True)[0])
        add("baseline: seed loop, samples/s", base, "samples/s")
        add("ours in process: train_loop, samples/s", ours, "samples/s")
        add("ours / baseline", [o / b for o, b in zip(ours, base)], "x")
        add("matrix products alone (torch.matmul), samples/s", limit, "samples/s")
        add("ours / matrix-product limit", [100 * o / m for o, m in zip(ours, limit)], "%")
        add("matrix products alone (oneDNN), samples/s", limit_dnn, "samples/s")
        add("ours / oneDNN matrix-product limit", [100 * o / m for o, m in zip(ours, limit_dnn)], "%")
        add("ours in process: wall per epoch (with eval, tables, checkpoint)", per_epoch_local, "s")
        add("peak RSS, one MNIST worker (in process)", [peak_rss_mb(args.data_dir, tmp, args.subset)], "MiB")

        if not args.skip_ray:
            env = {**os.environ, "VAE_DATA_DIR": os.path.abspath(args.data_dir)}
            env.pop("RAY_ADDRESS", None)
            # the per-epoch figure is a difference of two walls that each carry start-up's jitter (seconds):
            # LONG - 1 epochs apart, so that jitter is divided by LONG - 1
            one, long = [], []
            for r in range(args.reps):
                common = ["--dataset", "mnist", "--iw-samples", "0", "--storage", tmp]
                one.append(run_job(["jobs.train", *common, "--epochs", "1", "--name", f"r1-{r}"], env))
                long.append(run_job(["jobs.train", *common, "--epochs", str(LONG), "--name", f"rl-{r}"], env))
            per_epoch = [(b - a) / (LONG - 1) for a, b in zip(one, long)]
            fixed = [a - p for a, p in zip(one, per_epoch)]
            add("Ray Train, 1 worker: fixed start-up", fixed, "s", "wall(1 epoch) - per-epoch")
            add("Ray Train, 1 worker: per epoch", per_epoch, "s", f"(wall({LONG}) - wall(1)) / {LONG - 1}")
            add("Ray Train per epoch / in process", [p / statistics.median(per_epoch_local) for p in per_epoch], "x")
            sweep = ["jobs.sweep", "--dataset", "mnist", "--subset", "1000", "--epochs", "1", "--latent-dims",
                     "2,5,10,20", "--lrs", "1e-3,3e-3", "--betas", "0.5,2", "--iw-samples", "0", "--storage", tmp]
            walls, overheads = [], []
            for r in range(max(1, args.reps - 1)):
                wall = run_job([*sweep, "--name", f"sw{r}"], env)
                trials = Results(f"{tmp}/sw{r}").read("trials")
                walls.append(wall)
                # amortised: the sweep's wall per trial beyond the trial's own training time, 2 trials at once
                overheads.append(wall / len(trials) - trials.wall_seconds.mean() / 2)
            add("sweep of 16 tiny trials: wall", walls, "s")
            add("sweep overhead per trial, amortised", overheads, "s", "wall/16 - trial time/2 concurrent")

        if args.quality_epochs:
            ref = baseline_test_loss(args.data_dir, args.quality_epochs)
            mine = ours_in_process(args.data_dir, args.quality_epochs, tmp, "quality", threads)["test_loss"]
            add(f"test loss after {args.quality_epochs} epochs: baseline", [ref], "nats")
            add(f"test loss after {args.quality_epochs} epochs: ours", [mine], "nats")
            add("test loss difference (ours - baseline)", [mine - ref], "nats")
    table = pd.DataFrame(rows)
    table.to_parquet(args.out, index=False)
    print(f"bench: wrote {args.out}")
    print(json.dumps({r["measure"]: round(r["median"], 3) for r in rows}, indent=1))
    if args.page:
        page(args.page, argv, table, threads)
    return 0


HOW = """\
One command measures, on the same machine, model (784-400-20), batch 128 and thread count: the seed's own
loop (pytorch/examples: its own `nn.Linear` model, torchvision MNIST with `ToTensor`, a `DataLoader`,
`.item()` every step); `train_loop` in process; `python -m jobs.train` under Ray Train with one worker
(fixed start-up and per-epoch cost from 1- and 5-epoch runs); the matrix products of one training step
alone (the hardware limit, through `torch.matmul` and through oneDNN); a sweep of 16 tiny trials; the peak
resident memory of one MNIST worker; and the test loss after the same epochs of the seed's loop and ours.
Each repetition measures every contender back to back and each ratio is taken within its repetition (a
shared machine's speed drifts by tens of percent over minutes): read the ratios, not the absolutes. The
spread is max - min over the repetitions.

What the training step does that the seed's loop does not, each kept because a measurement showed it:
the whole split in one tensor, batches by `index_select` (no PIL or `ToTensor` per item; MNIST parsed
straight from its IDX files); the pytorch/examples VAE's step as one autograd node with a hand-written
backward (vae/model/kernels.py, checked against autograd by `gradcheck` in tests/test_kernels.py) and the
Bernoulli NLL as `relu(l) - x*l + log1p(exp(-|l|))` in vector form; fused Adam (one kernel for every
parameter); metrics summed on the device and read once an epoch; glibc's heap kept between steps
(`mallopt`); denormals flushed. Under Ray: the local cluster polls its workers every 0.25 s instead of 2 s
and skips the cloud preemption watcher, the idle workers Ray starts when a driver connects, and the helper
actors a local run has no use for (`vae.launch.trainer_class`: a datasets manager, a placement-group cleaner and
an autoscaling coordinator, each one more process to start); sweeps reuse trial processes with a per-process
data cache, and an unpacked sweep's driver never imports torch (its data checks, run record and Tune loggers do
without it). Tried
and not kept: `torch.compile` (tens of seconds to compile, no gain at this size), one product for the mean
and log-variance heads (no gain), preloading torch into Ray's idle workers (slower on 2 cores), bfloat16
autocast (faster, but not the same arithmetic), and a oneDNN path chosen by a start-up timing probe (on the
Intel Xeon and the AMD EPYC measured, the probe picked plain ops: 183 against 150 steps/s on the EPYC).

The fixed start-up under Ray is Ray's own: the driver's imports and `ray.init`, the Train controller actor,
the worker actor and its process group, and about a dozen helper processes, on a machine where each new
Python process that imports Ray and torch takes seconds of one core.
"""


def page(path: str, argv: list[str] | None, rows: pd.DataFrame, threads: int) -> None:
    """docs/performance.md from this run's table."""
    body = [f"{threads} torch threads, batch {BATCH}.", "", HOW]
    body += pages.table(["measure", "median", "spread", "unit", "n", "note"],
                        [(r.measure, pages.number(r.median), pages.number(r.spread), r.unit, r.n, r.note)
                         for r in rows.itertuples()])
    body += ["The packed trials' figures are docs/packing.md (`python -m bench.pack`); the stronger decoders' "
             "step is docs/decoders.md (`python -m bench.decoders`)."]
    print(pages.write(path, "Performance: the training job and Ray Train", "bench.bench", argv, body))


if __name__ == "__main__":
    sys.exit(main())
