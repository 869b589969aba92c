"""KVCacheManager: all-or-nothing allocation, freeing, and the invariant checker.

A hypothesis state machine drives random lives (allocate, grow, free, abort, oversized
requests) against a plain model of how many tokens each sequence holds, checking after
every step that no page is lost or shared and that failed requests change nothing.
"""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    rule,
)

from fbjax.sched.kv_cache import KVCacheError, KVCacheManager


def snapshot(kv: KVCacheManager) -> tuple[list[int], dict]:
    return list(kv._free), {k: list(v) for k, v in kv._tables.items()}


def assert_consistent(kv: KVCacheManager) -> None:
    """The invariants stated independently of ``check_invariants``."""
    kv.check_invariants()
    owned = [p for table in kv._tables.values() for p in table]
    assert len(owned) == len(set(owned)), "a page is handed to two sequences"
    assert kv.num_free_pages == kv.num_pages - len(owned)
    assert sorted(owned + list(kv._free)) == list(range(kv.num_pages))


# ----- direct unit tests ----------------------------------------------------------------

def test_constructor_rejects_non_positive_sizes():
    with pytest.raises(ValueError):
        KVCacheManager(0, 16)
    with pytest.raises(ValueError):
        KVCacheManager(4, 0)


def test_ensure_grows_by_whole_pages():
    kv = KVCacheManager(num_pages=8, page_size=4)
    assert kv.ensure("a", 1)
    assert len(kv.block_table("a")) == 1
    assert kv.ensure("a", 4)  # still one page
    assert len(kv.block_table("a")) == 1
    assert kv.ensure("a", 5)
    assert len(kv.block_table("a")) == 2
    assert kv.ensure("a", 3)  # asking for fewer tokens never shrinks the table
    assert len(kv.block_table("a")) == 2
    assert kv.num_free_pages == 6
    assert kv.usage() == pytest.approx(2 / 8)
    assert_consistent(kv)


def test_ensure_fails_without_change_when_pool_is_short():
    kv = KVCacheManager(num_pages=4, page_size=2)
    assert kv.ensure("a", 5)  # 3 pages
    assert kv.ensure("b", 1)  # 1 page, pool now empty
    before = snapshot(kv)
    assert not kv.can_fit("a", 7)
    assert not kv.ensure("a", 7)  # needs one more page, none free
    assert not kv.ensure("c", 1)  # a new sequence gets nothing either
    assert "c" not in kv._tables
    assert snapshot(kv) == before
    kv.free("b")
    before = snapshot(kv)
    assert not kv.ensure("a", 11)  # needs 3 more, only 1 free: no partial grant
    assert snapshot(kv) == before
    assert kv.ensure("a", 7)
    assert kv.num_free_pages == 0
    assert_consistent(kv)


def test_free_returns_page_count_and_unknown_id_is_zero():
    kv = KVCacheManager(num_pages=4, page_size=2)
    assert kv.free("nobody") == 0
    assert kv.ensure("a", 3)
    assert kv.free("a") == 2
    assert kv.free("a") == 0  # second free of the same id is a no-op, not a double free
    assert kv.num_free_pages == 4
    assert kv.block_table("a") == []
    assert_consistent(kv)


def test_freed_id_starts_over():
    kv = KVCacheManager(num_pages=4, page_size=2)
    assert kv.ensure("a", 8)
    kv.free("a")
    assert kv.ensure("a", 1)
    assert len(kv.block_table("a")) == 1
    assert kv.num_pages_needed("a", 8) == 3
    assert_consistent(kv)


def test_check_invariants_detects_duplicate_on_free_list():
    kv = KVCacheManager(num_pages=4, page_size=2)
    kv.check_invariants()
    kv._free.append(kv._free[0])
    with pytest.raises(KVCacheError):
        kv.check_invariants()


def test_check_invariants_detects_page_owned_twice():
    kv = KVCacheManager(num_pages=4, page_size=2)
    assert kv.ensure("a", 2)
    kv._tables["b"] = list(kv._tables["a"])
    kv._free.popleft()  # keep the total count right so only the sharing is wrong
    with pytest.raises(KVCacheError):
        kv.check_invariants()


def test_check_invariants_detects_page_both_free_and_owned():
    kv = KVCacheManager(num_pages=4, page_size=2)
    assert kv.ensure("a", 2)
    kv._free.append(kv._tables["a"][0])
    kv._free.popleft()
    with pytest.raises(KVCacheError):
        kv.check_invariants()


