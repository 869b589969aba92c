"""Routing policies: which replica gets the next request.

Pure Python (no JAX, no HTTP) so the standalone router, the Ray Serve request router
and the cluster simulator run the very same decisions. A policy sees one
``ReplicaState`` per replica and the request's prompt length and returns the index
of the replica to use, or ``None`` to hold the request (only ``pab`` holds: when no
replica can start the prompt within its TTFT SLO, sending it anywhere only queues it
behind work that is already late; the caller keeps it and offers it again when a
budget frees up).

The Prefill Admission Budget (PAB) is the FairBatching load estimate
(``FairBatchingScheduler.load_estimate``): prompt tokens a replica can still start
within the TTFT SLO. It is polled; between polls the router subtracts the prompt
tokens it has itself sent since the poll, so a burst does not pour into the replica
that looked emptiest at the last poll.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import Protocol

POLICY_NAMES = ("pab", "least_requests", "round_robin")


@dataclasses.dataclass
class ReplicaState:
    """What the router knows of one replica: its last load report and its own counts."""

    name: str
    healthy: bool = True
    in_flight: int = 0  # routed here and not yet finished (router's own accounting)
    reported_budget: float | None = None  # PAB at the last poll, prompt tokens
    sent_since_poll: int = 0  # prompt tokens routed here since that poll

    @property
    def budget(self) -> float | None:
        """The PAB now: the last report less what was sent since."""
        if self.reported_budget is None:
            return None
        return self.reported_budget - self.sent_since_poll

    def on_poll(self, budget: float | None) -> None:
        """A fresh load report supersedes the router's running correction."""
        self.reported_budget = budget
        self.sent_since_poll = 0

    def on_routed(self, prompt_tokens: int) -> None:
        self.in_flight += 1
        self.sent_since_poll += prompt_tokens

    def on_finished(self) -> None:
        self.in_flight = max(0, self.in_flight - 1)


class RoutingPolicy(Protocol):
    name: str

    def choose(self, replicas: Sequence[ReplicaState], prompt_tokens: int) -> int | None:
        """Index of the replica for a request of ``prompt_tokens``, or None to hold it."""


class NoHealthyReplica(RuntimeError):
    """Every replica is marked unhealthy; the request cannot be placed anywhere."""


def _healthy(replicas: Sequence[ReplicaState]) -> list[int]:
    alive = [i for i, r in enumerate(replicas) if r.healthy]
    if not alive:
        raise NoHealthyReplica("no healthy replica to route to")
    return alive


class RoundRobin:
    """Each healthy replica in turn, blind to load: the usual default."""

    name = "round_robin"

    def __init__(self) -> None:
        self._counter = itertools.count()

    def choose(self, replicas: Sequence[ReplicaState], prompt_tokens: int) -> int:
        alive = _healthy(replicas)
        return alive[next(self._counter) % len(alive)]


class LeastRequests:
    """The healthy replica with the fewest requests in flight (ties: lowest index).
    What vLLM's production stack and Ray Serve's power-of-two router approximate."""

    name = "least_requests"

    def choose(self, replicas: Sequence[ReplicaState], prompt_tokens: int) -> int:
        return min(_healthy(replicas), key=lambda i: (replicas[i].in_flight, i))


class PrefillAdmissionBudget:
    """The replica with the most PAB left, among those whose budget fits the prompt.

    None (hold) when no healthy replica's budget fits the prompt. A replica that has
    not reported yet counts as unknown and is used only when no replica has reported
    (start-up): then the policy falls back to least requests.
    """

    name = "pab"

    def choose(self, replicas: Sequence[ReplicaState], prompt_tokens: int) -> int | None:
        alive = _healthy(replicas)
        known = [i for i in alive if replicas[i].budget is not None]
        if not known:
            return LeastRequests().choose(replicas, prompt_tokens)
        fits = [i for i in known if replicas[i].budget >= prompt_tokens]
        if not fits:
            return None
        return max(fits, key=lambda i: (replicas[i].budget, -replicas[i].in_flight, -i))


def release_target(replicas: Sequence[ReplicaState]) -> int:
    """Where a held request goes once holding it no longer helps: an idle replica if
    there is one (nothing could start it sooner), else the largest budget."""
    alive = _healthy(replicas)
    idle = [i for i in alive if replicas[i].in_flight == 0]
    if idle:
        return idle[0]
    return max(alive, key=lambda i: (replicas[i].budget if replicas[i].budget is not None
                                     else float("-inf"), -replicas[i].in_flight, -i))


def make_policy(name: str) -> RoutingPolicy:
    if name == "round_robin":
        return RoundRobin()
    if name == "least_requests":
        return LeastRequests()
    if name == "pab":
        return PrefillAdmissionBudget()
    raise ValueError(f"unknown routing policy {name!r}; choose one of {list(POLICY_NAMES)}")
