"""Shared parts of the ragged paged attention conformance suite.

Every implementation of ``fbjax_kernels.ragged_paged_attention`` (same signature, same
semantics) is checked by the same tests in ``test_conformance.py``; this module holds
what they share:

* ``IMPLS``: the implementation table. Each ``Impl`` names a callable and declares what
  it supports (dtypes, page-size / head-dim multiples, options, the smallest sliding
  window it accepts), its tuning knobs and bad options, how close it must be to the
  jax.numpy reference, whether its batch invariance is bitwise, and its *level*: how
  many cases it can afford (see below).
* ``SCENARIOS`` and ``make_batch``: the one batch builder (a scenario name or explicit
  ``(q_len, kv_len)`` pairs), cached so that a batch is built, run through the oracle and
  through the reference once, whichever implementation asks.
* ``check``: one comparison with the float64 NumPy oracle (``oracle.py``) with
  per-dtype tolerances; padding tokens must be exact zeros.
* ``BAD_ARGS``: one table of malformed arguments every implementation must reject.
* ``PROFILES`` / ``ragged_batches``: the hypothesis strategy for random ragged batches.

Levels. On CPU the Pallas kernels run in interpreters and ``xla`` compiles slowly, so
the case set an implementation gets is sized by its level: a case of level ``L`` runs
for every implementation of level ``>= L`` and is not generated for the others. The
levels, cheapest implementation last:

* ``CORE`` (0): every implementation; ``pallas_tpu`` (Mosaic TPU interpreter, ~4 s a
  case) gets only these.
* ``STANDARD`` (1): also ``pallas_gpu`` (generic Pallas interpreter, ~2 s a case).
* ``FULL`` (2): also ``xla`` (~4 s of XLA compilation a case): batch invariance over
  many shapes, full-size random batches.
* ``EXTRA`` (3): also ``reference`` (~1.5 s a case): the remaining option x dtype mixes.
* ``EXHAUSTIVE`` (4): ``cpu_ffi`` (a trivial XLA program around the C++ call per case;
  every ISA this CPU runs): odd head dims, page sizes and GQA groups, page and
  key-block edges, many chunk splits.

A generated case whose shapes or options an implementation does not support (its
declared capability limits) is skipped with the reason, never passed silently.

This module imports only fbjax_kernels, jax, numpy, hypothesis and pytest.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fbjax_kernels.ragged_paged_attention import (
    cpu_ffi,
    reference_attention,
    write_kv,
    xla_attention,
)
from fbjax_kernels.ragged_paged_attention.gpu import ragged_paged_attention as gpu_attention
from fbjax_kernels.ragged_paged_attention.tpu import ragged_paged_attention as tpu_attention
from hypothesis import strategies as st

from .oracle import RaggedBatch, make_ragged_batch, oracle_attention, pages_needed

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Oracle tolerance (rtol = atol) on real tokens.
TOL = {"float32": 1e-5, "bfloat16": 2e-2}
# The options every implementation shares with the oracle; the rest are tuning knobs.
ORACLE_OPTIONS = ("sm_scale", "sliding_window", "soft_cap")
JNP_STATIC = (*ORACLE_OPTIONS, "kv_block_tokens", "q_block")

CORE, STANDARD, FULL, EXTRA, EXHAUSTIVE = range(5)


# -------------------------------------------------------------------- implementations


@dataclasses.dataclass(frozen=True)
class Impl:
    name: str
    fn: Callable  # the registered function (eager)
    registry: str  # its name in get_attention
    static: tuple[str, ...]  # keyword options, static under jit
    level: int  # how many cases it gets (CORE .. EXHAUSTIVE)
    fixed: tuple[tuple[str, object], ...] = ()  # keyword arguments of every call
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    # Capability limits: cases outside them are skipped with the reason.
    page_size_multiple: tuple[tuple[str, int], ...] = ()  # (dtype, multiple)
    head_dim_multiple: int = 1
    min_sliding_window: int = 1
    # Result guarantees.
    bitwise: bool = False  # a token's result depends only on its query, position, keys
    invariance_atol: tuple[tuple[str, float], ...] = ()  # else: alone vs batched, per dtype
    ref_tol: tuple[tuple[str, tuple[float, float]], ...] = ()  # (dtype, (rtol, atol))
    ref_every_check: bool = False  # compare with the reference in every ``check``
    # Backend knobs.
    tunings: tuple[tuple[str, tuple[tuple[str, object], ...]], ...] = ()
    bad_options: tuple[tuple[str, object, str], ...] = ()  # (option, value, error match)
    # Random batches.
    profile: str = "full"
    max_examples: int = 15

    def __repr__(self) -> str:  # pytest ids and failure messages
        return self.name

    @property
    def call(self) -> Callable:
        """The eager function with this row's fixed arguments."""
        return functools.partial(self.fn, **dict(self.fixed))

    def unsupported(self, *, dtype: str = "float32", page_size: int = 16,
                    head_dim: int = 64, options: Iterable[str] = (),
                    sliding_window: int | None = None) -> str | None:
        """Why this implementation cannot run such a case (None: it can)."""
        if dtype not in self.dtypes:
            return f"{self.name} has no {dtype} path"
        multiple = dict(self.page_size_multiple).get(dtype, 1)
        if page_size % multiple:
            return f"{self.name} needs {dtype} page sizes that are multiples of {multiple}"
        if head_dim % self.head_dim_multiple:
            return f"{self.name} needs head dims that are multiples of {self.head_dim_multiple}"
        missing = sorted(set(options) - set(self.static))
        if missing:
            return f"{self.name} has no option {missing}"
        if sliding_window is not None and sliding_window < self.min_sliding_window:
            return f"{self.name} rejects sliding_window < {self.min_sliding_window}"
        return None


