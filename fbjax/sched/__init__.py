"""Schedulers: pure Python, no JAX. They decide each step; executors carry it out."""
