"""The real executor: KV pages, ragged batches, compiled buckets, the engine loop.

Importing this package does not import JAX; ``kv_cache`` is pure Python and shared
with the schedulers and the simulator.
"""
