"""Pack policy for sweeps: which points share a pack, how many slots a pack has, and in what order packs run.

A pack (vae/training/pack.py) trains configurations of one shape as one model of K slots, each slot taking the
next queued configuration when its member ends. For a sweep's grid or random points this module cuts the
configurations into queues (`queues`): each shape's configurations dealt to a multiple of the trials the
cluster runs at once, so that about `DEPTH` pass through each slot and those trials start and end each shape
together, the costliest first (Tune starts trials in order, so the largest latent sizes start first and the
cheap queues fill in at the end). How many slots
`--pack auto` gives a pack is `slots_for`, within memory (`member_bytes`). A boundary search's rounds are packs
without queues (`groups`). The library never needs this module: a lone `train_pack` call is a pack of whatever
it is handed.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

from vae.config import SHAPE_KEYS
from vae.model.sources import INPUT_DIM, TEST_SIZE

MAX_AUTO = 64  # --pack auto: at most this many slots a pack
DEPTH = 4  # about this many configurations pass through each slot of a pack (fewer slots cost little: see below)


def shape_key(point: dict[str, Any], shared: dict[str, Any] | None = None) -> tuple:
    """The values a point must share with its pack-mates (`shared` fills the keys the point lacks)."""
    merged = {**(shared or {}), **point}
    learned = merged.get("decoder_var") in (None, "learned", "")
    context = merged.get("decoder") == "autoregressive" and (merged.get("decoder_context") or 0) > 0
    return tuple(merged.get(k) for k in SHAPE_KEYS) + (learned, context, merged.get("mitigation") == "aggressive")


def by_shape(points: Sequence[dict[str, Any]], shared: dict[str, Any] | None = None) -> list[list[dict]]:
    """The points of each shape, each shape's in order of seed, then learning rate (first-seen order among
    equals): a pack then holds one seed where it can, so its members share one batch a step, and its members of
    one learning rate lie side by side, one fused Adam call for them (`PackAdam`)."""
    shapes: dict[tuple, list[dict]] = {}
    for p in points:
        shapes.setdefault(shape_key(p, shared), []).append(p)

    def order(p: dict[str, Any]) -> tuple[float, float]:
        merged = {**(shared or {}), **p}
        return float(merged.get("seed") or 0), float(merged.get("lr") or 0)

    return [sorted(members, key=order) for members in shapes.values()]


def _cut(members: list[dict], n: int) -> list[list[dict]]:
    """`members` in `n` consecutive runs as even as possible (10 by 3: 3, 4, 3)."""
    cuts = [round(i * len(members) / n) for i in range(n + 1)]
    return [members[a:b] for a, b in zip(cuts, cuts[1:])]


def slots_for(points: Sequence[dict[str, Any]], concurrent: int, shared: dict[str, Any] | None = None,
              refill: bool = True) -> int:
    """`--pack auto`'s slots a pack (before the memory cap). Where members end at different epochs (`refill`:
    until settled), enough that the configurations spread over the `concurrent` trials the cluster runs at
    once with about `DEPTH` through each slot, and no more than a shape fills at that depth: on CPU a slot more
    or less changes little per member (docs/packing.md: the per-member rate by slots), while a deep queue keeps
    the slots full. Where every member trains the same fixed budget, a refilled slot would only start a second
    wave: one slot for each configuration, spread over the concurrent trials (a step's fixed cost is paid once
    for all of them; docs/refill.md's toy map)."""
    shapes = by_shape(points, shared)
    if not shapes:
        return 1
    if not refill:
        return max(1, min(MAX_AUTO, math.ceil(len(points) / max(1, concurrent))))
    spread = math.ceil(len(points) / (max(1, concurrent) * DEPTH))
    deepest = max(math.ceil(len(members) / DEPTH) for members in shapes)
    return max(1, min(MAX_AUTO, spread, deepest))


def queues(points: Sequence[dict[str, Any]], slots: int, concurrent: int, shared: dict[str, Any] | None = None,
           cost: Callable[[dict[str, Any]], float] | None = None) -> list[list[dict]]:
    """The configurations as the queues of packs of `slots` slots, one shape each, costliest first.

    Each shape's configurations are dealt in turn (the first to queue 1, the second to queue 2, ...) to a
    multiple of the `concurrent` trials the cluster runs at once: as many as keep about DEPTH a slot, and at least
    one for each concurrent trial (no more than the shape has). Dealt, a shape's queues hold the same mix of its
    learning rates and betas, and so take about as long as each other: the trials the cluster runs at once start a
    shape together and end it together, and no trial runs alone at the end while the others' slots wait (cut
    into runs instead, a queue would hold one corner of the grid, which may settle much later than the rest). The queues are
    ordered by `cost` (a configuration's expected training cost; default: one each) times their length, largest
    first, so that Tune, which starts trials in order, ends with the cheap ones. Each queue keeps its shape's
    order (`by_shape`). With one slot a pack, every configuration is its own trial."""
    if slots <= 1:
        return [[p] for members in by_shape(points, shared) for p in members]
    cost, lanes = cost or (lambda p: 1.0), max(1, concurrent)
    out = []
    for members in by_shape(points, shared):
        n = min(len(members), lanes * math.ceil(len(members) / (slots * DEPTH * lanes)))
        out += [members[i::n] for i in range(n)]
    return sorted(out, key=lambda q: len(q) * cost(q[0]), reverse=True)


def groups(points: Sequence[dict[str, Any]], size: int, shared: dict[str, Any] | None = None) -> list[list[dict]]:
    """The points cut into packs of at most `size` members with one shape each, as even as possible (10 by 4:
    3, 4, 3), each shape's in `by_shape`'s order (a boundary search's round: every member trains at once)."""
    packs = []
    for members in by_shape(points, shared):
        packs += _cut(members, math.ceil(len(members) / size))
    return packs


def member_bytes(cfg: Any) -> int:
    """A generous estimate of the memory one member of a pack needs on its device: weights, gradients and
    two Adam moments; a training step's activations and their gradients; the test set's fixed noise and
    encoder outputs; one evaluation batch (2,048 examples)."""
    import torch  # the meta device: sizes without memory

    from vae.model.models import model_for

    input_dim, n_test = INPUT_DIM[cfg.dataset], TEST_SIZE[cfg.dataset]
    with torch.device("meta"):
        params = sum(p.numel() for p in model_for(cfg, input_dim).parameters())
    per_example = cfg.train_samples * (3 * input_dim + 4 * sum(cfg.widths) + 6 * cfg.latent_dim) + input_dim
    floats = (4 * params + 3 * cfg.batch_size * per_example + n_test * cfg.latent_dim * (cfg.num_mc + 3)
              + 2048 * per_example)
    return 4 * int(floats)
