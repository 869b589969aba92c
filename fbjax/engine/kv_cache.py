"""Block allocator for the paged KV cache: which pages each sequence owns.

Pure Python on purpose: the schedulers (admission, preemption) and the simulator use
this very class, and neither may import JAX. The page *arrays* live with the model
runner; this module only hands out page ids.

Allocation is all-or-nothing: ``ensure`` either grows a sequence's table to hold the
requested number of tokens or changes nothing and returns False, which the scheduler
answers by preempting. Running out of pages is never an exception.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable


class KVCacheError(RuntimeError):
    """An allocator invariant was violated (double free, unknown sequence)."""


class KVCacheManager:
    """Free list of ``num_pages`` pages of ``page_size`` tokens and per-sequence tables."""

    def __init__(self, num_pages: int, page_size: int) -> None:
        if num_pages <= 0 or page_size <= 0:
            raise ValueError("num_pages and page_size must be positive")
        self.num_pages = num_pages
        self.page_size = page_size
        self._free: deque[int] = deque(range(num_pages))
        self._tables: dict[Hashable, list[int]] = {}

    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    @property
    def capacity_tokens(self) -> int:
        return self.num_pages * self.page_size

    def usage(self) -> float:
        """Share of pages in use, 0..1."""
        return 1.0 - len(self._free) / self.num_pages

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def block_table(self, seq_id: Hashable) -> list[int]:
        return self._tables.get(seq_id, [])

    def num_pages_needed(self, seq_id: Hashable, num_tokens: int) -> int:
        """Extra pages ``seq_id`` needs to hold ``num_tokens`` tokens in total."""
        return max(0, self.pages_for(num_tokens) - len(self._tables.get(seq_id, ())))

    def can_fit(self, seq_id: Hashable, num_tokens: int) -> bool:
        return self.num_pages_needed(seq_id, num_tokens) <= len(self._free)

    def ensure(self, seq_id: Hashable, num_tokens: int) -> bool:
        """Grow ``seq_id``'s table to hold ``num_tokens`` tokens; False (no change) if full."""
        need = self.num_pages_needed(seq_id, num_tokens)
        if need > len(self._free):
            return False
        table = self._tables.setdefault(seq_id, [])
        for _ in range(need):
            table.append(self._free.popleft())
        return True

    def free(self, seq_id: Hashable) -> int:
        """Return all of ``seq_id``'s pages to the pool; freeing an unknown id is a no-op."""
        table = self._tables.pop(seq_id, None)
        if not table:
            return 0
        self._free.extend(table)
        return len(table)

    def check_invariants(self) -> None:
        """Every page is either free or owned by exactly one sequence, never both."""
        owned = [p for table in self._tables.values() for p in table]
        if len(owned) != len(set(owned)):
            raise KVCacheError("a page is owned by two sequences")
        free = list(self._free)
        if len(free) != len(set(free)):
            raise KVCacheError("a page is on the free list twice (double free)")
        if set(owned) & set(free):
            raise KVCacheError("a page is both free and owned")
        if len(owned) + len(free) != self.num_pages:
            raise KVCacheError(f"leak: {self.num_pages - len(owned) - len(free)} pages lost")
