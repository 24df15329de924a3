"""vae-collapse: train VAEs on Ray and map where posterior collapse happens.

The Python API (see the README's "From Python" section): `train`, `open_results`, `load_model` here, and
`tune.api.sweep` for sweeps. They load lazily, so `import vae` stays cheap for the command line.
"""

from typing import Any

__all__ = ["train", "open_results", "load_model", "ConfigError", "RunFailed"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'vae' has no attribute {name!r}")
