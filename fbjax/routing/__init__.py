"""Cluster routing policies (PAB, least requests, round robin) and the hold queue.

Pure Python, one piece of code for every place that routes: the HTTP front door
(:mod:`fbjax.router`), the Ray Serve router (:mod:`fbjax.serve.ray_app`) and the
cluster simulator (:mod:`fbjax.sim.cluster`), which imports it without the HTTP stack.
"""
