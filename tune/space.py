"""The sweep's typed config and its Tune search space, validated before Ray starts."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import random
import time
from typing import Any, Sequence

from vae.axes import AXES
from vae.config import (ENV_HELP, HELP, ConfigError, OneLineParser, TrainConfig, add_config_flags, add_preset_flag,
                        check, check_choice, check_float, check_int, check_name, check_storage, finish, parse_args,
                        resolve)

from .packing import member_bytes, queues, slots_for

SEARCHES = ("grid", "random", "boundary")
SCHEDULERS = ("none", "asha", "settled")
# Settings of one training run that a sweep passes through unchanged (their types, defaults and checks
# are TrainConfig's), and the defaults a sweep changes: a cheaper final IW NLL per trial.
PASSED_THROUGH = ("dataset", "model", "subset", "data_dir", "hidden_widths", "activation", "decoder_var", "decoder",
                  "decoder_layers",
                  "objective", "objective_k", "num_mc", "epochs", "until_settled", "max_epochs", "lr_schedule",
                  "batch_size", "seed", "active_threshold", "kl_threshold", "iw_samples", "iw_subset", "eval_subset", "tracker")
SWEEP_DEFAULTS = {"iw_samples": 100, "iw_subset": 500}
TRAIN_TRIAL_CPU = 0.01  # what a trial that launches Ray Train holds itself, beside its workers


class _Sweep:
    """The methods of `SweepConfig` (its fields are derived below, from the axes and from TrainConfig)."""

    def __post_init__(self) -> None:
        for a in AXES:
            values = self.axis(a.flag)
            if a.required and not values and not (a.key == "beta" and self.search == "boundary"):
                raise ConfigError(f"--{a.flag.replace('_', '-')}: must list at least one value")
            for v in values:
                if a.kind is str:
                    check_choice(a.flag, v, a.choices)
                elif a.kind is int:
                    check_int(a.flag, v, int(a.low), int(a.high))
                else:
                    check_float(a.flag, v, a.low, a.high, lo_open=a.low_open)
        check_int("repeats", self.repeats, 1, 1000)
        check_choice("search", self.search, SEARCHES)
        lo_hi = parse_list("beta_range", self.beta_range, float)
        check(len(lo_hi) == 2 and 0 < lo_hi[0] < lo_hi[1], "beta_range", "two betas LOW,HIGH with 0 < LOW < HIGH",
              self.beta_range)
        check_float("beta_tolerance", self.beta_tolerance, 1.0, 1e6, lo_open=True)
        if self.search == "boundary":
            for a in AXES:
                if not a.required:
                    check(not self.axis(a.flag), a.flag, "empty with --search boundary (it searches beta per "
                          "latent size and learning rate)", getattr(self, a.flag))
        check_int("num_samples", self.num_samples, 1, 100_000)
        check_int("workers_per_trial", self.workers_per_trial, 1, 1024)
        check_float("cpus_per_trial", self.cpus_per_trial, 0.0, 1024, lo_open=True)
        check_float("gpus_per_trial", self.gpus_per_trial, 0.0, 64)
        check_int("max_concurrent", self.max_concurrent, 0, 100_000)
        check_choice("scheduler", self.scheduler, SCHEDULERS)
        check_int("max_failures", self.max_failures, -1, 1000)
        check(self.pack == "auto" or (self.pack.isdigit() and 1 <= int(self.pack) <= 1024), "pack",
              "a whole number from 1 to 1024, or auto", self.pack)
        if self.pack != "1":
            check(self.scheduler != "asha", "scheduler", "none or settled with --pack (ASHA stops whole trials; "
                  "a pack's members stop on their own with --until-settled)", self.scheduler)
            check(self.workers_per_trial == 1, "workers_per_trial", "1 with --pack (a pack trains in its trial's "
                  "process; packs are for models too small to spread)", self.workers_per_trial)
            check(self.decoder != "pixelcnn", "pack", "1 with --decoder pixelcnn (its convolutions are not stacked)",
                  self.pack)
        check_storage(self.storage)
        check_name("name", self.name)
        self.trial_config()  # every per-trial setting through TrainConfig's own checks

    def axis(self, flag: str) -> list:
        kind = next((a.kind for a in AXES if a.flag == flag), float)
        return parse_list(flag, getattr(self, flag), kind)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def cpus_per_worker(self) -> int:
        """What each Train worker of a trial asks for: whole CPUs (they set its torch threads)."""
        return max(1, int(self.cpus_per_trial))

    def trial_resources(self) -> dict[str, float]:
        """What Tune reserves for a trial's own process: all it trains on, or, when it launches Ray Train, a
        sliver (its workers ask for their own CPUs and GPUs)."""
        if self.workers_per_trial == 1:
            return {"cpu": self.cpus_per_trial, "gpu": self.gpus_per_trial}
        return {"cpu": TRAIN_TRIAL_CPU}

    def resources_held(self) -> tuple[float, float]:
        """(CPUs, GPUs) one trial holds at once: its own process and, with more than one worker, its Train
        workers as `vae.launch.fit` asks for them (`cpus_per_worker` CPUs and one GPU each)."""
        own = self.trial_resources()
        if self.workers_per_trial == 1:
            return own["cpu"], own["gpu"]
        return (own["cpu"] + self.workers_per_trial * self.cpus_per_worker,
                float(self.workers_per_trial if self.gpus_per_trial > 0 else 0))

    def trial_config(self, **overrides: Any) -> TrainConfig:
        """The resolved TrainConfig of one trial: passed-through settings plus the trial's point."""
        values = {k: getattr(self, k) for k in PASSED_THROUGH}
        values.update(num_workers=self.workers_per_trial, max_failures=0, storage=self.storage,
                      name=self.name or "x", use_gpu=self.gpus_per_trial > 0,
                      cpus_per_worker=self.cpus_per_worker)
        values.update({k: v for k, v in overrides.items()})
        if "latent_dim" not in values:
            values["latent_dim"] = (self.axis("latent_dims") or [0])[0]
        return resolve(TrainConfig(**values))

    def points(self) -> list[dict[str, Any]]:
        """Every configuration of a grid or random search, as the points a pack holds (random: drawn here,
        from --seed, lr and beta log-uniform as Tune would draw them), times the seeds of --repeats."""
        rng = random.Random(self.seed)
        draws = []
        if self.search == "grid":
            axes = [(a.key, self.axis(a.flag)) for a in AXES if self.axis(a.flag)]
            draws = [dict(zip([k for k, _ in axes], combo)) for combo in itertools.product(*[v for _, v in axes])]
        else:
            for _ in range(self.num_samples):
                draw = {}
                for a in AXES:
                    values = self.axis(a.flag)
                    if values and a.log and len(values) > 1:
                        lo, hi = math.log(min(values)), math.log(max(values))
                        draw[a.key] = math.exp(rng.uniform(lo, hi))
                    elif values:
                        draw[a.key] = rng.choice(values)
                draws.append(draw)
        return [{**d, "seed": self.seed + r} for d in draws for r in range(self.repeats)]

    def pack_size(self, slots: int = 1, trial_memory: float = 0.0) -> int:
        """Slots a pack has: --pack, or for auto tune.packing.slots_for the `slots` trials the cluster runs at
        once, at most tune.packing.MAX_AUTO and at most what half of a trial's device memory (`trial_memory`
        bytes, 0: unknown) holds by tune.packing.member_bytes' estimate."""
        if self.pack != "auto":
            return int(self.pack)
        size = slots_for(self.points(), slots, self.trial_config().to_dict(), refill=self.until_settled)
        if trial_memory > 0:
            cfg = self.trial_config(latent_dim=max(self.axis("latent_dims")),
                                    **({"hidden_dim": max(self.axis("hidden_dims"))} if self.axis("hidden_dims") else {}))
            size = min(size, int(0.5 * trial_memory // member_bytes(cfg)))
        return max(1, size)

    def cost(self, point: dict[str, Any]) -> float:
        """A configuration's expected training cost, to start the costliest queues first: its memory estimate
        (which grows with its step's work) times the square root of its latent size (settling takes longer with
        more units: in docs/sweeps.md's map about 15 epochs at latent 2, 20 at 10, 35 to 60 at 50)."""
        cfg = self.trial_config(**{k: v for k, v in point.items() if k in ("latent_dim", "hidden_dim")})
        return member_bytes(cfg) * math.sqrt(cfg.latent_dim)

    def param_space(self, pack: int = 1, concurrent: int = 1) -> dict[str, Any]:
        """Tune's param_space: one grid_search over the packs' queues (`members`, tune.packing.queues, the
        costliest first) and the slots each pack has (`slots`); with one slot a pack every configuration is a
        trial of its own. Random search draws its points in `points` (from --seed), so every search's trials are
        the same lists of points."""
        from ray import tune  # Ray stays out of argument parsing

        shared = self.trial_config().to_dict()
        costs: dict[tuple, float] = {}

        def cost(point: dict[str, Any]) -> float:
            key = (point.get("latent_dim"), point.get("hidden_dim"))
            if key not in costs:
                costs[key] = self.cost(point)
            return costs[key]

        return {"members": tune.grid_search(queues(self.points(), pack, concurrent, shared, cost)), "slots": pack}

    def n_trials(self) -> int:
        """Trials the sweep runs (boundary search: what bisection needs, an estimate)."""
        if self.search == "boundary":
            lo, hi = parse_list("beta_range", self.beta_range, float)
            steps = math.ceil(math.log2(math.log(hi / lo) / math.log(self.beta_tolerance)))
            return len(self.axis("latent_dims")) * len(self.axis("lrs")) * (2 + max(0, steps)) * self.repeats
        cells = self.num_samples if self.search == "random" else math.prod(
            max(1, len(self.axis(a.flag))) for a in AXES)
        return cells * self.repeats


def _train_field(name: str) -> tuple[str, Any, dataclasses.Field]:
    f = next(f for f in dataclasses.fields(TrainConfig) if f.name == name)
    return name, f.type, dataclasses.field(default=SWEEP_DEFAULTS.get(name, f.default))


SweepConfig = dataclasses.make_dataclass(
    "SweepConfig",
    # the map's axes, one list flag each (vae/axes.py)
    [(a.flag, "str", dataclasses.field(default=a.default)) for a in AXES] + [
        ("repeats", "int", dataclasses.field(default=1)),
        ("search", "str", dataclasses.field(default="grid")),
        ("num_samples", "int", dataclasses.field(default=16)),  # random search: configurations drawn
        ("beta_range", "str", dataclasses.field(default="0.01,100")),  # boundary search: where to look
        ("beta_tolerance", "float", dataclasses.field(default=1.15)),  # boundary search: stop at upper/lower
    ]
    # each trial's training run: TrainConfig's own fields, types and defaults
    + [_train_field(name) for name in PASSED_THROUGH] + [
        # resources
        ("workers_per_trial", "int", dataclasses.field(default=1)),
        ("cpus_per_trial", "float", dataclasses.field(default=1.0)),
        ("gpus_per_trial", "float", dataclasses.field(default=0.0)),
        ("max_concurrent", "int", dataclasses.field(default=0)),  # 0: as many as the cluster fits
        ("scheduler", "str", dataclasses.field(default="none")),
        ("max_failures", "int", dataclasses.field(default=1)),  # retries of an errored trial
        ("pack", "str", dataclasses.field(default="1")),  # configurations per trial (vae/training/pack.py), or auto
        # where results go
        ("storage", "str", dataclasses.field(default="")),  # "" -> $VAE_STORAGE or ./results
        ("name", "str", dataclasses.field(default="")),
    ],
    bases=(_Sweep,), frozen=True, namespace={"__module__": __name__})
SweepConfig.__doc__ = "The sweep's typed config: its axes, the trials' settings and their resources."


def parse_list(flag: str, text: Any, kind: type) -> list:
    """'2,5,10' (or a YAML list) -> [2, 5, 10]; a bad entry is a one-line ConfigError."""
    items = text if isinstance(text, (list, tuple)) else [t for t in str(text).split(",")]
    if isinstance(text, str) and text.strip() == "":
        return []
    out = []
    for item in items:
        if kind is str:
            out.append(str(item).strip())
            continue
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
    check(len(set(out)) == len(out), flag, "a list without repeated values", text)
    return out


SWEEP_HELP = {
    **HELP,
    **{a.flag: a.help for a in AXES},
    "repeats": "seeds per configuration (seed, seed+1, ...), averaged in the map",
    "search": "grid (every combination), random (--num-samples draws; lr and beta log-uniform in their range) "
              "or boundary (bracket the critical beta of each latent size and lr within --beta-tolerance)",
    "num_samples": "random search: configurations drawn",
    "beta_range": "boundary search: LOW,HIGH betas that bracket the critical beta",
    "beta_tolerance": "boundary search: stop when a bracket's upper / lower beta <= this",
    "workers_per_trial": "1: each trial trains in its Tune process; more: each trial runs a Ray Train TorchTrainer",
    "cpus_per_trial": "CPUs per trial (with --workers-per-trial > 1: per worker, whole CPUs, at least 1)",
    "gpus_per_trial": "GPUs per trial, fractions allowed (0.25: four trials share one GPU)",
    "max_concurrent": "trials at once (0: as many as the cluster's resources fit)",
    "scheduler": "none; asha: stop trials with a hopeless test loss early (never for collapsing); settled: stop "
                 "a trial once its collapse state has settled, never before",
    "max_failures": "retries of a trial that errored (from its last checkpoint)",
    "pack": "configurations of one shape trained as one vectorised model per trial (1: a trial each); auto: "
            "spread them over the trials the cluster runs at once, at most 64 a pack and what half of a trial's "
            "memory holds",
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
    parser.add_argument("--print-config", action="store_true",
                        help="print the fully resolved config as YAML (what --config takes) and exit")
    add_preset_flag(parser)
    add_config_flags(parser, SweepConfig, help=SWEEP_HELP)
    return parser


def finish_parse(cfg: SweepConfig) -> SweepConfig:
    """Fill what depends on the environment and the other settings: name, storage, data folder, model."""
    first = cfg.trial_config()
    name = cfg.name or f"sweep-{first.dataset}-{first.model}-{time.strftime('%Y%m%d-%H%M%S')}"
    return dataclasses.replace(cfg, name=name, storage=first.storage, data_dir=first.data_dir, model=first.model)


def parse_sweep_args(argv: Sequence[str] | None = None) -> tuple[SweepConfig, argparse.Namespace]:
    parser = sweep_parser()
    cfg, args = parse_args(parser, SweepConfig, argv)
    if args.resume and not cfg.name:
        parser.exit(2, "jobs.sweep: error: --resume: needs --name of the sweep to finish\n")
    if args.retry_errored and not args.resume:
        parser.exit(2, "jobs.sweep: error: --retry-errored: only with --resume\n")
    try:
        return finish(parser, finish_parse(cfg), args)
    except ConfigError as e:  # a bad $VAE_STORAGE or $VAE_DATA_DIR
        parser.exit(2, f"jobs.sweep: error: {e}\n")
