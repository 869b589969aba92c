"""Compiled bucket executables kept on disk, so a warm start skips tracing too.

JAX's persistent compilation cache saves XLA's work, but finding an entry still means
tracing and lowering the step for every bucket: about 2 s a bucket for a 30-layer model
on two cores, a minute for the default ladder. This store keeps each bucket's compiled
executable (``jax.experimental.serialize_executable``) under a key of everything that
decides the program, so a warm start deserializes them (~0.1 s each) instead.

The key is a SHA-256 over: the bytes of every source file of ``fbjax`` and
``fbjax_kernels`` (any code change is a miss, so a stale program is never run), JAX and
jaxlib versions, the backend and device kind, the CPU model, ``XLA_FLAGS``, and what
the caller passes (model config, bucket, argument shapes, dtypes and layout). A file
that cannot be loaded is logged and recompiled, never trusted. Only single-device
engines use it (a sharded executable's layout is tied to its mesh).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import pickle
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from fbjax.profiling.device import cpu_model_name

log = logging.getLogger(__name__)

FORMAT = "fbjax-executable-v1"


@functools.cache
def code_fingerprint() -> str:
    """SHA-256 of every .py and .cc file of fbjax and fbjax_kernels, in path order."""
    import fbjax_kernels

    import fbjax

    digest = hashlib.sha256()
    for package in (fbjax, fbjax_kernels):
        root = Path(package.__file__).parent
        for path in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".cc")):
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def abstract_signature(args: Any) -> list:
    """Shapes, dtypes and shardings of a pytree of arguments, with its structure."""
    leaves, tree = jax.tree_util.tree_flatten(args)
    return [str(tree)] + [
        [list(getattr(x, "shape", ())), str(getattr(x, "dtype", type(x).__name__)),
         str(getattr(x, "sharding", ""))] for x in leaves]


def executable_key(parts: dict[str, Any]) -> str:
    import jaxlib

    device = jax.devices()[0]
    everything = {
        "format": FORMAT, "code": code_fingerprint(), "jax": jax.__version__,
        "jaxlib": jaxlib.__version__, "platform": device.platform,
        "device_kind": device.device_kind, "cpu": cpu_model_name(),
        "machine": platform.machine(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
        **parts,
    }
    return hashlib.sha256(json.dumps(everything, sort_keys=True, default=str).encode()
                          ).hexdigest()


# Every code change keys a new set of files (about 1.3 MB a bucket for SmolLM2-135M):
# files unused this long are deleted when something new is saved.
MAX_UNUSED_DAYS = 14.0


class ExecutableStore:
    """``load_or_compile(key_parts, lower)``: the executable saved under the key, else
    ``lower().compile()``, saved for next time (atomically: a crash leaves no half file).
    A load marks the file used (its mtime); saving prunes files unused for
    ``MAX_UNUSED_DAYS``."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory).expanduser()
        self.loaded = 0
        self.compiled = 0
        self._pruned = False

    def prune(self, max_unused_days: float = MAX_UNUSED_DAYS) -> int:
        """Delete the files not used for ``max_unused_days``; returns how many."""
        cutoff = time.time() - max_unused_days * 86400
        removed = 0
        for path in self.directory.glob("*.pkl"):
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except OSError:
                pass  # another process pruned or is replacing it
        return removed

    def load_or_compile(self, key_parts: dict[str, Any], lower: Callable[[], Any],
                        check: Callable[[Any], None] | None = None):
        """``check(executable)`` runs a loaded executable once (raising if it cannot
        run): XLA:CPU sometimes serializes an executable without code it shares with
        programs compiled earlier in the same process, and such a file only fails when
        run ("Function ... not found"). A file that fails is deleted and recompiled."""
        from jax.experimental.serialize_executable import deserialize_and_load, serialize

        path = self.directory / f"{executable_key(key_parts)}.pkl"
        if path.is_file():
            try:
                payload, in_tree, out_tree = pickle.loads(path.read_bytes())
                executable = deserialize_and_load(payload, in_tree, out_tree)
                if check is not None:
                    check(executable)
                self.loaded += 1
                os.utime(path)  # used: keep it
                return executable
            except Exception as e:  # truncated, foreign or incomplete: recompile it
                log.warning("cannot use the saved executable %s (%s: %s); recompiling",
                            path, type(e).__name__, str(e)[:200])
                path.unlink(missing_ok=True)
        # An executable that JAX's persistent cache hands back serializes without its
        # code (it then fails at run time: "Function ... not found"), so what is saved
        # is compiled with that cache off.
        previous = jax.config.jax_enable_compilation_cache
        jax.config.update("jax_enable_compilation_cache", False)
        try:
            executable = lower().compile()
        finally:
            jax.config.update("jax_enable_compilation_cache", previous)
        self.compiled += 1
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.directory, delete=False,
                                             suffix=".tmp") as f:
                f.write(pickle.dumps(serialize(executable)))
            os.replace(f.name, path)
            if not self._pruned:
                self._pruned = True
                self.prune()
        except Exception as e:  # a read-only or full disk costs the next start only
            log.warning("cannot save the executable to %s (%s: %s)", path,
                        type(e).__name__, e)
        return executable
