"""The typed run config: one frozen dataclass per training run, validated once.

Everything inside `vae/` trusts a `TrainConfig`; only `jobs/` builds one from
flags or YAML (through `parse_train_args`), and every bad value becomes a
`ConfigError` whose message is one line naming the flag and what is allowed.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import os
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import yaml

DATASETS = ("mnist", "binarized-mnist", "gaussian2d")
IMAGE_DATASETS = ("mnist", "binarized-mnist")  # Bernoulli decoders' data
MODELS = ("mlp", "gaussian-mlp", "linear")
ACTIVATIONS = ("relu", "tanh")
OBJECTIVES = ("elbo", "iwae")
DECODERS = ("factorised", "autoregressive", "pixelcnn")
# Posterior-collapse mitigations (each also an axis of a sweep): KL warm-up and free bits take their own flags'
# values, or these defaults when those are 0; cyclical KL annealing (Fu et al. 2019); aggressive inference-network
# training (He et al. 2019).
MITIGATIONS = ("none", "warmup", "cyclical", "free-bits", "aggressive")
WARMUP_SHARE = 0.1  # --mitigation warmup without --kl-warmup-epochs: the first tenth of the budget
FREE_BITS_DEFAULT = 0.5  # --mitigation free-bits without --free-bits: nats per latent dimension
LR_SCHEDULES = ("auto", "constant", "cosine", "plateau", "burda")
TRACKERS = ("none", "tensorboard", "mlflow")  # vae/training/tracking.py
DEFAULT_MODEL = {"mnist": "mlp", "binarized-mnist": "mlp", "gaussian2d": "gaussian-mlp"}
DEFAULT_LATENT = {"mnist": 20, "binarized-mnist": 20, "gaussian2d": 2}  # the pytorch/examples VAE, the 2-D toy
DEFAULT_HIDDEN = {"mnist": 400, "binarized-mnist": 400, "gaussian2d": 64}
# Named sets of flag values (`--preset`): given flags and --config keys override them.
PRESETS: dict[str, dict[str, Any]] = {
    # Burda, Grosse & Salakhutdinov (2015), one stochastic layer: 784-200-200-50 with tanh, batch 20, Adam at
    # 1e-3 * 10^(-i/7) for 3^i passes, i = 0..7 (3,280 epochs; `lr_schedule: burda` keeps the stages' shares
    # of a shorter --epochs)
    "burda2015": {"model": "mlp", "hidden_widths": "200,200", "activation": "tanh", "latent_dim": 50,
                  "batch_size": 20, "lr": 1e-3, "lr_schedule": "burda", "epochs": 3280},
}
STORAGE_SCHEMES = ("", "file", "s3", "gs", "gcs", "hdfs", "abfs", "abfss")
DATA_DIR_ENV, OFFLINE_ENV = "VAE_DATA_DIR", "VAE_OFFLINE"
WIDTHS = re.compile(r"^(?:[1-9]\d{0,4}|65536)(?:,(?:[1-9]\d{0,4}|65536)){0,7}$")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# The collapse thresholds' defaults, owned here; every reader takes the thresholds a run recorded.
ACTIVE_THRESHOLD = 0.01  # Var_x E_q[z_j] above this: the unit is active (Burda et al. 2015)
KL_THRESHOLD = 0.01  # nats: a dimension with less test KL carries no information


# What members of one pack must share (the rest: lr, beta, seed, warm-up, free bits, fixed decoder
# variance, may differ). From a sweep, only the axes latent_dim and hidden_dim vary among these.
SHAPE_KEYS = ("dataset", "model", "subset", "latent_dim", "hidden_dim", "hidden_widths", "activation",
              "decoder", "decoder_layers", "objective", "objective_k", "batch_size", "num_mc", "epochs", "until_settled", "max_epochs",
              "lr_schedule", "num_workers", "active_threshold", "kl_threshold", "iw_samples", "iw_subset", "eval_subset")


class ConfigError(ValueError):
    """A bad setting; the message is one line meant for the user."""


@dataclass(frozen=True)
class TrainConfig:
    # data
    dataset: str = "mnist"
    subset: int = 0  # first N training images (0: all)
    data_dir: str = ""  # "" -> $VAE_DATA_DIR or ./data
    # model
    model: str = ""  # "" -> the dataset's default model
    latent_dim: int = 0  # 0 -> 20 for mnist, 2 for gaussian2d
    hidden_dim: int = 0  # 0 -> 400 for mnist, 64 for gaussian2d
    hidden_widths: str = ""  # "200,200": the MLP's hidden layers, decoder mirrored ("" -> one of hidden_dim)
    activation: str = "relu"  # the MLP's hidden activation
    decoder_var: str = "learned"  # Gaussian decoders: "learned" or a fixed variance
    decoder: str = "factorised"  # Bernoulli decoders: factorised, autoregressive (MADE) or pixelcnn
    decoder_context: int = 784  # autoregressive: each pixel also sees the previous W pixels (0: factorised)
    decoder_layers: int = 4  # pixelcnn: gated masked-convolution layers
    mitigation: str = "none"  # none, warmup, cyclical, free-bits, aggressive
    # objective
    objective: str = "elbo"  # elbo, or iwae (Burda et al. 2015) with objective_k importance samples
    objective_k: int = 1
    beta: float = 1.0
    kl_warmup_epochs: float = 0.0
    free_bits: float = 0.0
    num_mc: int = 1
    # optimisation
    epochs: int = 10  # with until_settled: the minimum
    until_settled: bool = False  # train until the collapse state has settled (vae/training/settle.py) or max_epochs
    max_epochs: int = 0  # with until_settled: the budget (0: 10 x epochs)
    batch_size: int = 128  # global: split evenly over the workers
    lr: float = 1e-3
    lr_schedule: str = "auto"
    seed: int = 0
    # diagnostics
    active_threshold: float = ACTIVE_THRESHOLD
    kl_threshold: float = KL_THRESHOLD
    iw_samples: int = 1000
    iw_subset: int = 1000
    eval_subset: int = 0  # test examples evaluated at epochs before the last (0: all); the last sees them all
    # scaling (None: decided from the cluster by the job)
    num_workers: int = 1
    use_gpu: bool | None = None
    cpus_per_worker: int = 0  # 0: the cluster's CPUs shared out by the job
    max_failures: int = 0
    node_wait: float = 600.0  # seconds to wait, after a node is lost, for the capacity the workers need
    tracker: str = "none"  # tensorboard: event files beside the tables, one folder per trial
    # where results go
    storage: str = ""  # "" -> $VAE_STORAGE or ./results
    name: str = ""  # "" -> derived from the time and the config
    trial_id: str = ""  # "" -> the run name (a sweep sets one per trial)

    def __post_init__(self) -> None:
        validate(self)

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def fixed_decoder_var(self) -> float | None:
        return None if self.decoder_var == "learned" else float(self.decoder_var)

    @property
    def widths(self) -> tuple[int, ...]:
        """The MLP's hidden widths, input side first."""
        return tuple(int(w) for w in self.hidden_widths.split(",")) if self.hidden_widths else (self.hidden_dim,)

    @property
    def train_samples(self) -> int:
        """Samples of z per input in a training step: the IWAE's k, else --num-mc."""
        return self.objective_k if self.objective == "iwae" else self.num_mc

    @property
    def budget(self) -> int:
        """The most epochs this run may train."""
        return (self.max_epochs or 10 * self.epochs) if self.until_settled else self.epochs

    @property
    def schedule(self) -> str:
        """The learning-rate schedule in force (auto resolved)."""
        if self.lr_schedule != "auto":
            return self.lr_schedule
        return "cosine" if self.until_settled else "constant"

    @property
    def run_id(self) -> str:
        return self.trial_id or self.name


