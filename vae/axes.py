"""The axes a sweep may vary: one table, from which flags, checks, the search space, trial ids, the map's
cells and the `collapse_map` schema are all derived. A new axis is one line here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Axis:
    flag: str  # the sweep's comma-separated list flag, as a field name (latent_dims -> --latent-dims)
    key: str  # the TrainConfig field a trial gets, and the column in the tables
    kind: type  # int, float or str
    cell: bool  # splits a map cell (beta is the map's own axis inside a cell)
    required: bool  # grid and random search need at least one value
    log: bool  # random search draws it log-uniform between the list's smallest and largest values
    low: float  # values must lie in [low, high], or (low, high] when low_open
    high: float
    low_open: bool
    default: str  # the sweep's default list ("" for an optional axis)
    help: str
    choices: tuple[str, ...] = ()  # a str axis: the values allowed


AXES = (
    Axis("latent_dims", "latent_dim", int, True, True, False, 1, 4096, False, "2,5,10,20",
         "comma-separated latent sizes (an axis of the map)"),
    Axis("lrs", "lr", float, True, True, True, 0.0, 100.0, True, "1e-3",
         "comma-separated learning rates (an axis of the map)"),
    Axis("betas", "beta", float, False, True, True, 0.0, 1e6, True, "0.1,0.3,1,2,4,8",
         "comma-separated KL weights (an axis of the map)"),
    Axis("hidden_dims", "hidden_dim", int, True, False, False, 1, 65536, False, "",
         "optional axis: comma-separated hidden sizes"),
    Axis("kl_warmups", "kl_warmup_epochs", float, True, False, False, 0.0, 1e6, False, "",
         "optional axis: comma-separated KL warm-up lengths in epochs"),
    Axis("free_bits", "free_bits", float, True, False, False, 0.0, 1e3, False, "",
         "optional axis: comma-separated free-bits floors (nats)"),
    Axis("decoder_contexts", "decoder_context", int, True, False, False, 0, 1_000_000, False, "",
         "optional axis: comma-separated contexts W of --decoder autoregressive (the decoder's strength)"),
    Axis("mitigations", "mitigation", str, True, False, False, 0, 0, False, "",
         "optional axis: comma-separated mitigations of posterior collapse (none, warmup, cyclical, free-bits, "
         "aggressive)", ("none", "warmup", "cyclical", "free-bits", "aggressive")),
)
BY_KEY = {a.key: a for a in AXES}
CELL_AXES = [a.key for a in AXES if a.cell]  # with beta, these name one cell of the map
POINT_KEYS = [a.key for a in AXES] + ["seed"]  # a trial's point in the space (seed: its repeat)
