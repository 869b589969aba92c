"""The on-disk store of compiled executables: a hit needs the same key, a bad file is
recompiled (never trusted), and what comes back computes what was compiled."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np

from fbjax.engine.executable_store import ExecutableStore, abstract_signature, executable_key


def _lowered(scale: float, n: int = 8):
    return lambda: jax.jit(lambda x: x * scale + 1.0).lower(jnp.zeros(n, jnp.float32))


_CHILD = """
import sys, jax, jax.numpy as jnp, numpy as np
from fbjax.engine.buckets import enable_compilation_cache
from fbjax.engine.executable_store import ExecutableStore
step, store_dir, jax_cache = sys.argv[1:4]
if jax_cache != "-":
    enable_compilation_cache(jax_cache)
x = jnp.arange(64, dtype=jnp.float32).reshape(8, 8)
lower = lambda: jax.jit(lambda a, i: a[i] @ a.T + 1.0).lower(x, jnp.arange(4))
store = ExecutableStore(store_dir)
if step == "jax-cache-only":
    lower().compile()
else:
    out = store.load_or_compile({"k": 1}, lower)(x, jnp.arange(4))
    np.testing.assert_allclose(np.asarray(out), np.asarray(x[:4] @ x.T + 1.0))
    print(store.compiled, store.loaded)
"""


def run_children(steps: list[str], store_dir, jax_cache: str = "-") -> list[list[str]]:
    """Each step in a fresh process: XLA:CPU may serialize an executable without code it
    shares with programs compiled before in the same process (hence the engine's check
    run); a fresh process is how a server start meets the store."""
    import subprocess
    import sys

    outputs = []
    for step in steps:
        run = subprocess.run([sys.executable, "-c", _CHILD, step, str(store_dir), jax_cache],
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        outputs.append(run.stdout.split())
    return outputs


def test_a_second_process_loads_what_the_first_compiled(tmp_path):
    assert run_children(["save", "load"], tmp_path) == [["1", "0"], ["0", "1"]]


def test_every_key_part_and_the_shapes_count():
    base = {"model": "m", "bucket": [16, 4], "args": abstract_signature(jnp.zeros(8))}
    key = executable_key(base)
    assert executable_key(dict(base)) == key
    for change in ({"model": "m2"}, {"bucket": [32, 4]},
                   {"args": abstract_signature(jnp.zeros(9))},
                   {"args": abstract_signature(jnp.zeros(8, jnp.bfloat16))}):
        assert executable_key({**base, **change}) != key, change


def test_a_corrupt_file_is_recompiled_and_replaced(tmp_path, caplog):
    parts = {"model": "m"}
    ExecutableStore(tmp_path).load_or_compile(parts, _lowered(3.0))
    (path,) = tmp_path.glob("*.pkl")
    path.write_bytes(path.read_bytes()[:100])
    store = ExecutableStore(tmp_path)
    with caplog.at_level(logging.WARNING):
        executable = store.load_or_compile(parts, _lowered(3.0))
    assert "cannot use the saved executable" in caplog.text
    assert (store.compiled, store.loaded) == (1, 0)
    np.testing.assert_array_equal(np.asarray(executable(jnp.ones(8))), np.full(8, 4.0))
    again = ExecutableStore(tmp_path)
    again.load_or_compile(parts, _lowered(3.0))
    assert again.loaded == 1


def test_what_it_saves_runs_even_where_jax_cache_had_the_program(tmp_path):
    """JAX's persistent cache returns executables that serialize without their code;
    the store compiles what it saves with that cache off, so the saved one runs."""
    outputs = run_children(["jax-cache-only", "save", "load"], tmp_path / "store",
                           str(tmp_path / "jax"))
    assert outputs[1:] == [["1", "0"], ["0", "1"]]


def test_saving_prunes_files_unused_for_two_weeks(tmp_path):
    import os
    import time

    ExecutableStore(tmp_path).load_or_compile({"k": "used"}, _lowered(2.0))
    ExecutableStore(tmp_path).load_or_compile({"k": "stale"}, _lowered(5.0))
    used, stale = (tmp_path / f"{executable_key({'k': k})}.pkl" for k in ("used", "stale"))
    month_ago = time.time() - 30 * 86400
    for path in (used, stale):
        os.utime(path, (month_ago, month_ago))
    ExecutableStore(tmp_path).load_or_compile({"k": "used"}, _lowered(2.0))  # a load marks it
    ExecutableStore(tmp_path).load_or_compile({"k": "new"}, _lowered(7.0))  # a save prunes
    assert used.exists() and not stale.exists()
    assert len(list(tmp_path.glob("*.pkl"))) == 2


def test_a_loaded_executable_that_fails_its_check_is_recompiled(tmp_path, caplog):
    parts = {"model": "m"}
    ExecutableStore(tmp_path).load_or_compile(parts, _lowered(3.0))

    def check(executable):
        raise RuntimeError("NOT_FOUND: Function wrapped_iota not found")

    store = ExecutableStore(tmp_path)
    with caplog.at_level(logging.WARNING):
        executable = store.load_or_compile(parts, _lowered(3.0), check=check)
    assert "wrapped_iota" in caplog.text
    assert (store.compiled, store.loaded) == (1, 0)
    np.testing.assert_array_equal(np.asarray(executable(jnp.ones(8))), np.full(8, 4.0))
    checked = []
    again = ExecutableStore(tmp_path)
    again.load_or_compile(parts, _lowered(3.0), check=checked.append)
    assert again.loaded == 1 and len(checked) == 1
