"""Ahead-of-time compiled executables, one per (tokens, seqs) bucket.

Everything is lowered and compiled at start-up (with a progress bar) so serving never
compiles: a step looks its bucket up in a dict and calls the executable. The
persistent compilation cache makes the second start-up fast; with a
:class:`~fbjax.engine.step_export.StepExporter` it also skips tracing the model, and
each bucket compiles on a worker thread while the next one is lowered.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import jax
from tqdm import tqdm

from fbjax.config import BucketConfig
from fbjax.engine.step_export import StepExporter


def enable_compilation_cache(cache_dir: str | None) -> None:
    """Turn on JAX's persistent compilation cache at ``cache_dir`` (None: leave off)."""
    if not cache_dir:
        return
    path = os.path.expanduser(cache_dir)
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def steps_dir(cache_dir: str | None) -> str | None:
    """Where exported steps live: beside the compiled programs they compile into (None
    with the cache off: an exported step only saves time if its compilation is cached)."""
    return os.path.join(os.path.expanduser(cache_dir), "fbjax-steps") if cache_dir else None


class CompiledBuckets:
    """``dict[(tokens, seqs)] -> Compiled``; asking for an uncompiled bucket is an error."""

    def __init__(self, executables: dict[tuple[int, int], Callable]) -> None:
        self._executables = executables

    @classmethod
    def compile(cls, fn: Callable, buckets: BucketConfig,
                example_args: Callable[[int, int], tuple], donate_argnums=(),
                show_progress: bool = True,
                exporter: StepExporter | None = None) -> CompiledBuckets:
        jitted = jax.jit(fn, donate_argnums=donate_argnums)
        pairs = buckets.pairs()
        futures = {}
        # XLA compiles (or loads from the persistent cache) without holding the GIL, so
        # one worker compiles bucket i while this thread lowers bucket i + 1.
        with ThreadPoolExecutor(1, thread_name_prefix="compile") as pool, \
                tqdm(total=len(pairs), desc="compiling buckets", unit="bucket",
                     disable=not show_progress) as bar:
            for pair in pairs:
                args = example_args(*pair)
                stored = exporter.load_or_export(args) if exporter is not None else None
                target = jitted if stored is None else jax.jit(
                    stored, donate_argnums=donate_argnums)
                futures[pair] = pool.submit(target.lower(*args).compile)
                futures[pair].add_done_callback(lambda _: bar.update())
            executables = {pair: future.result() for pair, future in futures.items()}
        return cls(executables)

    def __len__(self) -> int:
        return len(self._executables)

    def keys(self) -> list[tuple[int, int]]:
        return sorted(self._executables)

    def get(self, bucket: tuple[int, int]) -> Callable:
        try:
            return self._executables[bucket]
        except KeyError:
            raise KeyError(f"bucket {bucket} was not compiled; compiled: {self.keys()}") from None