# ---------------------------------------------------------------- validation

def shown(value: Any, limit: int = 80) -> str:
    """repr(value), cut to `limit` characters: an error line never echoes an unbounded value."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def check(ok: bool, flag: str, allowed: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"--{flag.replace('_', '-')}: must be {allowed} (got {shown(value)})")


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_int(flag: str, value: Any, lo: int, hi: int) -> None:
    check(isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi,
           flag, f"an integer in [{lo}, {hi}]", value)


def check_float(flag: str, value: Any, lo: float, hi: float, *, lo_open: bool = False) -> None:
    ok = _finite(value) and (value > lo if lo_open else value >= lo) and value <= hi
    check(ok, flag, f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}]", value)


def check_choice(flag: str, value: Any, choices: Sequence[str]) -> None:
    check(value in choices, flag, "one of " + ", ".join(choices), value)


def check_storage(value: Any) -> None:
    check(isinstance(value, str), "storage", "a path or URI", value)
    if value == "":
        return  # the default: $VAE_STORAGE or ./results
    scheme = value.split("://", 1)[0].lower() if "://" in value else ""
    check(scheme in STORAGE_SCHEMES, "storage",
           "a local path or a URI with scheme " + ", ".join(s for s in STORAGE_SCHEMES if s), value)


def check_name(flag: str, value: str) -> None:
    check(value == "" or (isinstance(value, str) and bool(NAME_PATTERN.fullmatch(value))), flag,
           "1-128 letters, digits, '.', '_' or '-', starting with a letter or digit", value)


def validate(c: TrainConfig) -> None:
    check_choice("dataset", c.dataset, DATASETS)
    check_int("subset", c.subset, 0, 10_000_000)
    if c.model:
        check_choice("model", c.model, MODELS)
        if c.model == "mlp" and c.dataset not in IMAGE_DATASETS:
            raise ConfigError("--model: mlp has a Bernoulli decoder for [0, 1] pixels; "
                              f"use gaussian-mlp or linear with --dataset {c.dataset}")
    check_int("latent_dim", c.latent_dim, 0, 4096)
    check_int("hidden_dim", c.hidden_dim, 0, 65536)
    check(isinstance(c.hidden_widths, str) and (c.hidden_widths == "" or bool(WIDTHS.fullmatch(c.hidden_widths))),
          "hidden_widths", "a comma-separated list of 1 to 8 widths, each 1 to 65536 (e.g. 200,200)", c.hidden_widths)
    check_choice("activation", c.activation, ACTIVATIONS)
    check_choice("decoder", c.decoder, DECODERS)
    check_int("decoder_context", c.decoder_context, 0, 1_000_000)
    check_int("decoder_layers", c.decoder_layers, 1, 64)
    check_choice("mitigation", c.mitigation, MITIGATIONS)
    if c.decoder != "factorised" or c.mitigation == "aggressive":
        check(c.model in ("", "mlp") and c.dataset in IMAGE_DATASETS, "decoder" if c.decoder != "factorised"
              else "mitigation", f"used with --model mlp on an image data set ({c.decoder} decoder, "
              f"{c.mitigation} training)", c.decoder if c.decoder != "factorised" else c.mitigation)
    check_choice("objective", c.objective, OBJECTIVES)
    check_int("objective_k", c.objective_k, 1, 5000)
    if c.objective == "iwae":
        check(c.free_bits == 0, "free_bits", "0 with --objective iwae (free bits floor the analytic KL, which "
              "the IWAE bound does not have)", c.free_bits)
    if c.decoder_var != "learned":
        try:
            var = float(c.decoder_var)
        except (TypeError, ValueError):
            var = float("nan")
        check(math.isfinite(var) and 0 < var <= 1e6, "decoder_var",
               "'learned' or a variance in (0, 1e6]", c.decoder_var)
    check_float("beta", c.beta, 0.0, 1e6)
    check_float("kl_warmup_epochs", c.kl_warmup_epochs, 0.0, 1e6)
    check_float("free_bits", c.free_bits, 0.0, 1e3)
    check_int("num_mc", c.num_mc, 1, 1024)
    check_int("epochs", c.epochs, 1, 100_000)
    check(isinstance(c.until_settled, bool), "until_settled", "true or false", c.until_settled)
    check_int("max_epochs", c.max_epochs, 0, 1_000_000)
    check(c.max_epochs == 0 or c.max_epochs >= c.epochs, "max_epochs",
          f"0 or at least --epochs ({c.epochs}), the minimum", c.max_epochs)
    check_choice("lr_schedule", c.lr_schedule, LR_SCHEDULES)
    check_int("batch_size", c.batch_size, 1, 1_000_000)
    check_float("lr", c.lr, 0.0, 100.0, lo_open=True)
    check_int("seed", c.seed, 0, 2**31 - 1)
    check_float("active_threshold", c.active_threshold, 0.0, 1e6, lo_open=True)
    check_float("kl_threshold", c.kl_threshold, 0.0, 1e6, lo_open=True)
    check_int("iw_samples", c.iw_samples, 0, 100_000)
    check_int("iw_subset", c.iw_subset, 0, 1_000_000)
    check_int("eval_subset", c.eval_subset, 0, 10_000_000)
    check_int("num_workers", c.num_workers, 1, 4096)
    check(c.use_gpu in (None, True, False), "use_gpu", "true, false or unset", c.use_gpu)
    check_int("cpus_per_worker", c.cpus_per_worker, 0, 1024)
    check_int("max_failures", c.max_failures, -1, 1_000_000)
    check_float("node_wait", c.node_wait, 0.0, 1e7)
    check_choice("tracker", c.tracker, TRACKERS)
    if c.tracker != "none":
        check(importlib.util.find_spec(c.tracker) is not None, "tracker",
              f"installed to be used: pip install 'vae-collapse[trackers]' ({c.tracker})", c.tracker)
    check(c.batch_size >= c.num_workers, "batch_size",
           f"at least --num-workers ({c.num_workers}), as it is the global batch", c.batch_size)
    check_storage(c.storage)
    check_name("name", c.name)
    check_name("trial_id", c.trial_id)


def resolve(c: TrainConfig) -> TrainConfig:
    """Fill the settings whose default depends on others (model, sizes, data_dir, name, storage)."""
    model = c.model or DEFAULT_MODEL[c.dataset]
    latent_dim = c.latent_dim or DEFAULT_LATENT[c.dataset]
    hidden_dim = c.hidden_dim or DEFAULT_HIDDEN[c.dataset]
    data_dir = os.path.abspath(c.data_dir) if c.data_dir else default_data_dir()
    name = c.name or f"{c.dataset}-{model}-z{latent_dim}-b{c.beta:g}-{time.strftime('%Y%m%d-%H%M%S')}"
    storage = absolute_storage(c.storage)
    check(c.tracker != "tensorboard" or "://" not in storage, "tracker",
          "used with a local --storage (TensorBoard writes its event files locally)", c.tracker)
    check(c.tracker != "mlflow" or "://" not in storage or bool(os.environ.get("MLFLOW_TRACKING_URI")), "tracker",
          "given MLFLOW_TRACKING_URI with a bucket --storage (its default store is <run>/mlruns, local)", c.tracker)
    context = c.decoder_context if c.decoder == "autoregressive" else 0  # only an autoregressive decoder has one
    budget = (c.max_epochs or 10 * c.epochs) if c.until_settled else c.epochs
    warmup = c.kl_warmup_epochs or (max(1.0, round(WARMUP_SHARE * budget)) if c.mitigation == "warmup" else 0.0)
    free_bits = c.free_bits or (FREE_BITS_DEFAULT if c.mitigation == "free-bits" else 0.0)
    return c.replace(model=model, latent_dim=latent_dim, hidden_dim=hidden_dim, data_dir=data_dir, name=name,
                     storage=storage, kl_warmup_epochs=float(warmup), free_bits=float(free_bits), decoder_context=context)


def is_resolved(c: TrainConfig) -> bool:
    """Whether `resolve` has filled `c` already (an entry point resolves a config once, on its way in)."""
    return bool(c.model and c.latent_dim and c.hidden_dim and c.data_dir and c.name) \
        and c.storage == absolute_storage(c.storage)


def default_data_dir() -> str:
    """Where data lives when --data-dir is not given: $VAE_DATA_DIR, else ./data (the tests use the same)."""
    return os.path.abspath(os.environ.get(DATA_DIR_ENV, "") or "./data")


def offline() -> bool:
    """$VAE_OFFLINE set (to anything but 0): never download; data must already be on disk."""
    return os.environ.get(OFFLINE_ENV, "").strip() not in ("", "0")


def absolute_storage(storage: str) -> str:
    """The storage to use ("": $VAE_STORAGE or ./results), local paths made absolute.

    Workers run in other folders than the driver, so a relative path must be pinned here.
    """
    storage = storage or os.environ.get("VAE_STORAGE", "") or "./results"
    check_storage(storage)
    if "://" in storage:
        return storage[len("file://"):] if storage.startswith("file://") else storage
    return os.path.abspath(os.path.expanduser(storage))


# -------------------------------------------------------- flags and YAML files

class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad argument as one line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        # argparse quotes the raw arguments: escape control characters (a stray \x1e would break the line)
        # and cut what could be unbounded
        message = "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in message)
        self.exit(2, f"{self.prog}: error: {message[:300]}\n")


def number(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'}: {text!r}")
    convert.__name__ = kind.__name__
    return convert


def boolean(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"not true/false: {text!r}")


HELP = {
    "dataset": "mnist (grey, the pytorch/examples VAE's data), binarized-mnist (binarized afresh each epoch; the "
               "test set once; the literature's data) or gaussian2d (the correlated 2-D Gaussian toy)",
    "subset": "train on the first N training examples only (0: all)",
    "data_dir": "MNIST root in torchvision's layout (default: $VAE_DATA_DIR or ./data; downloaded when absent)",
    "model": "mlp (Bernoulli decoder), gaussian-mlp (learned output variance) or linear "
             "(default: mlp for mnist, gaussian-mlp for gaussian2d)",
    "latent_dim": "latent size (0: 20 for mnist, 2 for gaussian2d)",
    "hidden_dim": "hidden layer width (0: 400 for mnist, 64 for gaussian2d)",
    "hidden_widths": "the MLP's hidden layers as widths, input side first, the decoder mirrored (e.g. 200,200; "
                     "default: one layer of --hidden-dim)",
    "activation": "the MLP's hidden activation: relu (pytorch/examples) or tanh (Burda et al. 2015)",
    "decoder": "Bernoulli decoders: factorised (each pixel from z alone), autoregressive (a MADE layer also reads "
               "the previous --decoder-context pixels) or pixelcnn (a small gated PixelCNN on z)",
    "decoder_context": "autoregressive decoder: W, the previous pixels in raster order each pixel sees (0: the "
                       "factorised decoder; 784: fully autoregressive)",
    "decoder_layers": "pixelcnn decoder: gated masked-convolution layers",
    "mitigation": "against posterior collapse: none, warmup (KL warm-up: --kl-warmup-epochs, default a tenth of the "
                  "budget), cyclical (KL weight 0 -> beta over the first half of each of 4 cycles; Fu et al. 2019), "
                  "free-bits (--free-bits, default 0.5 nats) or aggressive (encoder-only steps until the bound "
                  "stops improving, while I(x; z) rises; He et al. 2019)",
    "objective": "elbo, or iwae: the importance-weighted bound of Burda et al. (2015) with --objective-k samples",
    "objective_k": "importance samples per input for --objective iwae (1: the ELBO)",
    "decoder_var": "Gaussian decoders: 'learned' or a fixed observation variance",
    "beta": "KL weight of the objective (recon + beta * KL)",
    "kl_warmup_epochs": "raise the KL weight linearly from 0 to beta over this many epochs",
    "free_bits": "per-dimension floor (nats) on the batch-mean KL in the training objective",
    "num_mc": "Monte Carlo samples of z per input",
    "epochs": "training epochs (with --until-settled: the minimum)",
    "until_settled": "train until every unit is clearly in use or unused and the count holds (see the README), "
                     "or --max-epochs",
    "max_epochs": "with --until-settled: the epoch budget (0: 10 x --epochs)",
    "lr_schedule": "auto (cosine with --until-settled, else constant), constant, cosine (to 0 over the budget), "
                   "plateau (halve on a flat training loss) or burda (x 10^(-i/7) for stage i = 0..7 of 3^i "
                   "passes, the stages scaled to the budget)",
    "batch_size": "global batch size (split evenly over the workers)",
    "lr": "Adam learning rate",
    "seed": "random seed (data order, initialisation, noise)",
    "active_threshold": "a latent unit is active when Var_x(E_q[z_j]) exceeds this",
    "kl_threshold": "nats: a unit is in use when it is active and its test KL is at least this",
    "iw_samples": "importance samples for the final IW NLL bound (0: skip it)",
    "iw_subset": "test examples used for the IW NLL bound (0: the whole test set)",
    "eval_subset": "test examples each epoch's diagnostics and settle rule use (the first N; 0: all); a run's "
                   "last epoch is always evaluated on the whole test set",
    "num_workers": "Ray Train data-parallel workers",
    "use_gpu": "true/false (default: GPU when the cluster has one)",
    "cpus_per_worker": "CPUs (and torch threads) per worker (0: the cluster's CPUs shared out)",
    "max_failures": "worker-group restarts from the latest checkpoint (-1: unlimited)",
    "node_wait": "seconds a run waits, once a node is lost and the nodes left cannot hold its workers, for "
                 "capacity to come back (a cloud autoscaler replaces the node) before it exits 1 saying how to resume",
    "tracker": "none; tensorboard: per-epoch metrics as TensorBoard event files in <run>/tensorboard/<trial>; "
               "mlflow: one MLflow run per trial in $MLFLOW_TRACKING_URI or <run>/mlruns "
               "(pip install 'vae-collapse[trackers]')",
    "storage": "local path or pyarrow.fs URI (s3://bucket/prefix) for tables and checkpoints "
               "(default: $VAE_STORAGE or ./results)",
    "name": "run name; rerunning a name resumes it (default: dataset-model-z-b-time)",
    "trial_id": "trial id in the tables (default: the run name)",
}


def add_config_flags(parser: argparse.ArgumentParser, cls: type, help: Mapping[str, str] | None = None) -> None:
    """One flag per dataclass field, defaulting to 'not given' so YAML can fill it."""
    help = HELP if help is None else help
    for f in dataclasses.fields(cls):
        kind = {"int": number(int), "float": number(float), "bool | None": boolean,
                "bool": boolean}.get(str(f.type), str)
        default = f.default
        switch = {"nargs": "?", "const": True} if str(f.type) == "bool" else {}  # --until-settled alone: true
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kind, **switch,
                            default=argparse.SUPPRESS, metavar=f.name.upper(),
                            help=help.get(f.name, "") + (f" (default: {default})" if default not in ("", None) else ""))


YAML_MAX_BYTES = 64 * 1024
YAML_MAX_NODES = 10_000  # after alias expansion: a config is a flat mapping of a few dozen values


def _expanded_nodes(node, memo: dict[int, int]) -> int:
    """How many nodes `node` stands for once every alias is expanded (shared nodes counted each time)."""
    if id(node) in memo:
        return memo[id(node)]
    memo[id(node)] = YAML_MAX_NODES + 1  # a cycle expands without end
    if isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_nodes(k, memo) + _expanded_nodes(v, memo) for k, v in node.value)
    elif isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_nodes(v, memo) for v in node.value)
    else:
        size = 1
    memo[id(node)] = min(size, YAML_MAX_NODES + 1)
    return memo[id(node)]


def config_yaml(config: Any) -> str:
    """A config (a dataclass or its dict) as the YAML `--config` takes back as is (`config.yaml` in every run
    folder)."""
    values = dict(config) if isinstance(config, Mapping) else dataclasses.asdict(config)
    return yaml.safe_dump(values, sort_keys=False, default_flow_style=False)


def load_yaml(path: str) -> dict[str, Any]:
    """A --config file as {field: value}. Refused with one line: unreadable, not UTF-8, empty, larger than
    64 KiB, aliases that expand past 10,000 nodes, duplicate keys, not a mapping, not YAML."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(YAML_MAX_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"--config: cannot read {path}: {e.strerror}")
    if len(raw) > YAML_MAX_BYTES:
        raise ConfigError(f"--config: {path} is larger than {YAML_MAX_BYTES // 1024} KiB")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"--config: {path} is not UTF-8 text (byte {e.start})")
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        if root is None:
            raise ConfigError(f"--config: {path} is empty")
        if _expanded_nodes(root, {}) > YAML_MAX_NODES:
            raise ConfigError(f"--config: {path} expands (through aliases) past {YAML_MAX_NODES} values")
        if not isinstance(root, yaml.MappingNode):
            raise ConfigError(f"--config: {path} must hold a mapping of flag names to values")
        keys = [str(k.value).replace("-", "_") for k, _ in root.value if isinstance(k, yaml.ScalarNode)]
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        if dupes:
            raise ConfigError(f"--config: {path} gives {shown(dupes[0], 40)} more than once")
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"--config: {path} is not valid YAML ({str(e).splitlines()[0][:120]})")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def with_preset(cls: type, values: Mapping[str, Any]) -> dict[str, Any]:
    """`values` over the preset they name (`preset: burda2015`), if any: the preset fills what they do not
    give. A sweep takes a preset's single values for its lists (latent_dim -> latent_dims, lr -> lrs)."""
    values = dict(values)
    preset = values.pop("preset", None)
    if preset in (None, ""):
        return values
    check_choice("preset", preset, tuple(PRESETS))
    names = {f.name for f in dataclasses.fields(cls)}
    for key, value in PRESETS[preset].items():
        target = key if key in names else key + "s" if key + "s" in names else None
        if target and target not in values:
            values[target] = value if target == key else str(value)
    return values


