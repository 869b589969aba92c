"""Latency profiles, in parts with one job each.

* :mod:`fbjax.profiling.device` names this device as profiles are keyed (asks JAX);
* :mod:`fbjax.profiling.store` stores, finds, loads and checks profiles (pure Python;
  the engine, the simulator and the CLIs all load profiles through it);
* :mod:`fbjax.profiling.measure` measures the engine's compiled buckets on this machine
  and fits a profile (``python -m fbjax.profile``);
* :mod:`fbjax.profiling.vidur` builds GPU profiles offline from vidur's operator
  timings (``python scripts/build_gpu_profiles.py``).
"""
