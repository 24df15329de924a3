"""The sweep's typed config and its Tune search space, validated before Ray starts."""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any, Sequence

from vae.config import (ENV_HELP, ConfigError, OneLineParser, TrainConfig, _check, add_config_flags,
                        check_choice, check_float, check_int, check_name, check_storage, parse_args, resolve, HELP)

SEARCHES = ("grid", "random", "boundary")
SCHEDULERS = ("none", "asha")
# Settings of one training run that a sweep passes through unchanged.
PASSED_THROUGH = ("dataset", "model", "subset", "data_dir", "decoder_var", "num_mc", "epochs", "batch_size",
                  "active_threshold", "iw_samples", "iw_subset", "seed")


@dataclass(frozen=True)
class SweepConfig:
    # the map's axes
    latent_dims: str = "2,5,10,20"
    lrs: str = "1e-3"
    betas: str = "0.1,0.3,1,2,4,8"
    # optional extra axes
    hidden_dims: str = ""
    kl_warmups: str = ""
    free_bits: str = ""
    repeats: int = 1
    search: str = "grid"
    num_samples: int = 16  # random search: configurations drawn
    beta_range: str = "0.01,100"  # boundary search: where to look for the critical beta
    beta_tolerance: float = 1.15  # boundary search: stop when upper / lower <= this
    # each trial's training run
    dataset: str = "mnist"
    model: str = ""
    subset: int = 0
    data_dir: str = ""
    decoder_var: str = "learned"
    num_mc: int = 1
    epochs: int = 10
    batch_size: int = 128
    seed: int = 0
    active_threshold: float = 0.01
    kl_threshold: float = 0.01
    iw_samples: int = 100
    iw_subset: int = 500
    # resources
    workers_per_trial: int = 1
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent: int = 0  # 0: as many as the cluster fits
    scheduler: str = "none"
    max_failures: int = 1
    # where results go
    storage: str = ""  # "" -> $VAE_STORAGE or ./results
    name: str = ""

    def __post_init__(self) -> None:
        for flag in ("latent_dims", "lrs", "betas", "hidden_dims", "kl_warmups", "free_bits"):
            values = parse_list(flag, getattr(self, flag), int if flag in ("latent_dims", "hidden_dims") else float)
            if flag in ("latent_dims", "lrs") + (("betas",) if self.search != "boundary" else ()) and not values:
                raise ConfigError(f"--{flag.replace('_', '-')}: must list at least one value")
        check_int("repeats", self.repeats, 1, 1000)
        check_choice("search", self.search, SEARCHES)
        lo_hi = parse_list("beta_range", self.beta_range, float)
        _check(len(lo_hi) == 2 and 0 < lo_hi[0] < lo_hi[1], "beta_range", "two betas LOW,HIGH with 0 < LOW < HIGH",
               self.beta_range)
        check_float("beta_tolerance", self.beta_tolerance, 1.0, 1e6, lo_open=True)
        if self.search == "boundary":
            for flag in ("hidden_dims", "kl_warmups", "free_bits"):
                _check(not self.axis(flag), flag, "empty with --search boundary (it searches beta per latent "
                       "size and learning rate)", getattr(self, flag))
        check_int("num_samples", self.num_samples, 1, 100_000)
        check_float("kl_threshold", self.kl_threshold, 0.0, 1e6, lo_open=True)
        check_int("workers_per_trial", self.workers_per_trial, 1, 1024)
        check_float("cpus_per_trial", self.cpus_per_trial, 0.0, 1024, lo_open=True)
        check_float("gpus_per_trial", self.gpus_per_trial, 0.0, 64)
        check_int("max_concurrent", self.max_concurrent, 0, 100_000)
        check_choice("scheduler", self.scheduler, SCHEDULERS)
        check_int("max_failures", self.max_failures, -1, 1000)
        check_storage(self.storage)
        check_name("name", self.name)
        self.trial_config()  # every per-trial setting through TrainConfig's own checks
        for z in self.axis("latent_dims"):
            check_int("latent_dims", z, 1, 4096)
        for lr in self.axis("lrs"):
            check_float("lrs", lr, 0.0, 100.0, lo_open=True)
        for b in self.axis("betas"):
            check_float("betas", b, 0.0, 1e6, lo_open=True)

    def axis(self, flag: str) -> list:
        return parse_list(flag, getattr(self, flag), int if flag in ("latent_dims", "hidden_dims") else float)

    def trial_config(self, **overrides: Any) -> TrainConfig:
        """The TrainConfig of one trial: passed-through settings plus the trial's axis values."""
        values = {k: getattr(self, k) for k in PASSED_THROUGH}
        values.update(num_workers=self.workers_per_trial, max_failures=0, storage=self.storage,
                      name=self.name, use_gpu=self.gpus_per_trial > 0,
                      cpus_per_worker=max(1, int(self.cpus_per_trial)))
        values.update(overrides)
        return TrainConfig(**values)

    def param_space(self) -> dict[str, Any]:
        """Tune's param_space: grid_search per axis, or distributions for random search."""
        from ray import tune

        axes: dict[str, list] = {"latent_dim": self.axis("latent_dims"), "lr": self.axis("lrs"),
                                 "beta": self.axis("betas")}
        for flag, key in (("hidden_dims", "hidden_dim"), ("kl_warmups", "kl_warmup_epochs"),
                          ("free_bits", "free_bits")):
            if self.axis(flag):
                axes[key] = self.axis(flag)
        space: dict[str, Any] = {}
        for key, values in axes.items():
            if self.search == "grid":
                space[key] = tune.grid_search(values)
            elif key in ("lr", "beta") and len(values) > 1:
                space[key] = tune.loguniform(min(values), max(values))
            else:
                space[key] = tune.choice(values)
        space["seed"] = tune.grid_search([self.seed + r for r in range(self.repeats)])
        return space

    def n_trials(self) -> int:
        """Trials the sweep runs (boundary search: what bisection needs, an estimate)."""
        if self.search == "boundary":
            lo, hi = parse_list("beta_range", self.beta_range, float)
            steps = math.ceil(math.log2(math.log(hi / lo) / math.log(self.beta_tolerance)))
            return len(self.axis("latent_dims")) * len(self.axis("lrs")) * (2 + max(0, steps)) * self.repeats
        cells = self.num_samples if self.search == "random" else math.prod(
            max(1, len(self.axis(f))) for f in ("latent_dims", "lrs", "betas", "hidden_dims", "kl_warmups",
                                                 "free_bits"))
        return cells * self.repeats