def test_check_invariants_detects_leak():
    kv = KVCacheManager(num_pages=4, page_size=2)
    kv._free.pop()
    with pytest.raises(KVCacheError):
        kv.check_invariants()


# ----- stateful property test -----------------------------------------------------------

class KVCacheMachine(RuleBasedStateMachine):
    """Random lives of sequences against a model {seq_id: tokens held}."""

    seqs = Bundle("seqs")

    @initialize(num_pages=st.integers(1, 24), page_size=st.integers(1, 8))
    def setup(self, num_pages, page_size):
        self.kv = KVCacheManager(num_pages, page_size)
        self.model: dict[int, int] = {}
        self.next_id = 0

    def _owned_pages(self) -> int:
        return sum(self.kv.pages_for(t) for t in self.model.values())

    def _expect_ensure(self, seq_id, num_tokens) -> None:
        """``ensure`` succeeds iff the extra pages are free; on failure nothing moves."""
        held = self.model.get(seq_id, 0)
        extra = max(0, self.kv.pages_for(num_tokens) - self.kv.pages_for(held))
        fits = extra <= self.kv.num_pages - self._owned_pages()
        before = snapshot(self.kv)
        table_before = list(self.kv.block_table(seq_id))
        ok = self.kv.ensure(seq_id, num_tokens)
        assert ok == fits
        if ok:
            self.model[seq_id] = max(held, num_tokens)
            table = self.kv.block_table(seq_id)
            assert table[: len(table_before)] == table_before  # existing pages stay put
            assert len(table) == self.kv.pages_for(self.model[seq_id])
        else:
            assert snapshot(self.kv) == before

    @rule(target=seqs, num_tokens=st.integers(1, 64))
    def allocate(self, num_tokens):
        seq_id = self.next_id
        self.next_id += 1
        self._expect_ensure(seq_id, num_tokens)
        return seq_id

    @rule(seq_id=seqs, more=st.integers(0, 20))
    def append(self, seq_id, more):
        self._expect_ensure(seq_id, self.model.get(seq_id, 0) + more)

    @rule(seq_id=seqs, more=st.integers(1, 4))
    def over_allocate(self, seq_id, more):
        """Ask for more pages than are free: must fail and change nothing."""
        free = self.kv.num_pages - self._owned_pages()
        held_pages = self.kv.pages_for(self.model.get(seq_id, 0))
        tokens = (held_pages + free + more) * self.kv.page_size
        before = snapshot(self.kv)
        assert not self.kv.can_fit(seq_id, tokens)
        assert not self.kv.ensure(seq_id, tokens)
        assert snapshot(self.kv) == before

    @rule(seq_id=consumes(seqs))
    def free(self, seq_id):
        self._free(seq_id)

    def _free(self, seq_id):
        expected = self.kv.pages_for(self.model.pop(seq_id, 0))
        assert self.kv.free(seq_id) == expected
        assert self.kv.block_table(seq_id) == []

    @rule(seq_id=consumes(seqs), more=st.integers(1, 20))
    def abort(self, seq_id, more):
        """Free in the middle of life (after a last growth attempt), then reuse the id."""
        self._expect_ensure(seq_id, self.model.get(seq_id, 0) + more)
        self._free(seq_id)
        assert self.kv.free(seq_id) == 0  # aborting twice is harmless
        self._expect_ensure(seq_id, 1)
        self._free(seq_id)

    @rule(unknown=st.integers(10_000, 20_000))
    def free_unknown(self, unknown):
        before = snapshot(self.kv)
        assert self.kv.free(unknown) == 0
        assert snapshot(self.kv) == before

    @invariant()
    def consistent(self):
        assert_consistent(self.kv)
        assert self.kv.num_free_pages == self.kv.num_pages - self._owned_pages()
        assert {k for k, v in self.kv._tables.items() if v} == {
            k for k, v in self.model.items() if v}

    def teardown(self):
        if not hasattr(self, "kv"):
            return
        for seq_id in list(self.model):
            self.kv.free(seq_id)
        self.model.clear()
        assert_consistent(self.kv)
        assert self.kv.num_free_pages == self.kv.num_pages
        assert self.kv.usage() == 0.0


KVCacheMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40,
                                            deadline=None)
TestKVCacheStateful = KVCacheMachine.TestCase
