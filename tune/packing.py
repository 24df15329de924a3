"""Pack policy for sweeps: which points share a pack, and how many members a pack holds.

A pack (vae/training/pack.py) trains K configurations of one shape as one model; this module decides, for a sweep's
grid, which points go together (`groups`) and how large `--pack auto` makes them (`MAX_AUTO`,
`member_bytes`). The library never needs it: a lone `train_loop` call is a pack of whatever it is handed.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from vae.config import SHAPE_KEYS

MAX_AUTO = 64  # --pack auto: at most this many members a pack


def shape_key(point: dict[str, Any], shared: dict[str, Any] | None = None) -> tuple:
    """The values a point must share with its pack-mates (`shared` fills the keys the point lacks)."""
    merged = {**(shared or {}), **point}
    learned = merged.get("decoder_var") in (None, "learned", "")
    context = merged.get("decoder") == "autoregressive" and (merged.get("decoder_context") or 0) > 0
    return tuple(merged.get(k) for k in SHAPE_KEYS) + (learned, context, merged.get("mitigation") == "aggressive")


def groups(points: Sequence[dict[str, Any]], size: int, shared: dict[str, Any] | None = None) -> list[list[dict]]:
    """The points cut into packs of at most `size` members with one shape each, as even as possible (10 by 4:
    3, 4, 3). Within a shape the points are ordered by seed, then learning rate (first-seen order among
    equals), and cut into consecutive runs: a pack holds one seed where it can, so its members share one batch
    a step (`--repeats` gives each configuration several seeds), and its members of one learning rate lie side
    by side, one fused Adam call for them (`PackAdam`)."""
    by_shape: dict[tuple, list[dict]] = {}
    for p in points:
        by_shape.setdefault(shape_key(p, shared), []).append(p)

    def order(p: dict[str, Any]) -> tuple[float, float]:
        merged = {**(shared or {}), **p}
        return float(merged.get("seed") or 0), float(merged.get("lr") or 0)

    packs = []
    for members in by_shape.values():
        members = sorted(members, key=order)
        n = math.ceil(len(members) / size)
        cuts = [round(i * len(members) / n) for i in range(n + 1)]
        packs += [members[a:b] for a, b in zip(cuts, cuts[1:])]
    return packs


def member_bytes(cfg: Any) -> int:
    """A generous estimate of the memory one member of a pack needs on its device: weights, gradients and
    two Adam moments; a training step's activations and their gradients; the test set's fixed noise and
    encoder outputs; one evaluation batch (2,048 examples)."""
    import torch  # the meta device: sizes without memory

    from vae.model.data import INPUT_DIM, TEST_SIZE
    from vae.model.models import model_for

    input_dim, n_test = INPUT_DIM[cfg.dataset], TEST_SIZE[cfg.dataset]
    with torch.device("meta"):
        params = sum(p.numel() for p in model_for(cfg, input_dim).parameters())
    per_example = cfg.train_samples * (3 * input_dim + 4 * sum(cfg.widths) + 6 * cfg.latent_dim) + input_dim
    floats = (4 * params + 3 * cfg.batch_size * per_example + n_test * cfg.latent_dim * (cfg.num_mc + 3)
              + 2048 * per_example)
    return 4 * int(floats)