def parse_list(flag: str, text: Any, kind: type) -> list:
    """'2,5,10' (or a YAML list) -> [2, 5, 10]; a bad entry is a one-line ConfigError."""
    items = text if isinstance(text, (list, tuple)) else [t for t in str(text).split(",")]
    if isinstance(text, str) and text.strip() == "":
        return []
    out = []
    for item in items:
        try:
            value = kind(str(item).strip()) if kind is int else float(str(item).strip())
            if kind is int and str(item).strip() != str(value):
                raise ValueError
        except ValueError:
            raise ConfigError(f"--{flag.replace('_', '-')}: must be a comma-separated list of "
                              f"{'integers' if kind is int else 'numbers'} (got {text!r})") from None
        if not math.isfinite(value):
            raise ConfigError(f"--{flag.replace('_', '-')}: must hold finite numbers (got {text!r})")
        out.append(value)
    _check(len(set(out)) == len(out), flag, "a list without repeated values", text)
    return out


SWEEP_HELP = {
    **HELP,
    "latent_dims": "comma-separated latent sizes (an axis of the map)",
    "lrs": "comma-separated learning rates (an axis of the map)",
    "betas": "comma-separated KL weights (an axis of the map)",
    "hidden_dims": "optional axis: comma-separated hidden sizes",
    "kl_warmups": "optional axis: comma-separated KL warm-up lengths in epochs",
    "free_bits": "optional axis: comma-separated free-bits floors (nats)",
    "repeats": "seeds per configuration (seed, seed+1, ...), averaged in the map",
    "search": "grid (every combination), random (--num-samples draws; lr and beta log-uniform in their range) "
              "or boundary (bracket the critical beta of each latent size and lr within --beta-tolerance)",
    "num_samples": "random search: configurations drawn",
    "beta_range": "boundary search: LOW,HIGH betas that bracket the critical beta",
    "beta_tolerance": "boundary search: stop when a bracket's upper / lower beta <= this",
    "kl_threshold": "nats: a dimension with less test KL counts as collapsed",
    "workers_per_trial": "1: each trial trains in its Tune process; more: each trial runs a Ray Train TorchTrainer",
    "cpus_per_trial": "CPUs per trial (per worker with --workers-per-trial > 1)",
    "gpus_per_trial": "GPUs per trial, fractions allowed (0.25: four trials share one GPU)",
    "max_concurrent": "trials at once (0: as many as the cluster's resources fit)",
    "scheduler": "none, or asha: stop trials with a hopeless test loss early (never for collapsing)",
    "max_failures": "retries of a trial that errored (from its last checkpoint)",
    "iw_samples": "importance samples for each trial's final IW NLL (0: skip)",
    "name": "sweep name; --resume --name N finishes it (default: sweep-dataset-model-time)",
}


def sweep_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="jobs.sweep", description="Map posterior collapse with a Ray Tune sweep.",
                           epilog=ENV_HELP)
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file whose keys are these flags")
    parser.add_argument("--resume", action="store_true", help="finish the interrupted sweep --name")
    parser.add_argument("--retry-errored", action="store_true", help="with --resume: rerun errored trials")
    parser.add_argument("--verbose", action="store_true", help="show Ray's own log stream")
    add_config_flags(parser, SweepConfig, help=SWEEP_HELP)
    return parser


def parse_sweep_args(argv: Sequence[str] | None = None) -> tuple[SweepConfig, argparse.Namespace]:
    parser = sweep_parser()
    cfg, args = parse_args(parser, SweepConfig, argv)
    if args.resume and not cfg.name:
        parser.exit(2, "jobs.sweep: error: --resume: needs --name of the sweep to finish\n")
    if args.retry_errored and not args.resume:
        parser.exit(2, "jobs.sweep: error: --retry-errored: only with --resume\n")
    try:
        first = resolve(cfg.trial_config(latent_dim=cfg.axis("latent_dims")[0], name=cfg.name or "x"))
    except ConfigError as e:  # a bad $VAE_STORAGE or $VAE_DATA_DIR
        parser.exit(2, f"jobs.sweep: error: {e}\n")
    name = cfg.name or f"sweep-{first.dataset}-{first.model}-{time.strftime('%Y%m%d-%H%M%S')}"
    return dataclasses.replace(cfg, name=name, storage=first.storage, data_dir=first.data_dir, model=first.model), args