def _tunings(**named: dict) -> tuple:
    return tuple((name, tuple(kw.items())) for name, kw in named.items())


CPU_ISAS = cpu_ffi.supported_isas()
DEFAULT_ISA = cpu_ffi.default_isa()
_REF_TOL = (("float32", (1e-5, 1e-5)), ("bfloat16", (2e-2, 2e-2)))  # rtol, atol

REFERENCE = Impl(
    "reference", reference_attention, "reference", JNP_STATIC, EXTRA,
    min_sliding_window=0,
    invariance_atol=(("float32", 2e-6), ("bfloat16", 1e-2)),
    # the block size changes only the summation order, never the result
    tunings=_tunings(k16={"kv_block_tokens": 16}, k64={"kv_block_tokens": 64},
                     k256={"kv_block_tokens": 256}),
)
IMPLS: tuple[Impl, ...] = (
    REFERENCE,
    Impl(
        "xla", xla_attention, "xla", JNP_STATIC, FULL,
        min_sliding_window=0,
        # Alone vs batched runs on other shapes (query blocks of another length, another
        # program), so float32 sums may round differently: a few ulps, not bits.
        invariance_atol=(("float32", 2e-6), ("bfloat16", 1e-2)),
        ref_tol=_REF_TOL,
        # every block size and every query block once (not their 12 pairs: ~5 s of
        # compilation each), an odd query block with the smallest key block
        tunings=_tunings(**{f"k{k}_q{q}": {"kv_block_tokens": k, "q_block": q}
                            for k, q in ((16, 5), (16, 64), (64, 1), (256, 16))}),
    ),
    *(
        Impl(
            f"cpu_ffi-{isa}", cpu_ffi.ragged_paged_attention, "cpu_ffi",
            (*JNP_STATIC, "isa"), EXHAUSTIVE, fixed=(("isa", isa),),
            min_sliding_window=0,
            bitwise=True,
            # max abs difference to the reference, on every check
            ref_tol=(("float32", (0.0, 1e-5)), ("bfloat16", (0.0, 2e-2))),
            ref_every_check=True,
            # the jnp tiling knobs are accepted and ignored
            tunings=_tunings(jnp_knobs={"kv_block_tokens": 16, "q_block": 5}),
            max_examples=25 if isa == DEFAULT_ISA else 5,
        )
        for isa in CPU_ISAS
    ),
    Impl(
        "pallas_gpu", gpu_attention, "pallas_gpu",
        (*JNP_STATIC, "num_warps", "num_stages"), STANDARD,
        # float32: both sum in float32 in other orders; bfloat16: the kernel rounds the
        # softmax weights to bfloat16 for the p @ V matmul, the reference does not
        ref_tol=(("float32", (0.0, 2e-6)), ("bfloat16", (0.0, 2e-2))),
        # tile sizes change only the work split and the summation order
        tunings=_tunings(
            k16={"kv_block_tokens": 16}, k128={"kv_block_tokens": 128}, q1={"q_block": 1},
            q3={"q_block": 3},
            q32_k32={"q_block": 32, "kv_block_tokens": 32, "num_warps": 8, "num_stages": 3},
        ),
        bad_options=(("sliding_window", 0, "'sliding_window'"), ("soft_cap", 0.0, "'soft_cap'"),
                     ("soft_cap", -1.0, "'soft_cap'"),
                     ("kv_block_tokens", 0, "'kv_block_tokens'"), ("q_block", 0, "'q_block'"),
                     ("num_warps", 0, "'num_warps'"), ("sm_scale", float("nan"), "'sm_scale'")),
        profile="small", max_examples=8,
    ),
    Impl(
        "pallas_tpu", tpu_attention, "pallas_tpu",
        (*JNP_STATIC, "kv_heads_block", "interpret"), CORE,
        # Mosaic reshapes [pages, page_size, D] -> [keys, D]: page_size must be a multiple
        # of the sublane tile (8 rows of 32 bits, 16 of bfloat16)
        page_size_multiple=(("float32", 8), ("bfloat16", 16)),
        ref_tol=_REF_TOL,
        tunings=_tunings(
            one_page_blocks={"kv_block_tokens": 16, "sliding_window": 90},
            one_token_q_blocks={"kv_block_tokens": 64, "q_block": 1, "sliding_window": 90},
            big_blocks_one_head_per_step={"kv_block_tokens": 1024, "q_block": 7,
                                          "kv_heads_block": 1, "sliding_window": 90},
        ),
        bad_options=(("kv_heads_block", 3, "kv_heads_block"), ("q_block", 0, "q_block"),
                     ("sliding_window", 0, "sliding_window")),
        profile="small", max_examples=8,
    ),
)
BY_NAME = {impl.name: impl for impl in IMPLS}
CPU_FFI = BY_NAME[f"cpu_ffi-{DEFAULT_ISA}"]


