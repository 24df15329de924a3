"""vae-collapse: train VAEs on Ray and map where posterior collapse happens.

The Python API (see the README's "From Python" section): `train`, `open_results`, `load_model` here, and
`tune.api.sweep` for sweeps. They load lazily, so `import vae` stays cheap for the command line.
"""

import importlib
from typing import Any

# Each name and the module it comes from: imported on first use (`vae.trained` loads torch).
_FROM = {"train": "api", "open_results": "api", "ConfigError": "api", "RunFailed": "api", "load_model": "trained"}
__all__ = list(_FROM)


def __getattr__(name: str) -> Any:
    if name in _FROM:
        return getattr(importlib.import_module(f".{_FROM[name]}", __name__), name)
    raise AttributeError(f"module 'vae' has no attribute {name!r}")
