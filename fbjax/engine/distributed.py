"""Multi-host tensor parallelism: every host runs the same engine program (SPMD).

``jax.distributed`` joins the processes into one set of global devices, so a
``--tensor_parallel`` mesh can span hosts. The scheduler is deterministic, so each
process, given the same prompts and seeds, forms the same plans and feeds the same
batches; XLA's collectives join the shards. This serves offline generation
(``python -m fbjax.generate``); the HTTP server stays single-host, since requests
reaching one host would first have to be broadcast to the others.

On CPU the collectives are Gloo's (set here: XLA's default CPU collectives are
single-process).
"""

from __future__ import annotations

import jax


def initialize(coordinator_address: str, num_processes: int, process_id: int) -> None:
    """Join this process to the others; call before any JAX computation."""
    if num_processes < 2:
        return
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id}")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU devices only
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)


def is_leader() -> bool:
    """The process that prints and logs results (all compute them)."""
    return jax.process_index() == 0
