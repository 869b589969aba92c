"""Where fbjax finds its files.

Two kinds, found two ways:

* **package data** (model configs, committed latency profiles) ships inside the
  ``fbjax`` package and is found with ``importlib.resources``, so an installed wheel
  works from any directory;
* **shared data** (request traces, vidur's operator timings) is large, public and not
  ours to ship: it is looked up at run time in ``$FBJAX_SHARED``, else in a ``shared/``
  folder beside a source checkout or beside the current directory. When it is absent
  the error lists every place looked at and names the variable that points elsewhere.

Pure Python, no JAX: the scheduler, the simulator and the trace loader import it.
"""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path

SHARED_ENV = "FBJAX_SHARED"


def _package_dir() -> Path:
    """The installed ``fbjax`` package as a directory (wheels are always unpacked)."""
    return Path(str(importlib.resources.files("fbjax")))


CONFIGS_DIR = _package_dir() / "configs"
MODEL_CONFIGS_DIR = CONFIGS_DIR / "models"
PACKAGED_PROFILES_DIR = CONFIGS_DIR / "profiles"
BUILTIN_MODEL_CONFIG = MODEL_CONFIGS_DIR / "builtin-tiny.json"


class SharedDataNotFound(FileNotFoundError):
    """The shared data folder (or a part of it) is not where fbjax looked."""


def _source_checkout_root() -> Path | None:
    """The repository root when fbjax runs from a source checkout (editable install)."""
    root = _package_dir().parent
    return root if (root / "pyproject.toml").is_file() else None


def shared_dir_candidates() -> list[Path]:
    """Every place the shared data may be, in the order they are tried."""
    env = os.environ.get(SHARED_ENV)
    if env:
        return [Path(env).expanduser()]
    places = []
    root = _source_checkout_root()
    if root is not None:
        places.append(root.parent / "shared")
    cwd = Path.cwd()
    places += [cwd / "shared", cwd.parent / "shared"]
    unique: list[Path] = []
    for place in places:
        if place not in unique:
            unique.append(place)
    return unique


def shared_dir(sub: str = "") -> Path:
    """The first candidate that holds ``sub`` (a relative path, e.g. ``data/traces``).

    Raises :class:`SharedDataNotFound` naming every place looked at and how to point
    fbjax at the data."""
    candidates = shared_dir_candidates()
    for place in candidates:
        if (place / sub).is_dir():
            return place
    looked = ", ".join(str(p / sub) for p in candidates)
    how = (f"set ${SHARED_ENV} to the folder that holds {sub or 'it'}"
           if not os.environ.get(SHARED_ENV) else f"${SHARED_ENV} points there; fix it")
    raise SharedDataNotFound(f"shared data not found: looked in {looked}; {how}")
