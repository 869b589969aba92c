"""Ahead-of-time compiled executables, one per (tokens, seqs) bucket.

Everything is lowered and compiled at start-up (with a progress bar) so serving never
compiles: a step looks its bucket up in a dict and calls the executable. The
persistent compilation cache makes the second start-up fast.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import jax
from tqdm import tqdm

from fbjax.config import BucketConfig


def enable_compilation_cache(cache_dir: str | None) -> None:
    """Turn on JAX's persistent compilation cache at ``cache_dir`` (None: leave off)."""
    if not cache_dir:
        return
    path = os.path.expanduser(cache_dir)
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


class CompiledBuckets:
    """``dict[(tokens, seqs)] -> Compiled``; asking for an uncompiled bucket is an error."""

    def __init__(self, executables: dict[tuple[int, int], Callable]) -> None:
        self._executables = executables

    @classmethod
    def compile(cls, fn: Callable, buckets: BucketConfig,
                example_args: Callable[[int, int], tuple], donate_argnums=(),
                show_progress: bool = True) -> CompiledBuckets:
        jitted = jax.jit(fn, donate_argnums=donate_argnums)
        executables = {}
        pairs = buckets.pairs()
        for tokens, seqs in tqdm(pairs, desc="compiling buckets", unit="bucket",
                                 disable=not show_progress):
            executables[(tokens, seqs)] = jitted.lower(*example_args(tokens, seqs)).compile()
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
