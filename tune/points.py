"""A trial's point in the sweep's space and its id in the tables (what the sweep and the boundary searcher share)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from vae.axes import POINT_KEYS
from vae.tables.results import SAFE_KEY


def point(config: dict[str, Any]) -> dict[str, Any]:
    """A trial's point in the space: its axis values and seed (what Tune's config adds to the sweep's)."""
    return {k: config[k] for k in POINT_KEYS if k in config}


def trial_key(config: dict[str, Any]) -> str:
    """The trial's id in the tables, from its point in the space, so a retried trial (which Tune may give a
    new id) replaces its rows instead of adding a second trial: 'z2-lr0.01-b0.3-s0-1a2b3c'."""
    where = point(config)
    digest = hashlib.sha1(json.dumps(where, sort_keys=True).encode()).hexdigest()[:6]
    name = f"z{where.get('latent_dim')}-lr{where.get('lr', 0):g}-b{where.get('beta', 0):.4g}-s{where.get('seed', 0)}"
    return SAFE_KEY.sub("", name) + "-" + digest


def member_report(result: dict[str, Any] | None, tid: str) -> dict[str, Any]:
    """One member's latest report from its trial's result: nested under `members` as the loop reports it
    (callbacks see that), or flattened to 'members/<trial id>/<key>' as Tune hands results to searchers and
    schedulers."""
    result = result or {}
    nested = result.get("members")
    if isinstance(nested, dict):
        return dict(nested.get(tid) or {})
    prefix = f"members/{tid}/"
    return {k[len(prefix):]: v for k, v in result.items() if k.startswith(prefix)}
