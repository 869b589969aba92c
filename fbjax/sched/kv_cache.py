"""Block allocator for the paged KV cache: which pages each sequence owns.

Pure Python on purpose: the schedulers (admission, preemption) and the simulator use
this very class, and neither may import JAX. The page *arrays* live with the model
runner; this module only hands out page ids.

Allocation is all-or-nothing: ``ensure`` either grows a sequence's table to hold the
requested number of tokens or changes nothing and returns False, which the scheduler
answers by preempting. Running out of pages is never an exception.

**Prefix caching** (``enable_prefix_caching``): a full page's content has a key (a
chain over the pages before it, so equal keys mean equal prefixes: see
:func:`token_page_keys`; the simulator derives keys from a trace's block hashes). Once
a sequence has computed a full page, ``register_pages`` publishes it under its key. A
new sequence first takes every page of its longest published prefix
(``acquire_prefix``): shared read-only, reference counted. A page whose last owner
leaves keeps its content and key on an LRU list; it is still free (counted in
``num_free_pages``) and is reused, its key dropped, only when no plain free page is
left. Only full pages are shared, and a sequence never writes into a page it
acquired (it computes from the first token after them), so sharing is read-only.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Hashable, Sequence


class KVCacheError(RuntimeError):
    """An allocator invariant was violated (double free, unknown sequence)."""


def token_page_keys(token_ids: Sequence[int], page_size: int, start_page: int = 0,
                    previous: Hashable = None) -> list[Hashable]:
    """Keys of the full pages of ``token_ids`` from ``start_page`` on (``previous``: the
    key of the page before it). A key is (hash of the previous key, the page's tokens):
    equal keys mean equal pages after equal prefixes, and comparing keys compares the
    tokens themselves, so a hash collision alone cannot alias two prefixes."""
    keys = []
    for start in range(start_page * page_size, len(token_ids) - page_size + 1, page_size):
        previous = (hash(previous), tuple(token_ids[start:start + page_size]))
        keys.append(previous)
    return keys


class BlockPageKeys(Sequence):
    """Page keys of a prompt known only by its trace's block hashes (Mooncake
    ``hash_ids``: block ``b`` of ``block_size`` tokens has an id that names the whole
    prefix up to it). Page ``j`` lies in block ``j * page_size // block_size``; its key
    is (block position, block id, page within the block), so two prompts share a page
    key exactly when they share that block's prefix. Computed on demand: a long prompt
    has hundreds of pages and the simulator looks at few of them per step.

    The prompt's pages are full pages of its ``prompt_len`` tokens; a partial last
    block only covers the pages it fills.
    """

    def __init__(self, hash_ids: Sequence[int], block_size: int, page_size: int,
                 prompt_len: int) -> None:
        if block_size % page_size:
            raise ValueError(f"hash block size {block_size} is not a multiple of the page "
                             f"size {page_size}")
        self.hash_ids = tuple(hash_ids)
        self.pages_per_block = block_size // page_size
        self._len = min(prompt_len // page_size, len(self.hash_ids) * self.pages_per_block)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, j):
        if isinstance(j, slice):
            return [self[i] for i in range(*j.indices(self._len))]
        if not -self._len <= j < self._len:
            raise IndexError(j)
        block, offset = divmod(j % self._len, self.pages_per_block)
        return (block, self.hash_ids[block], offset)


class KVCacheManager:
    """Free list of ``num_pages`` pages of ``page_size`` tokens and per-sequence tables."""

    def __init__(self, num_pages: int, page_size: int,
                 enable_prefix_caching: bool = False) -> None:
        if num_pages <= 0 or page_size <= 0:
            raise ValueError("num_pages and page_size must be positive")
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching
        self._free: deque[int] = deque(range(num_pages))  # free, nothing worth keeping
        self._tables: dict[Hashable, list[int]] = {}
        self._refs = [0] * num_pages  # sequences holding each page
        self._key_of: dict[int, Hashable] = {}  # published pages and their keys
        self._page_of: dict[Hashable, int] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()  # free but keyed, LRU first
        self._registered: dict[Hashable, int] = {}  # pages of each sequence published
        self.num_evictions = 0  # cached pages reused for other content

    @property
    def num_free_pages(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def capacity_tokens(self) -> int:
        return self.num_pages * self.page_size

    @property
    def num_cached_pages(self) -> int:
        """Pages whose content is published (in use or evictable)."""
        return len(self._key_of)

    def usage(self) -> float:
        """Share of pages in use, 0..1 (evictable cached pages count as free)."""
        return 1.0 - self.num_free_pages / self.num_pages

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def block_table(self, seq_id: Hashable) -> list[int]:
        return self._tables.get(seq_id, [])

    def num_pages_needed(self, seq_id: Hashable, num_tokens: int) -> int:
        """Extra pages ``seq_id`` needs to hold ``num_tokens`` tokens in total."""
        return max(0, self.pages_for(num_tokens) - len(self._tables.get(seq_id, ())))

    def can_fit(self, seq_id: Hashable, num_tokens: int) -> bool:
        return self.num_pages_needed(seq_id, num_tokens) <= self.num_free_pages

    def ensure(self, seq_id: Hashable, num_tokens: int) -> bool:
        """Grow ``seq_id``'s table to hold ``num_tokens`` tokens; False (no change) if full."""
        need = self.num_pages_needed(seq_id, num_tokens)
        if need > self.num_free_pages:
            return False
        table = self._tables.setdefault(seq_id, [])
        for _ in range(need):
            page = self._take_free_page()
            self._refs[page] = 1
            table.append(page)
        return True

    def _take_free_page(self) -> int:
        if self._free:
            return self._free.popleft()
        page, _ = self._evictable.popitem(last=False)  # least recently used
        del self._page_of[self._key_of.pop(page)]
        self.num_evictions += 1
        return page

    def reset_prefix_cache(self) -> None:
        """Forget every published page (benchmarks compare cold and warm runs on one
        engine). Pages in use stay with their sequences, unpublished; cached pages
        nobody holds become plain free pages."""
        self._free.extend(self._evictable)
        self._evictable.clear()
        self._key_of.clear()
        self._page_of.clear()
        self._registered = dict.fromkeys(self._registered, 0)

    def free(self, seq_id: Hashable) -> int:
        """Release all of ``seq_id``'s pages; freeing an unknown id is a no-op. Published
        pages nobody holds stay cached (evictable); the rest return to the free list."""
        table = self._tables.pop(seq_id, None)
        self._registered.pop(seq_id, None)
        if not table:
            return 0
        for page in table:
            self._refs[page] -= 1
            if self._refs[page]:
                continue
            if page in self._key_of:
                self._evictable[page] = None  # most recently used last
            else:
                self._free.append(page)
        return len(table)

    # ----- prefix caching -------------------------------------------------------------
    def _cached_prefix_pages(self, page_keys: Sequence[Hashable], max_tokens: int
                             ) -> list[int]:
        """The published pages of the longest cached prefix of ``page_keys``, at most
        ``max_tokens`` tokens of it (the one walk behind acquiring and looking)."""
        page_of = self._page_of
        pages = []
        for j in range(min(len(page_keys), max_tokens // self.page_size)):
            page = page_of.get(page_keys[j])
            if page is None:
                break
            pages.append(page)
        return pages

    def acquire_prefix(self, seq_id: Hashable, page_keys: Sequence[Hashable],
                       max_tokens: int) -> int:
        """Give a sequence with no pages yet the published pages of its longest cached
        prefix, at most ``max_tokens`` tokens of it; returns the tokens covered."""
        if not self.enable_prefix_caching or seq_id in self._tables:
            return 0
        table = self._cached_prefix_pages(page_keys, max_tokens)
        refs = self._refs
        for page in table:
            if refs[page] == 0:
                del self._evictable[page]
            refs[page] += 1
        if table:
            self._tables[seq_id] = table
            self._registered[seq_id] = len(table)
        return len(table) * self.page_size

    def cached_prefix_tokens(self, page_keys: Sequence[Hashable], max_tokens: int) -> int:
        """What ``acquire_prefix`` would cover now, without taking anything (a load
        estimate's look at queued prompts)."""
        if not self.enable_prefix_caching:
            return 0
        return len(self._cached_prefix_pages(page_keys, max_tokens)) * self.page_size

    def register_pages(self, seq_id: Hashable, page_keys: Sequence[Hashable],
                       num_computed_tokens: int) -> None:
        """Publish ``seq_id``'s pages that are now full and computed, under their keys
        (a key already published by another page keeps that page)."""
        if not self.enable_prefix_caching:
            return
        table = self._tables.get(seq_id, ())
        full = min(num_computed_tokens // self.page_size, len(page_keys), len(table))
        done = self._registered.get(seq_id, 0)
        for j in range(done, full):
            key, page = page_keys[j], table[j]
            if key not in self._page_of and page not in self._key_of:
                self._page_of[key] = page
                self._key_of[page] = key
        if full > done:
            self._registered[seq_id] = full

    def check_invariants(self) -> None:
        """Every page is free, evictable or held; held pages are counted exactly by their
        references; a page sits in one table at most once; keys map both ways."""
        held: dict[int, int] = {}
        for table in self._tables.values():
            if len(table) != len(set(table)):
                raise KVCacheError("a page appears twice in one sequence's table")
            for p in table:
                held[p] = held.get(p, 0) + 1
        if not self.enable_prefix_caching and any(n > 1 for n in held.values()):
            raise KVCacheError("a page is owned by two sequences")
        free = list(self._free)
        if len(free) != len(set(free)):
            raise KVCacheError("a page is on the free list twice (double free)")
        unowned = set(free) | set(self._evictable)
        if len(unowned) != len(free) + len(self._evictable):
            raise KVCacheError("a page is both free and evictable")
        if unowned & set(held):
            raise KVCacheError("a page is both free and owned")
        if len(held) + len(unowned) != self.num_pages:
            raise KVCacheError(f"leak: {self.num_pages - len(held) - len(unowned)} pages lost")
        if any(self._refs[p] != held.get(p, 0) for p in range(self.num_pages)):
            raise KVCacheError("a page's reference count differs from its holders")
        if any(p not in self._key_of for p in self._evictable):
            raise KVCacheError("an evictable page has no key")
        if any(self._page_of.get(k) != p for p, k in self._key_of.items()) or \
                len(self._page_of) != len(self._key_of):
            raise KVCacheError("prefix keys and pages disagree")
