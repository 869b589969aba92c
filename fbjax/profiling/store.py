"""Latency profiles: where they are stored, how they are found, loaded and checked.

A profile is a :class:`~fbjax.sched.latency.LatencyModel` in JSON whose metadata names
the device, the model, the bucket ladders and the KV capacity it describes. fbjax
ships a few (``fbjax/configs/profiles``: GPU profiles built from vidur's timings by
:mod:`fbjax.profiling.vidur`, the built-in model on a 2-core CPU); profiles measured on
this machine by :mod:`fbjax.profiling.measure` (``python -m fbjax.profile``) go to the
user's cache (:func:`user_profiles_dir`) and are found first.

**Keys.** A profile is named ``<device>-<model>.json``:

* ``device`` is ``cpu`` on any CPU (JAX reports no finer kind; a CPU profile is only
  meaningful on machines of the same kind, whose model name and core count the
  metadata records in ``device_detail`` for information, not for matching, so a CI
  runner of the same instance type accepts it). On accelerators it is the JAX device
  kind shortened to its family: ``NVIDIA H100 80GB HBM3`` -> ``h100``,
  ``NVIDIA A100-SXM4-80GB`` -> ``a100``, ``TPU v5 lite`` -> ``tpu-v5-lite``. These match
  the GPU profiles built from vidur timings (``a100``, ``h100``).
* ``model`` is ``builtin-tiny`` for the built-in model, else the model directory's
  name, lower-cased (``/models/Llama-3-8B`` -> ``llama-3-8b``).

A profile whose ``device`` or ``model`` differs from the engine's is refused with a
message saying both, unless forced (``SchedulerConfig.force_profile``,
``--force_profile``). A profile must also cover every bucket the engine compiles.

Pure Python: the simulator loads profiles through this module. Which device the engine
runs on (the ``device`` key) is :mod:`fbjax.profiling.device`'s to say.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

from fbjax.catalog import BUILTIN_MODEL, packaged_model
from fbjax.config import BucketConfig
from fbjax.resources import PACKAGED_PROFILES_DIR
from fbjax.sched.latency import LatencyModel

PROFILE_DIR_ENV = "FBJAX_PROFILE_DIR"
DEFAULT_PAGE_SIZE = 16
BUILTIN_MODEL_KEY = BUILTIN_MODEL
# Metadata an engine profile must carry (GPU profiles from vidur carry the first two).
REQUIRED_METADATA = {"device": str, "model": str}
ENGINE_METADATA = {"device": str, "model": str, "token_buckets": list, "seq_buckets": list,
                   "jax_version": str, "kv_capacity_tokens": int, "page_size": int}


class ProfileError(ValueError):
    """The profile cannot be used as asked; the message says why and what to do."""


class ProfileNotFound(ProfileError):
    """No profile of this device, model and bucket set exists yet (the engine may
    measure one; see ``SchedulerConfig.auto_profile``)."""


# ----- keys ---------------------------------------------------------------------------------

def model_key(model: str | None) -> str:
    """The model part of a profile name: a known name and the path of its file share one
    key (``smollm2`` and ``.../SmolLM2-135M-Instruct.Q4_1.gguf`` both give
    ``smollm2-135m-instruct.q4-1.gguf``)."""
    if model is None or str(model) == BUILTIN_MODEL:
        return BUILTIN_MODEL_KEY
    packaged = packaged_model(model)
    if packaged is not None:
        name = packaged.filename
    else:
        name = Path(os.path.expanduser(str(model))).resolve().name
    return re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-") or "model"


def user_profiles_dir() -> Path:
    """Where profiles measured on this machine go: ``$FBJAX_PROFILE_DIR``, else
    ``$XDG_CACHE_HOME/fbjax/profiles`` (``~/.cache/fbjax/profiles``). Never inside the
    installed package, which may be read-only and is replaced on upgrade."""
    env = os.environ.get(PROFILE_DIR_ENV)
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(cache).expanduser() / "fbjax" / "profiles"


def profile_dirs() -> list[Path]:
    """Where profiles are looked up by name: this machine's own first, then the ones
    fbjax ships (``fbjax/configs/profiles``)."""
    return [user_profiles_dir(), PACKAGED_PROFILES_DIR]


def known_profiles() -> list[str]:
    """Names of every profile in :func:`profile_dirs`."""
    return sorted({p.stem for d in profile_dirs() if d.is_dir() for p in d.glob("*.json")})


def default_profile_path(device: str, model: str) -> Path:
    """Where ``python -m fbjax.profile`` writes the profile of ``device`` and ``model``."""
    return user_profiles_dir() / f"{device}-{model}.json"


def profile_command(model: str | None, buckets: BucketConfig) -> str:
    """A ``python -m fbjax.profile`` command that records the profile the engine of
    ``model`` and ``buckets`` looks for (where it looks first: the user's profile dir)."""
    words = ["python -m fbjax.profile", f"--model {model or BUILTIN_MODEL}"]
    default = BucketConfig()
    if buckets.token_buckets != default.token_buckets:
        words.append("--token_buckets " + ",".join(map(str, buckets.token_buckets)))
    if buckets.seq_buckets != default.seq_buckets:
        words.append("--seq_buckets " + ",".join(map(str, buckets.seq_buckets)))
    return " ".join(words)


def find_profile(device: str, model: str) -> Path | None:
    """The profile the engine uses by default for ``device`` and ``model``, if any."""
    for d in profile_dirs():
        path = d / f"{device}-{model}.json"
        if path.is_file():
            return path
    return None


def resolve_profile(name_or_path: str | Path) -> Path:
    """A path as given (``~`` expanded), or a name in :func:`profile_dirs`
    (``a100-llama3-8b``, ``cpu-builtin-tiny``)."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    for d in profile_dirs():
        candidate = d / f"{name_or_path}.json"
        if candidate.exists():
            return candidate
    raise ProfileError(f"latency profile not found: {name_or_path} (give a path, or one of "
                       f"{known_profiles()})")


@dataclasses.dataclass
class Profile:
    """A loaded profile as a serving instance sees it: the latency model, the bucket
    ladders it describes, the KV capacity and page size of its device."""

    name: str
    latency: LatencyModel
    buckets: BucketConfig
    kv_capacity_tokens: int
    page_size: int = DEFAULT_PAGE_SIZE
    # Host work per engine step beyond the timed device call (metadata
    # ``host_overhead_s``, measured by an engine calibration; 0 where not measured).
    step_overhead_s: float = 0.0


def load_profile(name_or_path: str | Path) -> Profile:
    """A profile by path or by name (e.g. ``a100-llama3-8b``)."""
    path = resolve_profile(name_or_path)
    latency = LatencyModel.load(path)
    meta = latency.metadata
    if "token_buckets" in meta:
        buckets = BucketConfig(tuple(meta["token_buckets"]), tuple(meta["seq_buckets"]))
    else:  # a profile of the engine: its buckets are the ones it measured
        tokens = sorted({t for t, _ in latency.buckets})
        seqs = sorted({s for _, s in latency.buckets})
        buckets = BucketConfig(tuple(tokens), tuple(seqs))
    if "kv_capacity_tokens" not in meta:
        raise ProfileError(f"{path}: profile metadata lacks 'kv_capacity_tokens'")
    return Profile(path.stem, latency, buckets, int(meta["kv_capacity_tokens"]),
                   int(meta.get("page_size", DEFAULT_PAGE_SIZE)),
                   float(meta.get("host_overhead_s", 0.0)))


# ----- checks -------------------------------------------------------------------------------

def validate_engine_metadata(metadata: dict[str, Any], source: str) -> None:
    """Schema of an engine profile's metadata (what ``python -m fbjax.profile`` writes)."""
    for key, kind in ENGINE_METADATA.items():
        if key not in metadata:
            raise ProfileError(f"{source}: metadata lacks {key!r}")
        value = metadata[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ProfileError(f"{source}: metadata {key!r} must be a {kind.__name__}, "
                               f"got {value!r}")
    for key in ("token_buckets", "seq_buckets"):
        ladder = metadata[key]
        if not ladder or any(not isinstance(x, int) or x <= 0 for x in ladder):
            raise ProfileError(f"{source}: metadata {key!r} must list positive integers")


def check_profile(latency: LatencyModel, *, device: str, model: str, buckets: BucketConfig,
                  force: bool = False, source: str = "profile",
                  model_spec: str | None = None) -> list[str]:
    """Refuse a profile of another device or model (unless ``force``) or one that lacks
    some of ``buckets``; returns the warnings a forced use deserves."""
    meta = latency.metadata
    warnings = []
    for key, want in (("device", device), ("model", model)):
        have = meta.get(key)
        if have == want:
            continue
        what = (f"{source} was recorded for {key} {have!r}, but this engine runs "
                f"{key} {want!r}" if have is not None
                else f"{source} does not say which {key} it was recorded for "
                     f"(this engine runs {key} {want!r})")
        if not force:
            raise ProfileError(
                f"{what}. Record a profile here with `{profile_command(model_spec, buckets)}`"
                ", or pass --force_profile (SchedulerConfig.force_profile=True) to use it "
                "anyway")
        warnings.append(f"{what}; used anyway (forced)")
    missing = [b for b in buckets.pairs() if b not in latency.coefficients]
    if missing:
        have = sorted(latency.coefficients)
        raise ProfileNotFound(
            f"{source} lacks {len(missing)} of the engine's {len(buckets.pairs())} buckets "
            f"(e.g. {missing[:4]}); it covers {have[:6]}{'...' if len(have) > 6 else ''}. "
            f"Profile this bucket set (`{profile_command(model_spec, buckets)}`) or run "
            "the engine with the profile's buckets")
    return warnings


def load_engine_profile(profile: str | Path | None, *, device: str, model: str,
                        buckets: BucketConfig, force: bool = False,
                        model_spec: str | None = None,
                        ) -> tuple[LatencyModel, Path, list[str]]:
    """The latency model the engine should use: ``profile`` if given, else the default
    ``<device>-<model>.json`` in :func:`profile_dirs` (ProfileNotFound if there is none,
    or if it lacks some of ``buckets``); checked by ``check_profile``. ``model_spec`` is
    the engine's ``--model``, for the commands the errors suggest."""
    if profile is None:
        path = find_profile(device, model)
        if path is None:
            looked = ", ".join(str(d) for d in profile_dirs())
            raise ProfileNotFound(
                f"the fairbatching scheduler needs a latency profile and there is none for "
                f"device {device!r} and model {model!r} (looked for {device}-{model}.json in "
                f"{looked}); record one with `{profile_command(model_spec, buckets)}`, "
                "give one with --profile (SchedulerConfig.profile), or let the engine "
                "measure one at start-up (--auto_profile)")
    else:
        path = resolve_profile(profile)
    try:
        latency = LatencyModel.load(path)
    except ValueError as e:
        raise ProfileError(str(e)) from None
    warnings = check_profile(latency, device=device, model=model, buckets=buckets,
                             force=force, source=f"profile {path}", model_spec=model_spec)
    return latency, path, warnings