@functools.cache
def jitted(impl: Impl) -> Callable:
    """One jitted function per implementation, shared by every test (and so its cache)."""
    return jax.jit(impl.call, static_argnames=impl.static)


jit_write_kv = jax.jit(write_kv)


# ---------------------------------------------------------------------------- batches


# (q_len, kv_len) per sequence for each scenario.
SCENARIOS = {
    "decode": [(1, 1), (1, 17), (1, 128), (1, 129), (1, 300)],
    "prefill": [(37, 37), (128, 128), (5, 5), (200, 200)],
    # prefill chunks that follow a cached prefix, a fresh prompt, and decodes
    "mixed": [(50, 300), (1, 129), (33, 33), (1, 1), (70, 96), (1, 257)],
    # real sequences with no query tokens this step, between and around others
    "zero_q_len": [(0, 40), (12, 60), (0, 0), (1, 77), (0, 200), (9, 9)],
}


@dataclasses.dataclass
class Batch(RaggedBatch):
    """A ``RaggedBatch`` with the ``make_batch`` arguments that built it (None: not
    cached); results for a keyed batch are computed once and shared."""

    key: tuple | None = None


_BATCHES: dict[tuple, Batch] = {}


def make_batch(
    spec: str | Iterable[tuple[int, int]],
    *,
    seed: int = 0,
    page_size: int = 16,
    kv_heads: int = 2,
    ratio: int = 4,
    head_dim: int = 64,
    dtype: str = "float32",
    extra_seqs: int = 0,
    extra_tokens: int = 0,
    spare_pages: int = 5,
    pages_per_seq: int | None = None,
    cache: bool = True,
) -> Batch:
    """The batch of scenario ``spec`` (or of explicit ``(q_len, kv_len)`` pairs):
    ``extra_seqs`` padding sequences, ``extra_tokens`` padding tokens, ``spare_pages``
    pages nobody owns, everything random from ``seed``. Cached batches are shared and
    read-only: change a copy (``dataclasses.replace(batch, ..., key=None)``)."""
    pairs = tuple(tuple(p) for p in (SCENARIOS[spec] if isinstance(spec, str) else spec))
    key = (pairs, seed, page_size, kv_heads, ratio, head_dim, dtype, extra_seqs,
           extra_tokens, spare_pages, pages_per_seq)
    if cache and key in _BATCHES:
        return _BATCHES[key]
    q_lens = [q for q, _ in pairs]
    kv_lens = [kv for _, kv in pairs]
    raw = make_ragged_batch(
        np.random.default_rng(seed), len(pairs), q_lens, kv_lens, page_size,
        pages_needed(kv_lens, page_size) + spare_pages, kv_heads, kv_heads * ratio,
        head_dim, DTYPES[dtype], max_seqs=len(pairs) + extra_seqs,
        num_tokens=sum(q_lens) + extra_tokens, pages_per_seq=pages_per_seq,
    )
    batch = Batch(**{f.name: getattr(raw, f.name) for f in dataclasses.fields(raw)},
                  key=key if cache else None)
    if cache:
        for f in dataclasses.fields(raw):
            getattr(batch, f.name).setflags(write=False)
        _BATCHES[key] = batch
    return batch


