"""Discrete-event simulation of serving instances driven by the real schedulers."""