def build(cls: type, values: Mapping[str, Any], source: str = "--config") -> Any:
    """Make a config dataclass from plain values (over the preset they name), with one-line errors."""
    values = with_preset(cls, values)
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(f"{source}: unknown key {shown(unknown[0], 40)}; allowed: {', '.join(names)}")
    coerced = {}
    for key, value in values.items():
        kind = str(names[key].type)
        if kind == "float" and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if kind == "str" and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        expected = {"int": int, "float": float, "str": str, "bool": bool, "bool | None": (bool, type(None))}
        want = expected.get(kind)
        if want is not None and (not isinstance(value, want) or (want is int and isinstance(value, bool))):
            raise ConfigError(f"--{key.replace('_', '-')}: must be {kind} (got {shown(value)})")
        coerced[key] = value
    return cls(**coerced)


def parse_args(parser: argparse.ArgumentParser, cls: type, argv: Sequence[str] | None) -> tuple[Any, argparse.Namespace]:
    """Flags override YAML (--config) which overrides the dataclass defaults.

    A bad value exits 2 with one line on stderr; nothing else has happened yet.
    """
    args = parser.parse_args(argv)
    given = {k: v for k, v in vars(args).items() if k in {f.name for f in dataclasses.fields(cls)}}
    try:
        values = load_yaml(args.config) if getattr(args, "config", None) else {}
        values.update(given)
        if getattr(args, "preset", None):
            values["preset"] = args.preset
        return build(cls, values), args
    except ConfigError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")


