"""Exported step programs: warm starts that skip tracing the model.

A warm start used to spend most of its time tracing: about 0.9 s a bucket to trace
SmolLM2's 30 Flax layers and 0.3 s to lower them, against 0.4 s to load the compiled
program from JAX's persistent cache. So each bucket's step is exported once
(``jax.export``: its StableHLO, serialized) and stored; a later start deserializes it
and only lowers a thin call to it, whose compilation then hits the persistent cache.

An entry is keyed by everything the program depends on: the source of fbjax and of its
kernels, the jax and jaxlib versions, the backend, the tree, shapes and dtypes of every
argument, and the caller's ``context``: what the function closes over that no shape
shows (the model's hyperparameters, the attention implementation, the dtype). A step
that cannot be exported (a custom call jax.export refuses) makes the store answer
``None`` with a logged reason, and the caller traces as before (as a sharded runner
always does); a stored file that does not deserialize is replaced.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import jax
import jaxlib
from jax import export

log = logging.getLogger(__name__)

SUFFIX = ".exported"


@functools.cache
def source_digest() -> str:
    """sha256 over the source files of fbjax and fbjax_kernels (any edit is a new key)."""
    import fbjax_kernels

    import fbjax

    digest = hashlib.sha256()
    for package in (fbjax, fbjax_kernels):
        root = Path(package.__file__).parent
        for path in sorted(root.rglob("*")):
            if path.suffix in (".py", ".cc", ".json") and "__pycache__" not in path.parts:
                digest.update(str(path.relative_to(root)).encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()


def _signature(args: tuple) -> str:
    leaves, tree = jax.tree.flatten(args)
    avals = ",".join(f"{jax.typeof(x).str_short()}" for x in leaves)
    return f"{tree}|{avals}"


class StepExporter:
    """Exports a step function per bucket into ``directory`` and loads it back.

    ``custom_calls``: the custom-call targets the step may use (the CPU attention
    kernel's FFI targets); jax.export refuses unknown custom calls unless named, since
    their ABI is the kernel's, which the source digest in the key already pins.
    """

    def __init__(self, directory: str | os.PathLike, fn: Callable, name: str,
                 custom_calls: Iterable[str] = (), context: str = "") -> None:
        self.directory = Path(directory).expanduser()
        self.fn = fn
        self.name = name
        self.context = context
        self.checks = [export.DisabledSafetyCheck.custom_call(t) for t in custom_calls]

    def key(self, args: tuple) -> str:
        parts = [self.name, self.context, jax.__version__, jaxlib.__version__,
                 jax.default_backend(), source_digest(), _signature(args)]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]

    def load_or_export(self, args: tuple) -> Callable | None:
        """A function of ``args`` that calls the stored program for their shapes
        (exporting and storing it first if absent); None if it cannot be exported."""
        path = self.directory / f"{self.name}-{self.key(args)}{SUFFIX}"
        exported = self._load(path)
        if exported is None:
            exported = self._export(args)
            if exported is None:
                return None
            self._store(path, exported)
        tree = jax.tree.structure(args)

        def call(*call_args):
            if jax.tree.structure(call_args) != tree:
                raise TypeError(f"arguments do not match the exported step {path.name}")
            return exported.call(*jax.tree.leaves(call_args))

        return call

    def _export(self, args: tuple):
        leaves, tree = jax.tree.flatten(args)
        fn = self.fn

        def flat(*flat_args):
            return fn(*jax.tree.unflatten(tree, flat_args))

        try:
            return export.export(jax.jit(flat), disabled_checks=self.checks)(*leaves)
        except Exception as e:  # noqa: BLE001 - any refusal means "trace instead"
            log.warning("cannot export the step (%s: %s); tracing it at every start",
                        type(e).__name__, e)
            return None

    def _load(self, path: Path):
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            log.warning("cannot read the stored step %s (%s)", path, e)
            return None
        try:
            return export.deserialize(bytearray(data))
        except Exception as e:  # noqa: BLE001 - a damaged entry is rebuilt
            log.warning("stored step %s does not load (%s); exporting it again", path, e)
            return None

    def _store(self, path: Path, exported) -> None:
        """Write atomically (concurrent starts never read half a file); a store that
        cannot be written costs the next start its trace, not this one its start."""
        tmp = None
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
            with os.fdopen(fd, "wb") as out:
                out.write(exported.serialize())
            os.replace(tmp, path)
        except OSError as e:
            log.warning("cannot store the exported step in %s (%s)", self.directory, e)
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
