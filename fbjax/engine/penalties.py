"""Token counts for the sampling penalties, kept on device between steps.

Presence and frequency penalties need each request's count of every vocabulary token
in its output so far; the repetition penalty also needs which tokens its prompt holds.

Design: a device-resident :class:`PenaltyState` with one row per *slot*, ``[slots, V]``
output counts (int32) and a ``[slots, V]`` prompt mask (bool), and a host-side
:class:`PenaltySlots` that lends a slot to each penalized request while it samples.
Why this and not the alternative of sending each penalized row's token ids every step
(vLLM v0's way): the ids are up to ``max_model_len`` per row, so a fixed-shape step
would carry ``[S, max_model_len]`` ids in every bucket, whether or not any request
asked for penalties, and rebuild ``[S, V]`` counts from them each step. The state costs
``slots x V x 5`` bytes once (32 slots x 49,152 tokens: 7.5 MiB; 256 x 128K: 160 MiB,
small beside the KV pages) and a step only scatter-adds the tokens it samples (vLLM's
new GPU runner keeps per-request bin counts the same way).

* **Batch invariance.** A row reads and writes only its own slot's row; rows without a
  slot (``slot < 0``) keep their logits bit for bit.
* **No cost without penalties.** Reading the rows and counting the sampled tokens each
  sit under a ``lax.cond`` on "any row has a slot"; the state is donated, so a step
  that skips them passes it through without a copy. Nothing recompiles: the slot
  column and the three penalty columns are ordinary per-row inputs of every bucket.
* **Slots follow requests, not batch rows.** The row order of a step changes from step
  to step; a request keeps its slot from its first sampled token until it finishes.
  A slot's row is (re)initialized from the host's token list, the ground truth, when it
  is lent (:func:`init_slot`: one fixed-shape call, so no recompiles): the prompt's
  tokens marked, the outputs so far counted. So the state never depends on which prompt
  tokens the step computed: prompt pages from the prefix cache, chunked prefill and
  recompute after a preemption (which keeps the outputs) all leave it right.
* **Enough slots.** There are as many slots as the largest bucket has rows. A slot
  whose request finished is free; when none is, one whose request does not sample in
  this step (preempted or waiting) is taken back, least recently used first, and
  initialized again when that request next samples.

The engine has no speculative or multi-step decoding, so a step samples at most one
token per request and that token is the one counted.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import export

from fbjax.engine.sampling import apply_penalties
from fbjax.sched.request import Request


class PenaltyState(NamedTuple):
    """Per slot: each token's count in the output so far, and whether the prompt holds it."""

    output_counts: jax.Array  # [slots, V] int32
    prompt_seen: jax.Array  # [slots, V] bool


# The step returns the state, and an exported step (engine/step_export.py) must name the
# types of its output tree.
export.register_namedtuple_serialization(PenaltyState,
                                         serialized_name="fbjax.engine.PenaltyState")


def make_penalty_state(num_slots: int, vocab_size: int) -> PenaltyState:
    return PenaltyState(jnp.zeros((num_slots, vocab_size), jnp.int32),
                        jnp.zeros((num_slots, vocab_size), jnp.bool_))


def penalize(logits: jax.Array, state: PenaltyState, slots: jax.Array, presence: jax.Array,
             frequency: jax.Array, repetition: jax.Array) -> jax.Array:
    """``logits`` [S, V] with each row that has a slot (``slots`` [S] >= 0) penalized by
    its slot's counts; a step where no row has one skips the work (``lax.cond``)."""
    has_slot = slots >= 0

    def apply():
        rows = jnp.maximum(slots, 0)
        penalized = apply_penalties(logits, state.output_counts[rows], state.prompt_seen[rows],
                                    presence, frequency, repetition)
        return jnp.where(has_slot[:, None], penalized, logits)

    return jax.lax.cond(jnp.any(has_slot), apply, lambda: logits)


def count_sampled(state: PenaltyState, slots: jax.Array, tokens: jax.Array) -> PenaltyState:
    """Add each sampled token [S] to its row's slot (rows without one add nothing); a
    step where no row has a slot leaves the state as it is (``lax.cond``)."""
    has_slot = slots >= 0

    def add():
        # Out-of-range rows are dropped (a negative index would wrap around instead).
        rows = jnp.where(has_slot, slots, state.output_counts.shape[0])
        counts = state.output_counts.at[rows, tokens].add(1, mode="drop")
        return PenaltyState(counts, state.prompt_seen)

    return jax.lax.cond(jnp.any(has_slot), add, lambda: state)


def init_slot(state: PenaltyState, slot: jax.Array, tokens: jax.Array, prompt_len: jax.Array,
              num_tokens: jax.Array) -> PenaltyState:
    """Slot ``slot``'s row rebuilt from a request's tokens (prompt then outputs; the first
    ``num_tokens`` of ``tokens``, which is padded to a fixed length)."""
    position = jnp.arange(tokens.shape[0])
    vocab = state.output_counts.shape[1]
    is_output = (position >= prompt_len) & (position < num_tokens)
    counts = jnp.zeros(vocab, jnp.int32).at[tokens].add(is_output.astype(jnp.int32))
    in_prompt = jnp.zeros(vocab, jnp.int32).at[tokens].add(
        (position < prompt_len).astype(jnp.int32)) > 0
    return PenaltyState(state.output_counts.at[slot].set(counts),
                        state.prompt_seen.at[slot].set(in_prompt))


def init_slot_args(slot: int, token_ids: Sequence[int], prompt_len: int,
                   max_len: int) -> tuple:
    """:func:`init_slot`'s arguments after the state, as host arrays of fixed shapes
    (``token_ids``: a request's prompt then outputs, at most ``max_len``)."""
    tokens = np.zeros(max_len, np.int32)
    tokens[:len(token_ids)] = token_ids
    return np.int32(slot), tokens, np.int32(prompt_len), np.int32(len(token_ids))


class PenaltySlots:
    """Host side: which slot of the state each penalized request holds (see the module
    docstring for when slots are lent, freed and taken back)."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        # request id -> (slot, request), least recently used first.
        self._held: collections.OrderedDict[str, tuple[int, Request]] = \
            collections.OrderedDict()

    def assign(self, requests: Iterable[Request]
               ) -> tuple[dict[str, int], list[tuple[int, Request]]]:
        """Slots for ``requests`` (the penalized ones sampling in this step, at most
        ``num_slots``), and the (slot, request) pairs newly lent, whose rows must be
        initialized before the step."""
        requests = list(requests)
        if len(requests) > self.num_slots:
            raise ValueError(f"{len(requests)} penalized requests in one step, but only "
                             f"{self.num_slots} penalty slots")
        for request_id, (_, request) in list(self._held.items()):
            if request.finished:
                del self._held[request_id]
        needed = {r.request_id for r in requests}
        slots, fresh = {}, []
        for request in requests:
            held = self._held.get(request.request_id)
            if held is None:
                held = (self._free_slot(needed), request)
                fresh.append(held)
            self._held[request.request_id] = held
            self._held.move_to_end(request.request_id)
            slots[request.request_id] = held[0]
        return slots, fresh

    def _free_slot(self, needed: set[str]) -> int:
        """A slot no request holds, or else the least recently used one held by a request
        that does not sample in this step."""
        used = {slot for slot, _ in self._held.values()}
        for slot in range(self.num_slots):
            if slot not in used:
                return slot
        victim = next(rid for rid in self._held if rid not in needed)
        return self._held.pop(victim)[0]
