"""Tensor parallelism inside one instance: weights and KV pages over a ``tp`` mesh axis.

The Megatron layout, expressed as shardings and left to XLA's SPMD partitioner (the
model code is unchanged): projections into heads or the MLP's hidden units are split
by output columns (q/k/v, gate/up), projections back to the residual stream by input
rows (o, down), so each device holds ``1/tp`` of the heads and of the MLP and one
all-reduce per block joins the partial sums. The KV pool is split over KV heads, so a
device's attention reads only its own pages' slice. Embeddings and norms are small
and replicated. Requires ``num_heads``, ``num_kv_heads`` and ``intermediate_size`` to
be multiples of ``tp``.
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fbjax.config import ConfigError, ModelConfig

TP_AXIS = "tp"
# Parameter module names (also their fused forms) by how they are split.
COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "qkv_proj", "gate_proj", "up_proj",
                   "gate_up_proj")
ROW_PARALLEL = ("o_proj", "down_proj")


def make_mesh(model: ModelConfig, tp: int) -> Mesh:
    """A 1-D mesh of the first ``tp`` devices; a clear error when it cannot shard."""
    devices = jax.devices()
    if tp < 1 or tp > len(devices):
        raise ConfigError(f"tensor_parallel={tp}: this host has {len(devices)} "
                          f"{devices[0].platform} device(s) (on CPU, set XLA_FLAGS="
                          f"--xla_force_host_platform_device_count=N to test with more)")
    for field in ("num_heads", "num_kv_heads", "intermediate_size"):
        if getattr(model, field) % tp:
            raise ConfigError(f"tensor_parallel={tp} must divide the model's {field} "
                              f"({getattr(model, field)})")
    return Mesh(devices[:tp], (TP_AXIS,))


def _spec(path: tuple, leaf) -> P:
    names = [getattr(k, "key", getattr(k, "name", str(k))) for k in path]
    module, kind = (names[-2] if len(names) > 1 else ""), names[-1]
    if module in COLUMN_PARALLEL:
        return P(None, TP_AXIS) if kind == "kernel" else P(TP_AXIS)
    if module in ROW_PARALLEL and kind == "kernel":
        return P(TP_AXIS, None)
    return P()  # embeddings, norms, row-parallel biases: replicated


def param_shardings(params, mesh: Mesh):
    """The pytree of NamedShardings matching ``params``."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: NamedSharding(mesh, _spec(path, leaf)), params)


def kv_pool_sharding(mesh: Mesh) -> NamedSharding:
    """Pages [num_pages, page_size, kv_heads, head_dim] split over KV heads."""
    return NamedSharding(mesh, P(None, None, TP_AXIS, None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
