"""The router's hold queue: requests wait here while no replica can admit them.

Shared by the HTTP router and the cluster simulator, so both hold and release the
same way. A request is offered to the policy on arrival and again whenever the
caller calls ``dispatch`` (after a load poll or a completion). It leaves the queue
when the policy picks a replica, or is released to ``release_target`` once it has
waited ``max_hold_s`` or some replica is idle (an idle replica starts it at once;
holding longer cannot help). Beyond ``max_held`` requests, ``submit`` refuses, which
the HTTP router answers with 429: accepted requests are never dropped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Generic, TypeVar

from fbjax.routing.policy import ReplicaState, RoutingPolicy, release_target

# How long a request may wait for a budget to fit. Short: in the cluster simulator
# (bench_cluster.py, azure conv, 4 instances) holding 1 s cost attainment past capacity
# (0.95 vs 1.00 at 0.25 s, rate x5.25) because the wait eats the TTFT SLO it protects.
DEFAULT_MAX_HOLD_S = 0.25
# How often a router reads each replica's load: 20 Hz, a few decode steps apart.
DEFAULT_POLL_INTERVAL_S = 0.05

Item = TypeVar("Item")


@dataclasses.dataclass
class Held(Generic[Item]):
    item: Item
    prompt_tokens: int
    since: float


class Dispatcher(Generic[Item]):
    """FCFS offers over a bounded hold queue; later requests may pass a held one that
    does not fit yet (no head-of-line blocking behind a long prompt)."""

    def __init__(self, policy: RoutingPolicy, max_hold_s: float = DEFAULT_MAX_HOLD_S,
                 max_held: int = 1024) -> None:
        if max_hold_s < 0 or max_held < 0:
            raise ValueError("max_hold_s and max_held must be >= 0")
        self.policy = policy
        self.max_hold_s = max_hold_s
        self.max_held = max_held
        self.held: list[Held[Item]] = []
        self.num_held_total = 0  # requests that had to wait at least once

    def route(self, item: Item, prompt_tokens: int, now: float,
              replicas: Sequence[ReplicaState]) -> int | None:
        """Place a new request now if the policy can (returns the replica index and
        counts it routed); otherwise queue it and return None. Raises ``QueueFull``."""
        index = self._place(prompt_tokens, now, now, replicas)
        if index is not None:
            return index
        if len(self.held) >= self.max_held:
            raise QueueFull(f"router hold queue is full ({self.max_held} requests)")
        self.held.append(Held(item, prompt_tokens, now))
        self.num_held_total += 1
        return None

    def dispatch(self, now: float, replicas: Sequence[ReplicaState]) -> list[tuple[Item, int]]:
        """Offer every held request again, oldest first; returns those placed."""
        placed, still = [], []
        for held in self.held:
            index = self._place(held.prompt_tokens, held.since, now, replicas)
            if index is None:
                still.append(held)
            else:
                placed.append((held.item, index))
        self.held = still
        return placed

    def next_release_time(self) -> float | None:
        """When the oldest held request times out (the simulator's next event)."""
        if not self.held:
            return None
        return min(h.since for h in self.held) + self.max_hold_s

    def _place(self, prompt_tokens: int, since: float, now: float,
               replicas: Sequence[ReplicaState]) -> int | None:
        index = self.policy.choose(replicas, prompt_tokens)
        # ``since + max_hold_s`` exactly as next_release_time computes it: a simulator
        # that jumps to that time must see the request released (no rounding gap).
        if index is None and (now >= since + self.max_hold_s
                              or any(r.healthy and r.in_flight == 0 for r in replicas)):
            index = release_target(replicas)
        if index is not None:
            replicas[index].on_routed(prompt_tokens)
        return index


class QueueFull(RuntimeError):
    """The hold queue is at ``max_held``: refuse the request (HTTP 429)."""
