"""Trace replay: ``python -m fbjax.replay``.

* :mod:`fbjax.replay.cli` is the command: a trace through the simulator or, with
  ``--engine``, through the real engine, with one report for both;
* :mod:`fbjax.replay.engine` runs a trace slice on the real engine (length scaling,
  calibration of the profile just before the slice, the same metrics the simulator
  reports), for the CLI and the engine benchmarks.
"""