ENV_HELP = ("environment: VAE_DATA_DIR: MNIST's folder (default ./data); VAE_OFFLINE=1: never download it. "
            "VAE_STORAGE: the default --storage.")


def add_preset_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", metavar="NAME", help="a named set of flag values that given flags override: "
                        + "; ".join(f"{k} = " + " ".join(f"--{f.replace('_', '-')} {v}" for f, v in p.items())
                                    for k, p in PRESETS.items()))


def train_parser(prog: str = "jobs.train") -> argparse.ArgumentParser:
    parser = OneLineParser(prog=prog, description="Train a VAE with Ray Train and write Parquet tables.",
                           epilog=ENV_HELP)
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file whose keys are these flags")
    parser.add_argument("--verbose", action="store_true", help="show Ray's own log stream")
    parser.add_argument("--print-config", action="store_true",
                        help="print the fully resolved config as YAML (what --config takes) and exit")
    add_preset_flag(parser)
    add_config_flags(parser, TrainConfig)
    return parser


def finish(parser: argparse.ArgumentParser, config: Any, args: argparse.Namespace) -> tuple[Any, argparse.Namespace]:
    """The resolved config, or with --print-config: it printed as YAML and exit 0."""
    if getattr(args, "print_config", False):
        print(config_yaml(config), end="", flush=True)  # stdout: pipe it into a file
        parser.exit(0)
    return config, args


def parse_train_args(argv: Sequence[str] | None = None) -> tuple[TrainConfig, argparse.Namespace]:
    parser = train_parser()
    config, args = parse_args(parser, TrainConfig, argv)
    try:
        return finish(parser, resolve(config), args)
    except ConfigError as e:  # a bad $VAE_STORAGE or $VAE_DATA_DIR
        parser.exit(2, f"{parser.prog}: error: {e}\n")