def no_live_sequences() -> Batch:
    """num_seqs = 0 in a bucket of 4 sequences and 8 tokens."""
    raw = make_ragged_batch(np.random.default_rng(3), 0, [], [], 16, 4, 2, 4, 64, np.float32,
                            max_seqs=4, num_tokens=8)
    return Batch(**{f.name: getattr(raw, f.name) for f in dataclasses.fields(raw)})


def with_arrays(batch: Batch, **arrays) -> Batch:
    """A copy of ``batch`` with some arrays replaced (not cached)."""
    return dataclasses.replace(batch, key=None, **arrays)


def alone(batch: RaggedBatch, s: int, num_tokens: int | None = None) -> Batch:
    """Sequence ``s`` of ``batch`` as a batch of one over the same cache and pages,
    optionally followed by padding tokens (ones) up to ``num_tokens``."""
    start, end = int(batch.cu_q_lens[s]), int(batch.cu_q_lens[s + 1])
    pad = 0 if num_tokens is None else num_tokens - (end - start)
    q = np.concatenate([batch.q[start:end], np.ones((pad, *batch.q.shape[1:]), batch.q.dtype)])
    num_slots = batch.k_cache.shape[0] * batch.k_cache.shape[1]
    return Batch(
        q=q,
        k_cache=batch.k_cache,
        v_cache=batch.v_cache,
        kv_lens=batch.kv_lens[s:s + 1],
        page_indices=batch.page_indices[s:s + 1],
        cu_q_lens=np.array([0, end - start], np.int32),
        num_seqs=np.asarray(1, np.int32),
        q_lens=batch.q_lens[s:s + 1],
        slot_mapping=np.concatenate(
            [batch.slot_mapping[start:end], np.full(pad, num_slots, np.int32)]
        ),
    )


# ---------------------------------------------------------------------------- results


def oracle_kwargs(kw: dict) -> dict:
    return {k: v for k, v in kw.items() if k in ORACLE_OPTIONS}


_ORACLE: dict[tuple, np.ndarray] = {}
_REFERENCE: dict[tuple, np.ndarray] = {}


def _memo(store: dict, batch: Batch, kw: dict, compute: Callable[[], np.ndarray]):
    if getattr(batch, "key", None) is None:
        return compute()
    key = (batch.key, tuple(sorted(kw.items())))
    if key not in store:
        store[key] = compute()
    return store[key]


def expected(batch: RaggedBatch, **kw) -> np.ndarray:
    """The oracle's float64 answer (computed once per cached batch and options)."""
    kw = oracle_kwargs(kw)
    return _memo(_ORACLE, batch, kw, lambda: oracle_attention(*batch.args, **kw))


def reference(batch: RaggedBatch, **kw) -> np.ndarray:
    """The jitted jax.numpy reference's answer (once per cached batch and options)."""
    kw = oracle_kwargs(kw)
    return _memo(_REFERENCE, batch, kw, lambda: run(REFERENCE, batch, **kw))


def run(impl: Impl, batch: RaggedBatch, **kw) -> np.ndarray:
    return np.asarray(jitted(impl)(*batch.args, **kw))


def assert_matches_reference(impl: Impl, batch: RaggedBatch, out: np.ndarray, dtype: str,
                             **kw) -> None:
    rtol, atol = dict(impl.ref_tol)[dtype]
    np.testing.assert_allclose(out.astype(np.float32),
                               reference(batch, **kw).astype(np.float32), rtol=rtol,
                               atol=atol, err_msg=f"{impl.name} vs reference")


def check(impl: Impl, batch: RaggedBatch, dtype: str = "float32", **kw) -> np.ndarray:
    """``impl`` against the oracle on real tokens (rtol = atol = ``TOL[dtype]``), exact
    zeros on padding tokens, output shape and dtype those of ``q``; and against the
    reference too where the implementation asks for that on every check."""
    out = run(impl, batch, **kw)
    assert out.shape == batch.q.shape
    assert out.dtype == batch.q.dtype
    real = batch.num_real_tokens
    tol = TOL[dtype]
    np.testing.assert_allclose(out[:real].astype(np.float64), expected(batch, **kw)[:real],
                               rtol=tol, atol=tol, err_msg=f"{impl.name} vs oracle")
    # padding tokens past cu_q_lens[num_seqs] get exact zeros
    assert not np.any(out[real:].astype(np.float32))
    if impl.ref_every_check:
        assert_matches_reference(impl, batch, out, dtype, **kw)
    return out


