"""Prefix caching in the KV page allocator: shared pages are reference counted, published
only when full, reused LRU only when nothing plain is free, and never handed out while
held. A hypothesis machine runs random request streams with shared prefixes against a
model of each page's content: a page acquired from the cache must hold the tokens its
key names, so a page recycled while in use, or published before it was written, fails.
"""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from fbjax.sched.kv_cache import KVCacheManager, token_page_keys

PAGE = 4


def test_token_page_keys_chain_prefixes():
    a = token_page_keys([1, 2, 3, 4, 5, 6, 7, 8, 9], PAGE)
    b = token_page_keys([1, 2, 3, 4, 5, 6, 7, 0], PAGE)
    c = token_page_keys([9, 2, 3, 4, 5, 6, 7, 8], PAGE)
    assert len(a) == 2 and a[0] == b[0] and a[1] != b[1]  # partial page: no key
    assert a[1] != c[1]  # same page tokens after another prefix: another key
    assert token_page_keys([1, 2, 3, 4, 5, 6, 7, 8], PAGE, start_page=1, previous=a[0]) == a[1:]


def test_second_request_reuses_the_published_prefix_and_refcounts_return_to_zero():
    kv = KVCacheManager(8, PAGE, enable_prefix_caching=True)
    prompt = list(range(10))  # 2 full pages + 2 tokens
    keys = token_page_keys(prompt, PAGE)
    assert kv.acquire_prefix("a", keys, len(prompt) - 1) == 0
    assert kv.ensure("a", len(prompt))
    kv.register_pages("a", keys, len(prompt))
    assert kv.num_cached_pages == 2
    assert kv.acquire_prefix("b", keys, len(prompt) - 1) == 8  # shared while a runs
    assert kv.block_table("b") == kv.block_table("a")[:2]
    assert kv.ensure("b", len(prompt)) and kv.block_table("b")[2] != kv.block_table("a")[2]
    kv.check_invariants()
    kv.free("a")
    kv.free("b")
    kv.check_invariants()
    assert kv.num_free_pages == 8 and kv.num_cached_pages == 2  # cached, yet free
    assert kv.cached_prefix_tokens(keys, len(prompt) - 1) == 8  # a look takes nothing
    assert kv.num_free_pages == 8


def test_cached_pages_are_evicted_lru_only_when_no_plain_page_is_left():
    kv = KVCacheManager(4, PAGE, enable_prefix_caching=True)
    for name, first in (("old", 0), ("new", 100)):
        prompt = list(range(first, first + 2 * PAGE))
        keys = token_page_keys(prompt, PAGE)
        assert kv.ensure(name, len(prompt))
        kv.register_pages(name, keys, len(prompt))
        kv.free(name)
    assert kv.num_cached_pages == 4 and kv.num_free_pages == 4
    assert kv.ensure("x", PAGE)  # evicts the least recently used: a page of "old"
    old_keys = token_page_keys(list(range(2 * PAGE)), PAGE)
    new_keys = token_page_keys(list(range(100, 100 + 2 * PAGE)), PAGE)
    assert kv.acquire_prefix("y", new_keys, 100) == 2 * PAGE
    assert kv.acquire_prefix("z", old_keys, 100) == 0  # its first page is gone
    kv.check_invariants()


def test_acquire_respects_max_tokens_and_disabled_cache_shares_nothing():
    kv = KVCacheManager(8, PAGE, enable_prefix_caching=True)
    keys = token_page_keys(list(range(12)), PAGE)
    kv.ensure("a", 12)
    kv.register_pages("a", keys, 12)
    assert kv.acquire_prefix("b", keys, 11) == 8  # the last token must be computed
    plain = KVCacheManager(8, PAGE)
    plain.ensure("a", 12)
    plain.register_pages("a", keys, 12)
    assert plain.acquire_prefix("b", keys, 11) == 0 and plain.num_cached_pages == 0


class PrefixCacheMachine(RuleBasedStateMachine):
    """Requests over a 3-token alphabet (so prefixes repeat) on a small pool."""

    def __init__(self) -> None:
        super().__init__()
        self.kv = KVCacheManager(12, PAGE, enable_prefix_caching=True)
        self.live: dict[int, dict] = {}
        self.content: dict[int, object] = {}  # page -> key of the tokens written there
        self.ids = 0

    @rule(prompt=st.lists(st.integers(0, 2), min_size=1, max_size=20))
    def start(self, prompt):
        keys = token_page_keys(prompt, PAGE)
        seq = self.ids
        self.ids += 1
        hit = self.kv.acquire_prefix(seq, keys, len(prompt) - 1)
        assert hit % PAGE == 0 and hit <= len(prompt) - 1
        for j, page in enumerate(self.kv.block_table(seq)):
            assert self.content.get(page) == keys[j], "a cached page lost its content"
        self.live[seq] = {"prompt": prompt, "keys": keys, "computed": hit}

    @rule(data=st.data())
    def compute(self, data):
        if not self.live:
            return
        seq = data.draw(st.sampled_from(sorted(self.live)))
        req = self.live[seq]
        total = len(req["prompt"])
        if req["computed"] >= total:
            return
        upto = data.draw(st.integers(req["computed"] + 1, total))
        if not self.kv.ensure(seq, upto):
            return  # pool full: the scheduler would preempt
        table = self.kv.block_table(seq)
        for j in range(req["computed"] // PAGE, -(-upto // PAGE)):  # pages written now
            self.content[table[j]] = req["keys"][j] if (j + 1) * PAGE <= upto else None
        req["computed"] = upto
        self.kv.register_pages(seq, req["keys"], upto)

    @rule(data=st.data())
    def finish(self, data):
        if not self.live:
            return
        seq = data.draw(st.sampled_from(sorted(self.live)))
        del self.live[seq]
        self.kv.free(seq)

    @invariant()
    def consistent(self):
        self.kv.check_invariants()
        for page, key in self.kv._key_of.items():
            assert self.content.get(page) == key, "a page is published with other content"

    def teardown(self):
        for seq in list(self.live):
            self.kv.free(seq)
        assert self.kv.num_free_pages == self.kv.num_pages
        assert all(r == 0 for r in self.kv._refs)


TestPrefixCacheMachine = PrefixCacheMachine.TestCase
TestPrefixCacheMachine.settings = settings(max_examples=150, stateful_step_count=40,
                                           deadline=None)