# -------------------------------------------------------------------------- the cases


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    level: int
    params: dict = dataclasses.field(default_factory=dict)

    def __getitem__(self, name):
        return self.params[name]

    def get(self, name, default=None):
        return self.params.get(name, default)


def case(id: str, level: int, **params) -> Case:
    return Case(id, level, params)


def _needs(params: dict) -> dict:
    """The capability-relevant parts of a case's parameters."""
    batch = params.get("batch", {})
    kw = params.get("kw", {})
    return {
        "dtype": batch.get("dtype", "float32"),
        "page_size": batch.get("page_size", 16),
        "head_dim": batch.get("head_dim", 64),
        "options": tuple(kw),
        "sliding_window": kw.get("sliding_window"),
    }


def params(cases: Iterable[Case], *, where: Callable[[Impl], bool] = lambda i: True):
    """pytest parameters ``(impl, case)`` for every implementation whose level reaches
    the case's; unsupported combinations are skipped with the reason."""
    out = []
    for impl in IMPLS:
        if not where(impl):
            continue
        for c in cases:
            if impl.level < c.level:
                continue  # too costly for this implementation: not generated
            reason = impl.unsupported(**_needs(c.params))
            marks = [pytest.mark.skip(reason=reason)] if reason else []
            out.append(pytest.param(impl, c, id=f"{impl.name}-{c.id}", marks=marks))
    return out


def impl_params(*, level: int = CORE, where: Callable[[Impl], bool] = lambda i: True):
    """pytest parameters ``impl`` for the implementations of at least ``level``."""
    return [pytest.param(impl, id=impl.name) for impl in IMPLS
            if impl.level >= level and where(impl)]


# The malformed arguments every implementation rejects with a ValueError naming the
# argument (also while tracing under jit).
BAD_ARGS = {
    "q_2d": ("q", lambda a: a["q"][:, 0, :]),
    "q_int": ("q", lambda a: a["q"].astype(np.int32)),
    "q_heads_not_multiple": ("q", lambda a: a["q"][:, :3, :]),
    "k_cache_int": ("k_cache", lambda a: a["k_cache"].astype(np.int8)),
    "k_cache_3d": ("k_cache", lambda a: a["k_cache"][0]),
    "k_cache_head_dim": ("k_cache", lambda a: a["k_cache"][..., :32]),  # v_cache too
    "v_cache_shape": ("v_cache", lambda a: a["v_cache"][:-1]),
    "v_cache_int": ("v_cache", lambda a: a["v_cache"].astype(np.int32)),
    "kv_lens_2d": ("kv_lens", lambda a: a["kv_lens"][:, None]),
    "kv_lens_float": ("kv_lens", lambda a: a["kv_lens"].astype(np.float32)),
    "page_indices_first_dim": ("page_indices", lambda a: a["page_indices"][:-1]),
    "page_indices_1d": ("page_indices", lambda a: a["page_indices"][:, 0]),
    "page_indices_float": ("page_indices", lambda a: a["page_indices"].astype(np.float32)),
    "cu_q_lens_length": ("cu_q_lens", lambda a: a["cu_q_lens"][:-1]),
    "cu_q_lens_float": ("cu_q_lens", lambda a: a["cu_q_lens"].astype(np.float32)),
    "num_seqs_vector": ("num_seqs", lambda a: np.array([1, 2], np.int32)),
}
ARG_NAMES = ("q", "k_cache", "v_cache", "kv_lens", "page_indices", "cu_q_lens", "num_seqs")


def bad_arguments(case_name: str) -> tuple[str, dict]:
    """(the argument named in the error, keyword arguments with that one corrupted)."""
    name, corrupt = BAD_ARGS[case_name]
    args = dict(zip(ARG_NAMES, make_batch("decode").args, strict=True))
    args[name] = corrupt(args)
    if case_name == "k_cache_head_dim":
        args["v_cache"] = args["v_cache"][..., :32]
    return name, args


# --------------------------------------------------------------------- random batches


@dataclasses.dataclass(frozen=True)
class Profile:
    """The ranges of random ragged batches, padded to fixed shapes (``max_seqs``
    sequences, ``max_seqs * max_q`` tokens) to keep the number of compilations small."""

    max_seqs: int
    max_decode_prefix: int
    max_q: int  # prefill and chunk query tokens
    max_chunk_prefix: int
    max_idle_kv: int
    max_kv: int  # pages_per_seq * page_size
    # (page_size, q heads per kv head, head_dim) with kv_heads = 2, drawn together so
    # that each implementation compiles one program per layout and window
    layouts: tuple[tuple[int, int, int], ...]
    windows: tuple[int | None, ...]
    spare_pages: int = 0

    @property
    def num_tokens(self) -> int:
        return self.max_seqs * self.max_q


PROFILES = {
    "full": Profile(max_seqs=8, max_decode_prefix=1999, max_q=300, max_chunk_prefix=1700,
                    max_idle_kv=2000, max_kv=2048,
                    layouts=((16, 2, 64), (32, 4, 32), (64, 2, 64)), windows=(None,)),
    # small contexts for the interpreters, with sliding windows
    "small": Profile(max_seqs=4, max_decode_prefix=300, max_q=40, max_chunk_prefix=260,
                     max_idle_kv=300, max_kv=384, layouts=((16, 2, 64), (32, 2, 64)),
                     windows=(None, 2, 33), spare_pages=3),
}


def random_layouts(impl: Impl, profile: Profile) -> tuple[tuple[int, int, int], ...]:
    """The profile's layouts that ``impl`` supports in float32."""
    return tuple(layout for layout in profile.layouts
                 if impl.unsupported(page_size=layout[0], head_dim=layout[2]) is None)


@st.composite
def ragged_batches(draw, profile: Profile, layouts: tuple[tuple[int, int, int], ...]):
    """(batch, options) drawn from ``profile``: decodes, fresh prompts, chunks after a
    cached prefix and idle sequences in a fixed padded bucket, in one of ``layouts``; the
    page pool is shuffled and larger than needed, so each sequence's pages are scattered
    over the cache."""
    num_seqs = draw(st.integers(1, profile.max_seqs))
    pairs = []
    for _ in range(num_seqs):
        kind = draw(st.sampled_from(["decode", "prefill", "chunk", "idle"]))
        if kind == "decode":
            q_len, prefix = 1, draw(st.integers(0, profile.max_decode_prefix))
        elif kind == "prefill":
            q_len, prefix = draw(st.integers(1, profile.max_q)), 0
        elif kind == "chunk":
            q_len = draw(st.integers(1, profile.max_q))
            prefix = draw(st.integers(1, profile.max_chunk_prefix))
        else:
            q_len, prefix = 0, draw(st.integers(0, profile.max_idle_kv))
        pairs.append((q_len, prefix + q_len))
    page_size, ratio, head_dim = draw(st.sampled_from(layouts))
    window = draw(st.sampled_from(profile.windows))
    seed = draw(st.integers(0, 2**32 - 1))
    pages_per_seq = profile.max_kv // page_size
    real = sum(q for q, _ in pairs)
    batch = make_batch(
        pairs, seed=seed, page_size=page_size, ratio=ratio, head_dim=head_dim,
        extra_seqs=profile.max_seqs - num_seqs, extra_tokens=profile.num_tokens - real,
        pages_per_seq=pages_per_seq,
        spare_pages=profile.max_seqs * pages_per_seq + profile.spare_pages
        - pages_needed([kv for _, kv in pairs], page_size),
        cache=False,
    )
    return batch, {} if window is None else {"sliding_window": window}


def chunked_prefill_problem(prompt: int = 300, page_size: int = 16, kv_heads: int = 2,
                            q_heads: int = 8, head_dim: int = 64, num_pages: int = 40,
                            seed: int = 11):
    """One prompt's q/k/v, a cache full of stale data, its shuffled pages and slots."""
    rng = np.random.default_rng(seed)
    shape = (num_pages, page_size, kv_heads, head_dim)
    k_cache = rng.standard_normal(shape, np.float32)
    v_cache = rng.standard_normal(shape, np.float32)
    q = rng.standard_normal((prompt, q_heads, head_dim), np.float32)
    k = rng.standard_normal((prompt, kv_heads, head_dim), np.float32)
    v = rng.standard_normal((prompt, kv_heads, head_dim), np.float32)
    pages = rng.permutation(num_pages)[: -(-prompt // page_size)].astype(np.int32)
    pos = np.arange(prompt)
    slots = (pages[pos // page_size] * page_size + pos % page_size).astype(np.int32)
    return q, k, v, k_cache, v_cache, pages[None, :], slots

