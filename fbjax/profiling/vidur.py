"""GPU latency profiles built from measured vidur operator timings (no GPU needed).

The "truth" for a step on a GPU follows vidur's recipe (see
``<shared>/data/profiles/README.md``), per transformer layer, per GPU:

* **Linear/norm ops: measured.** The 9 compute ops of ``compute/<device>/<model>/mlp.csv``
  (``input_layernorm, attn_pre_proj, attn_rope, attn_post_proj,
  post_attention_layernorm, mlp_up_proj, mlp_act, mlp_down_proj, add``), median column,
  rows of the requested TP degree, duplicate ``num_tokens`` rows averaged, piecewise
  linear in ``num_tokens``. fbjax pads every step to its bucket, so a step pays these at
  the **bucket's** token count, whatever it holds. Beyond the measured grid (Llama-2
  files stop at 4096 tokens) each op is extrapolated along a least-squares line through
  its upper half (the GEMMs are compute-bound there, so time is linear in tokens).
* **Attention: modelled** (the per-model ``attention.csv`` files are unavailable). Only
  ``legacy/a100/attention.csv`` was measured: A100, 70B shape at TP2, i.e. per GPU 32 q
  heads, 4 kv heads, head_dim 128, bf16, FlashAttention. On it we fit, by least squares
  on relative error:

  - decode: ``a0 + a1 * kv_bytes`` where ``kv_bytes = sum(kv_len) * 2 (K, V) *
    kv_heads_per_gpu * head_dim * 2 B``;
  - prefill: ``b0 + b1 * flops_prefix + b2 * flops_causal + a1 * context_kv_bytes``:
    the attention FLOPs (``4 * q_heads_per_gpu * head_dim`` per query-key pair) split
    into those against the cached prefix (``q * prefix``) and the causal triangle of the
    chunk itself (``q * (q + 1) / 2``), plus reading the chunk's whole context K/V once
    at the decode fit's bandwidth (fixed, not fitted). One FLOP slope
    (``b0 + b1 * flops``) leaves a size-dependent bias (+16 % at 64-token chunks, -32 %
    at 4096; 20 % MAPE): the causal triangle runs at a lower FLOP rate than the prefix
    part (masked diagonal blocks, uneven blocks, fewer blocks to spread over the SMs).
    The split halves the error; both slopes are FLOP rates, so they transfer as FLOPs
    do. vidur's own features are the same pair (``kv_cache_size``,
    ``prefill_chunk_size**2``). The bytes term hardly matters on this GQA shape, but an
    MHA model (Llama-2-7B: 8x the KV bytes per token) reading an 8K prefix for a short
    chunk is bandwidth-bound, and a 1-token chunk should cost what a decode costs.

  To another model or device, bytes and FLOPs are recomputed with the target's per-GPU
  heads and head_dim, and the slopes scaled by the ratio of device peak figures
  (``DEVICES``): the target runs at the same fraction of its peak as the A100 did. The
  intercepts (kernel launch and tail latency) are kept as measured. The measured linear
  ops support peak-ratio scaling: H100/A100 Llama-2-7B at 4096 tokens is 3.1x (peak
  FLOP ratio 3.17x) and at 16 tokens 1.59x (peak bandwidth ratio 1.68x). As in vidur,
  decode attention is multiplied by 1.1 for a batch of more than one under GQA, and
  prefill attention by 1.1 for more than one prefill under GQA. vidur's kv rounding to
  multiples of 64 and its mean-kv / sqrt-sum-of-squares aggregation are not copied:
  bytes and FLOPs simply add up over chunks. One deliberate departure: vidur charges a
  mixed step a prefill *and* a decode kernel, each with its fixed floor (``a0``,
  ``b0``); fbjax runs one ragged kernel over the mixed batch, so by default
  (``attention_kernels="ragged"``) a mixed step pays one floor, ``max(a0, b0)``. Pure
  decode and pure prefill steps are unaffected; ``"split"`` restores vidur's sum.
  Besides being what the engine does, it matters for the fit: two step-level on/off
  floors are not expressible in the per-bucket linear features and made neighbouring
  small buckets disagree by up to 1 ms on H100.
* **TP > 1:** two all-reduces per layer from ``network/<node>/all_reduce.csv``
  (median, linear in message size ``tokens * hidden * 2 B``) plus vidur's 0.02 ms NCCL
  launch overhead each.
* **Per step, not per layer:** ``num_layers`` times the layer, plus the embedding lookup
  (measured ``emb`` column, at the bucket's tokens) and the **LM head**, which vidur
  leaves out. We add it because the engine really runs it every step and it is not
  small for a 128K vocabulary (about 0.7 ms on A100 Llama-3-8B, 5 % of a 32-decode
  step): fbjax computes logits at one row per sequence slot of the seq bucket, and a
  ``[rows, hidden] x [hidden, vocab]`` GEMM costs the measured ``mlp_up_proj`` at
  ``rows`` tokens (``[rows, hidden] x [hidden, 2 * intermediate]``) times
  ``vocab / (2 * intermediate)``: same M and K, N scaled; GEMM time is linear in N in
  both the memory- and compute-bound regimes. Left out, as in vidur: the sampler, the
  final norm, CPU overheads, and ``attn_kv_cache_save`` (not in the legacy file; it
  writes only the new tokens' K/V, microseconds).

Then many synthetic step plans per bucket (decodes with contexts up to ``max_context``,
prefill chunks with prefixes, mixes; total KV within the device's capacity) are timed
with that recipe and an fbjax ``LatencyModel`` is fitted on them (``fit_bucketed``:
NNLS per token bucket, so that a larger bucket never predicts less for the same
contents). Its metadata says what was measured and what was modelled, with the
calibration and fit errors; ``scripts/build_gpu_profiles.py`` writes the JSON files.

Pure Python + numpy.
"""

from __future__ import annotations

import csv
import dataclasses
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fbjax.config import BucketConfig
from fbjax.resources import shared_dir
from fbjax.sched.latency import LatencyModel, StepFeatures, fit_errors

VIDUR_REPO = "https://github.com/microsoft/vidur"
VIDUR_COMMIT = "7d47513363ec447a741ac5e47241580b47724fbf"  # compute/ and network/
VIDUR_LEGACY_COMMIT = "e2d00e9afba96cec9f0e7ea560bbfc4a539fae6a"  # legacy/a100/attention.csv
VIDUR_LICENSE = "MIT, Copyright (c) Microsoft Corporation"

# Device facts: peak memory bandwidth (TB/s = 1e12 B/s), dense (no sparsity) bf16
# tensor throughput, memory in GiB (an "80GB" A100 shows 81920 MiB in nvidia-smi; an
# A40 with ECC on shows 46068 MiB, so 48 overstates it by 4 %). A100 means the 80 GB
# SXM part: the legacy attention sweep reads KV at 1.56 TB/s effective, which the 40 GB
# part (1.555 TB/s peak) could not.
DEVICES: dict[str, dict[str, Any]] = {
    "a100": {"hbm_tb_s": 2.0, "bf16_tflop_s": 312.0, "memory_gib": 80.0,
             "source": "NVIDIA A100 Tensor Core GPU datasheet (A100 80GB SXM: 2,039 GB/s "
                       "HBM2e, 312 TFLOPS dense BF16)"},
    "h100": {"hbm_tb_s": 3.35, "bf16_tflop_s": 989.0, "memory_gib": 80.0,
             "source": "NVIDIA H100 Tensor Core GPU datasheet (H100 SXM 80GB: 3.35 TB/s "
                       "HBM3, 989 TFLOPS dense BF16 = 1,979 with sparsity / 2)"},
    "a40": {"hbm_tb_s": 0.696, "bf16_tflop_s": 150.0, "memory_gib": 48.0,
            "source": "NVIDIA A40 datasheet (696 GB/s GDDR6, 149.7 TFLOPS dense BF16 = "
                      "299.4 with sparsity / 2)"},
}
# Network profile (vidur node type) for TP > 1, per device.
NETWORK_NODES = {"a100": "a100_pairwise_nvlink", "h100": "h100_dgx"}
NCCL_LAUNCH_OVERHEAD_MS = 0.02  # vidur's nccl_cpu_launch_overhead_ms

# Model shapes (HF config.json) and where vidur keeps them.
MODELS: dict[str, dict[str, Any]] = {
    "llama2-7b": {"hf_id": "meta-llama/Llama-2-7b-hf", "num_layers": 32, "num_heads": 32,
                  "num_kv_heads": 32, "head_dim": 128, "hidden_size": 4096,
                  "intermediate_size": 11008, "vocab_size": 32000,
                  "num_params": 6_738_415_616},
    "llama3-8b": {"hf_id": "meta-llama/Meta-Llama-3-8B", "num_layers": 32, "num_heads": 32,
                  "num_kv_heads": 8, "head_dim": 128, "hidden_size": 4096,
                  "intermediate_size": 14336, "vocab_size": 128256,
                  "num_params": 8_030_261_248},
    "llama2-70b": {"hf_id": "meta-llama/Llama-2-70b-hf", "num_layers": 80, "num_heads": 64,
                   "num_kv_heads": 8, "head_dim": 128, "hidden_size": 8192,
                   "intermediate_size": 28672, "vocab_size": 32000,
                   "num_params": 68_976_648_192},
    "llama3-70b": {"hf_id": "meta-llama/Meta-Llama-3-70B", "num_layers": 80, "num_heads": 64,
                   "num_kv_heads": 8, "head_dim": 128, "hidden_size": 8192,
                   "intermediate_size": 28672, "vocab_size": 128256,
                   "num_params": 70_553_706_496},
}

LINEAR_OPS = ("input_layernorm", "attn_pre_proj", "attn_rope", "attn_post_proj",
              "post_attention_layernorm", "mlp_up_proj", "mlp_act", "mlp_down_proj", "add")

# The calibration file's shape: A100, 70B at TP2, per GPU.
CALIBRATION_DEVICE = "a100"
CALIBRATION_SHAPE = {"q_heads_per_gpu": 32, "kv_heads_per_gpu": 4, "head_dim": 128,
                     "bytes_per_elem": 2, "tp": 2, "n_embd": 8192}
GQA_BATCHING_OVERHEAD = 0.1  # vidur: attention_{decode,prefill}_batching_overhead_fraction

GPU_BUCKETS = BucketConfig(
    token_buckets=(16, 32, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144,
                   8192),
    seq_buckets=(16, 64, 256))

# Profiles written by scripts/build_gpu_profiles.py: name -> (device, model).
PROFILES = {"a100-llama3-8b": ("a100", "llama3-8b"), "h100-llama2-7b": ("h100", "llama2-7b"),
            "a100-llama2-7b": ("a100", "llama2-7b"), "a40-llama2-7b": ("a40", "llama2-7b")}
DEFAULT_PROFILES = ("a100-llama3-8b", "h100-llama2-7b", "a100-llama2-7b")

GIB = 1 << 30


VIDUR_SUBDIR = "data/profiles/vidur"


def default_shared_dir() -> Path:
    """The shared data folder that holds vidur's timings (see :mod:`fbjax.resources`)."""
    return shared_dir(VIDUR_SUBDIR)


def vidur_dir(shared: str | Path) -> Path:
    return Path(shared) / VIDUR_SUBDIR


def kv_cache_tokens(num_layers: int, num_kv_heads: int, head_dim: int, num_params: int,
                    device_memory_gb: float, tp: int = 1, bytes_per_elem: int = 2,
                    memory_utilization: float = 0.9) -> int:
    """How many tokens of KV cache fit on each GPU beside its shard of the weights.

    vLLM-style: the engine may use ``memory_utilization`` of the device memory
    (``device_memory_gb`` in GiB, as nvidia-smi reports it: an A100-80GB has 81920 MiB);
    the bf16 weights take ``num_params * bytes_per_elem / tp``; the rest holds K and V of
    ``num_layers`` layers x ``num_kv_heads / tp`` heads x ``head_dim`` per token. The
    10 % left over stands in for activations, the compiled executables' workspace and
    fragmentation (vLLM subtracts a measured activation peak instead). With TP every
    GPU holds the same tokens (its heads of them), so this is also the whole instance's
    capacity. Returns 0 when the weights do not fit.
    """
    if min(num_layers, num_kv_heads, head_dim, num_params, tp, bytes_per_elem) <= 0:
        raise ValueError("kv_cache_tokens: sizes must be positive")
    if not 0 < memory_utilization <= 1:
        raise ValueError("memory_utilization must be in (0, 1]")
    budget = device_memory_gb * GIB * memory_utilization - num_params * bytes_per_elem / tp
    per_token = 2 * num_layers * max(num_kv_heads // tp, 1) * head_dim * bytes_per_elem
    return max(int(budget // per_token), 0)


# ----- measured linear ops ----------------------------------------------------------------
@dataclasses.dataclass
class LinearOps:
    """Per-op median ms per layer on the measured ``num_tokens`` grid (one TP degree)."""

    num_tokens: np.ndarray
    ms: dict[str, np.ndarray]  # op -> ms at num_tokens
    path: str

    @property
    def max_tokens(self) -> int:
        return int(self.num_tokens[-1])

    def op_ms(self, op: str, tokens: float) -> float:
        n, t = self.num_tokens, self.ms[op]
        if tokens <= n[-1]:
            return float(np.interp(tokens, n, t))
        upper = n >= n[-1] / 2  # extrapolate along the upper half's least-squares line
        slope, icpt = np.polyfit(n[upper], t[upper], 1)
        return float(max(icpt + slope * tokens, t[-1]))

    def layer_ms(self, tokens: float) -> float:
        """The 9 linear/norm ops of one layer at ``tokens`` tokens."""
        return sum(self.op_ms(op, tokens) for op in LINEAR_OPS)


def load_linear_ops(path: str | Path, tp: int = 1,
                    ops: Sequence[str] = (*LINEAR_OPS, "emb")) -> LinearOps:
    rows: dict[int, list[dict[str, str]]] = defaultdict(list)
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if int(row["num_tensor_parallel_workers"]) == tp:
                rows[int(row["num_tokens"])].append(row)
    if not rows:
        raise ValueError(f"{path}: no rows with num_tensor_parallel_workers={tp}")
    grid = np.array(sorted(rows), float)
    ms = {op: np.array([np.mean([float(r[f"time_stats.{op}.median"]) for r in rows[int(n)]])
                        for n in grid]) for op in ops}
    return LinearOps(grid, ms, str(path))


# ----- modelled attention -----------------------------------------------------------------
def decode_kv_bytes(kv_tokens: float, kv_heads_per_gpu: int, head_dim: int,
                    bytes_per_elem: int = 2) -> float:
    """Bytes of K and V read by decode attention over ``kv_tokens`` context tokens."""
    return kv_tokens * 2 * kv_heads_per_gpu * head_dim * bytes_per_elem


def prefill_flops(q_len: np.ndarray, prefix: np.ndarray, q_heads_per_gpu: int,
                  head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Attention FLOPs (QK^T and PV, 2 each per multiply-add) of a chunk of ``q_len``
    new tokens after ``prefix`` cached ones: (against the prefix, causal triangle)."""
    per_pair = 4.0 * q_heads_per_gpu * head_dim
    q_len = np.asarray(q_len, float)
    return per_pair * q_len * np.asarray(prefix, float), per_pair * q_len * (q_len + 1) / 2


@dataclasses.dataclass
class AttentionCalibration:
    """Per-layer ms on the calibration device and shape (``CALIBRATION_SHAPE``)."""

    decode: tuple[float, float]  # a0 ms, a1 ms per byte
    prefill: tuple[float, float, float]  # b0 ms, b1 ms per prefix FLOP, b2 per causal FLOP
    decode_error: dict[str, float]
    prefill_error: dict[str, float]
    prefill_single_slope_error: dict[str, float]  # b0 + b1 * flops, for comparison
    num_decode_rows: int
    num_prefill_rows: int
    path: str

    def to_json(self) -> dict[str, Any]:
        a0, a1 = self.decode
        b0, b1, b2 = self.prefill
        return {
            "file": self.path, "device": CALIBRATION_DEVICE, "shape": CALIBRATION_SHAPE,
            "decode_ms": {"formula": "a0 + a1 * kv_bytes", "a0_ms": a0, "a1_ms_per_byte": a1,
                          "effective_tb_s": 1e-9 / a1,
                          "fit_error": self.decode_error, "rows": self.num_decode_rows},
            "prefill_ms": {"formula": "b0 + b1 * flops_prefix + b2 * flops_causal + "
                                      "a1 * context_kv_bytes",
                           "b0_ms": b0, "b1_ms_per_flop": b1, "b2_ms_per_flop": b2,
                           "effective_tflop_s_prefix": 1e-9 / b1,
                           "effective_tflop_s_causal": 1e-9 / b2,
                           "fit_error": self.prefill_error,
                           "single_slope_fit_error": self.prefill_single_slope_error,
                           "rows": self.num_prefill_rows},
        }


def _relative_lstsq(x: np.ndarray, y: np.ndarray, fixed: np.ndarray | float = 0.0
                    ) -> tuple[np.ndarray, dict[str, float]]:
    """Least squares on relative error of ``x @ coef + fixed`` against ``y``; every
    coefficient must come out positive."""
    coef = np.linalg.lstsq(x / y[:, None], (y - fixed) / y, rcond=None)[0]
    if (coef <= 0).any():
        raise ValueError(f"attention calibration gave a non-positive coefficient {coef}")
    ape = np.abs(x @ coef + fixed - y) / y
    return coef, {"mape": float(ape.mean()), "p95_ape": float(np.percentile(ape, 95)),
                  "max_ape": float(ape.max())}


def load_attention_rows(path: str | Path) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(decode rows, prefill rows) of the legacy file, exact duplicate rows dropped."""
    seen: set[tuple[str, ...]] = set()
    decode, prefill = [], []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            key = tuple(row.values())
            if key in seen:
                continue
            seen.add(key)
            (prefill if row["is_prefill"] == "True" else decode).append(row)
    return decode, prefill


def calibrate_attention(path: str | Path) -> AttentionCalibration:
    decode, prefill = load_attention_rows(path)
    shape = CALIBRATION_SHAPE
    batch = np.array([float(r["batch_size"]) for r in decode])
    kv = np.array([float(r["kv_cache_size"]) for r in decode])
    y = np.array([float(r["time_stats.attn_decode.median"]) for r in decode])
    kv_bytes = decode_kv_bytes(batch * kv, shape["kv_heads_per_gpu"], shape["head_dim"])
    dec_coef, dec_err = _relative_lstsq(np.stack([np.ones_like(y), kv_bytes], 1), y)

    chunk = np.array([float(r["prefill_chunk_size"]) for r in prefill])
    prefix = np.array([float(r["kv_cache_size"]) for r in prefill])
    yp = np.array([float(r["time_stats.attn_prefill.median"]) for r in prefill])
    f_prefix, f_causal = prefill_flops(chunk, prefix, shape["q_heads_per_gpu"],
                                       shape["head_dim"])
    # Every chunk also reads its context's K/V once, as a decode does: that part is
    # charged at the decode fit's bandwidth and the FLOP terms are fitted on the rest.
    # On this GQA shape it is small (5 % of a 64-token chunk after 4K tokens), but for
    # an MHA model (8x the KV bytes per token) a short chunk after a long prefix is
    # bound by those bytes, not by FLOPs.
    ctx_ms = dec_coef[1] * decode_kv_bytes(prefix + chunk, shape["kv_heads_per_gpu"],
                                           shape["head_dim"])
    pre_coef, pre_err = _relative_lstsq(np.stack([np.ones_like(yp), f_prefix, f_causal], 1),
                                        yp, ctx_ms)
    _, single_err = _relative_lstsq(np.stack([np.ones_like(yp), f_prefix + f_causal], 1), yp,
                                    ctx_ms)
    return AttentionCalibration(
        decode=(float(dec_coef[0]), float(dec_coef[1])),
        prefill=(float(pre_coef[0]), float(pre_coef[1]), float(pre_coef[2])),
        decode_error=dec_err, prefill_error=pre_err, prefill_single_slope_error=single_err,
        num_decode_rows=len(decode), num_prefill_rows=len(prefill), path=str(path))


# ----- network (TP > 1) -------------------------------------------------------------------
@dataclasses.dataclass
class AllReduce:
    size: np.ndarray  # bytes
    ms: np.ndarray
    path: str

    def time_ms(self, size_bytes: float) -> float:
        return float(np.interp(size_bytes, self.size, self.ms)) + NCCL_LAUNCH_OVERHEAD_MS


def load_all_reduce(path: str | Path, num_workers: int) -> AllReduce:
    by_size: dict[int, list[float]] = defaultdict(list)
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if int(row["num_workers"]) == num_workers == int(row["devices_per_node"]):
                by_size[int(row["size"])].append(float(row["time_stats.all_reduce.median"]))
    if not by_size:
        raise ValueError(f"{path}: no all_reduce rows with num_workers={num_workers}")
    sizes = np.array(sorted(by_size), float)
    return AllReduce(sizes, np.array([np.mean(by_size[int(s)]) for s in sizes]), str(path))


# ----- the recipe -------------------------------------------------------------------------
Chunk = tuple[int, int, bool]  # (q_len, kv_len incl. the chunk's own tokens, is_decode)


@dataclasses.dataclass
class GpuRecipe:
    """Step time ("truth") of a device + model from measured and modelled parts."""

    device: str
    model: str
    tp: int
    linear: LinearOps
    attention: AttentionCalibration
    all_reduce: AllReduce | None = None
    include_lm_head: bool = True
    include_emb: bool = True
    attention_kernels: str = "ragged"  # or "split" (vidur); see attention_ms

    def __post_init__(self) -> None:
        if self.device not in DEVICES or self.model not in MODELS:
            raise ValueError(f"unknown device/model {self.device}/{self.model}")
        if self.attention_kernels not in ("ragged", "split"):
            raise ValueError(f"attention_kernels must be 'ragged' or 'split', "
                             f"got {self.attention_kernels!r}")
        if self.tp > 1 and self.all_reduce is None:
            raise ValueError("TP > 1 needs an all_reduce profile")
        shape = MODELS[self.model]
        self.num_layers = shape["num_layers"]
        self.q_heads = shape["num_heads"] // self.tp
        self.kv_heads = max(shape["num_kv_heads"] // self.tp, 1)
        self.head_dim = shape["head_dim"]
        self.gqa = shape["num_heads"] > shape["num_kv_heads"]
        ref, dev = DEVICES[CALIBRATION_DEVICE], DEVICES[self.device]
        self.bandwidth_ratio = ref["hbm_tb_s"] / dev["hbm_tb_s"]  # time multiplier
        self.flops_ratio = ref["bf16_tflop_s"] / dev["bf16_tflop_s"]
        self._padded: dict[tuple[tuple[int, int], bool], float] = {}

    @classmethod
    def from_shared(cls, device: str, model: str, shared: str | Path | None = None,
                    tp: int = 1, **kwargs: Any) -> GpuRecipe:
        root = vidur_dir(shared or default_shared_dir())
        linear = load_linear_ops(root / "compute" / device / MODELS[model]["hf_id"] / "mlp.csv",
                                 tp)
        attention = calibrate_attention(root / "legacy" / "a100" / "attention.csv")
        all_reduce = None
        if tp > 1:
            all_reduce = load_all_reduce(
                root / "network" / NETWORK_NODES[device] / "all_reduce.csv", tp)
        return cls(device, model, tp, linear, attention, all_reduce, **kwargs)

    # per layer, ms
    def decode_attention_ms(self, kv_lens: Sequence[int], floor: bool = True) -> float:
        """Decode attention over ``kv_lens`` (one per sequence), ms per layer; without
        the kernel's fixed floor ``a0`` when ``floor`` is False."""
        if not len(kv_lens):
            return 0.0
        a0, a1 = self.attention.decode
        kv_bytes = decode_kv_bytes(float(np.sum(kv_lens)), self.kv_heads, self.head_dim)
        ms = a0 * floor + a1 * kv_bytes * self.bandwidth_ratio
        return ms * (1 + GQA_BATCHING_OVERHEAD) if self.gqa and len(kv_lens) > 1 else ms

    def prefill_attention_ms(self, q_lens: Sequence[int], prefixes: Sequence[int],
                             floor: bool = True) -> float:
        """Prefill attention of chunks of ``q_lens`` new tokens after ``prefixes`` cached
        ones, ms per layer; without the kernel's fixed floor ``b0`` when ``floor`` is
        False."""
        if not len(q_lens):
            return 0.0
        b0, b1, b2 = self.attention.prefill
        f_prefix, f_causal = prefill_flops(np.asarray(q_lens), np.asarray(prefixes),
                                           self.q_heads, self.head_dim)
        ctx_bytes = decode_kv_bytes(float(np.sum(q_lens) + np.sum(prefixes)), self.kv_heads,
                                    self.head_dim)
        ms = (b0 * floor + (b1 * f_prefix.sum() + b2 * f_causal.sum()) * self.flops_ratio
              + self.attention.decode[1] * ctx_bytes * self.bandwidth_ratio)
        return ms * (1 + GQA_BATCHING_OVERHEAD) if self.gqa and len(q_lens) > 1 else ms

    def all_reduce_ms(self, tokens: int) -> float:
        if self.tp == 1:
            return 0.0
        return self.all_reduce.time_ms(tokens * MODELS[self.model]["hidden_size"] * 2)

    def attention_ms(self, chunks: Sequence[Chunk]) -> float:
        """One layer's attention on the step's contents, ms.

        ``attention_kernels="split"`` is vidur's recipe: a mixed step runs a prefill and
        a decode kernel and pays both, floors included. ``"ragged"`` (the default) is
        fbjax's engine, which runs one ragged paged-attention kernel over the whole
        mixed batch: the same per-kind work, but one fixed floor, the larger of the
        kinds present. Pure decode and pure prefill steps cost the same either way; a
        mixed step costs the smaller floor (``a0`` = 13 us, times vidur's GQA factor
        where it applies) per layer less with one kernel.
        """
        dec = [kv for _, kv, is_dec in chunks if is_dec]
        q_lens = [q for q, _, is_dec in chunks if not is_dec]
        prefixes = [kv - q for q, kv, is_dec in chunks if not is_dec]
        ms = self.decode_attention_ms(dec) + self.prefill_attention_ms(q_lens, prefixes)
        if self.attention_kernels == "split" or not (dec and q_lens):
            return ms
        decode_floor = self.decode_attention_ms(dec) - self.decode_attention_ms(dec, False)
        prefill_floor = (self.prefill_attention_ms(q_lens, prefixes)
                         - self.prefill_attention_ms(q_lens, prefixes, False))
        return ms - min(decode_floor, prefill_floor)

    def layer_ms(self, bucket_tokens: int, chunks: Sequence[Chunk]) -> dict[str, float]:
        """One layer's parts, ms: linear ops at the bucket's tokens, attention on the
        contents, two all-reduces of the bucket's activations."""
        return {"linear": self.linear.layer_ms(bucket_tokens),
                "attention": self.attention_ms(chunks),
                "all_reduce": 2 * self.all_reduce_ms(bucket_tokens)}

    def lm_head_ms(self, rows: int) -> float:
        """LM head GEMM on ``rows`` logit rows, from the measured ``mlp_up_proj`` (its
        running maximum over the grid, so that more rows never cost less)."""
        shape = MODELS[self.model]
        grid = self.linear.num_tokens
        up = max(self.linear.op_ms("mlp_up_proj", r) for r in [rows, *grid[grid < rows]])
        return up * shape["vocab_size"] / (2 * shape["intermediate_size"] / self.tp)

    def padded_ms(self, bucket: tuple[int, int], lm_head: bool = True) -> float:
        """What the step pays for its bucket whatever it holds: linear ops and
        all-reduces of every layer, embedding, LM head (``lm_head``)."""
        key = (bucket, lm_head)
        if key not in self._padded:
            tokens, seqs = bucket
            ms = self.num_layers * (self.linear.layer_ms(tokens) + 2 * self.all_reduce_ms(tokens))
            if self.include_emb:
                ms += self.linear.op_ms("emb", tokens)
            if self.include_lm_head and lm_head:
                ms += self.lm_head_ms(seqs)
            self._padded[key] = ms
        return self._padded[key]

    def step_ms(self, bucket: tuple[int, int], chunks: Sequence[Chunk],
                lm_head: bool = True) -> float:
        return self.padded_ms(bucket, lm_head) + self.num_layers * self.attention_ms(chunks)

    def step_seconds(self, bucket: tuple[int, int], chunks: Sequence[Chunk]) -> float:
        return self.step_ms(bucket, chunks) / 1e3

    def vidur_iteration_ms(self, chunks: Sequence[Chunk]) -> float:
        """vidur's own iteration time for these contents, for comparison: no padding
        (linear ops and all-reduces at the step's token count), split attention
        kernels, no embedding or LM head."""
        tokens = sum(q for q, _, _ in chunks)
        dec = [kv for _, kv, is_dec in chunks if is_dec]
        q_lens = [q for q, _, is_dec in chunks if not is_dec]
        prefixes = [kv - q for q, kv, is_dec in chunks if not is_dec]
        attention = self.decode_attention_ms(dec) + self.prefill_attention_ms(q_lens, prefixes)
        return self.num_layers * (self.linear.layer_ms(tokens) + attention
                                  + 2 * self.all_reduce_ms(tokens))

    def kv_capacity_tokens(self, memory_utilization: float = 0.9) -> int:
        shape = MODELS[self.model]
        return kv_cache_tokens(shape["num_layers"], shape["num_kv_heads"], shape["head_dim"],
                               shape["num_params"], DEVICES[self.device]["memory_gib"],
                               tp=self.tp, memory_utilization=memory_utilization)


# ----- synthetic step plans ---------------------------------------------------------------
def _split(total: int, parts: int, rng: np.random.Generator) -> list[int]:
    """``total`` as ``parts`` positive integers, random proportions."""
    if parts == 1:
        return [total]
    cuts = np.sort(rng.choice(np.arange(1, total), size=parts - 1, replace=False))
    return [int(x) for x in np.diff(np.concatenate([[0], cuts, [total]]))]


def synthetic_plans(bucket: tuple[int, int], buckets: BucketConfig, num: int,
                    rng: np.random.Generator, max_context: int = 8192,
                    kv_capacity: int | None = None) -> list[list[Chunk]]:
    """``num`` step plans that ``buckets.pick`` maps onto ``bucket``: pure decode,
    pure prefill and mixed steps, decode contexts up to ``max_context``, prefill chunks
    with and without cached prefixes, total KV within ``kv_capacity``."""
    t, s = bucket
    ti, si = buckets.token_buckets.index(t), buckets.seq_buckets.index(s)
    t_prev = buckets.token_buckets[ti - 1] if ti else 0
    s_prev = buckets.seq_buckets[si - 1] if si else 0
    lo_seqs, hi_seqs = s_prev + 1, min(s, t)
    # pick() rounds tokens up to at least the seq bucket, so when s > t_prev any token
    # count maps onto t; otherwise the step needs more than t_prev tokens.
    lo_tokens = 1 if s > t_prev else t_prev + 1
    plans: list[list[Chunk]] = []
    while len(plans) < num:
        n = int(rng.integers(lo_seqs, hi_seqs + 1))
        kind = rng.choice(["decode", "prefill", "mixed"], p=[0.25, 0.25, 0.5])
        if kind == "decode" and n >= lo_tokens:  # pure decode steps: one token each
            tokens = n
        else:
            tokens = int(rng.integers(max(lo_tokens, n), t + 1))
        if tokens == n:
            num_pre = 0  # only decodes have one token each
        elif kind == "prefill" or n == 1:
            num_pre = n
        else:  # mostly decodes with one or a few prefill chunks
            num_pre = min(int(rng.geometric(0.5)), n - 1)
        num_dec = n - num_pre
        pre_tokens = tokens - num_dec
        if (num_pre == 0) != (pre_tokens == 0) or pre_tokens < num_pre:
            continue
        # Context scale per plan, so that some steps hold only short and some only long
        # contexts: decode kv ~ U[1, ctx], prefix ~ U[0, ctx - chunk] half the time.
        ctx = int(np.exp(rng.uniform(np.log(16), np.log(max_context))))
        chunks: list[Chunk] = [(1, int(rng.integers(1, ctx + 1)), True) for _ in range(num_dec)]
        for q in (_split(pre_tokens, num_pre, rng) if num_pre else []):
            room = max(max_context - q, 0)
            prefix = int(rng.integers(0, min(ctx, room) + 1)) if rng.random() < 0.5 else 0
            chunks.append((q, prefix + q, False))
        if kv_capacity is not None:
            total = sum(kv for _, kv, _ in chunks)
            if total > kv_capacity:
                scale = kv_capacity / total
                chunks = [(q, max(q, int(kv * scale)), d) for q, kv, d in chunks]
        assert buckets.pick(tokens, n) == bucket, (bucket, tokens, n)
        plans.append(chunks)
    return plans


# ----- building a profile -----------------------------------------------------------------
def _grid_point_errors(recipe: GpuRecipe, model: LatencyModel,
                           buckets: BucketConfig) -> dict[str, Any]:
    """The fitted model on grid steps: one prefill chunk (no prefix) of each measured
    ``num_tokens`` of mlp.csv, and pure decode batches (1 to 256 sequences, kv 128 to
    8192, within the KV capacity). ``fit``: against the recipe on the same padded
    bucket (the regression's own error). ``vs_vidur``: against vidur's unpadded
    iteration (linear ops at the exact token count, split attention kernels, no
    embedding or LM head), i.e. what padding to buckets and the LM head add."""
    out: dict[str, Any] = {}
    cases: dict[str, list[list[Chunk]]] = {
        "prefill": [[(int(n), int(n), False)] for n in recipe.linear.num_tokens
                    if n <= buckets.max_tokens],
        "decode": [[(1, kv, True)] * b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256)
                   for kv in (128, 512, 1024, 2048, 4096, 8192)
                   if b <= buckets.max_seqs and b * kv <= recipe.kv_capacity_tokens()]}
    for kind, plans in cases.items():
        pred, padded, vidur = [], [], []
        for chunks in plans:
            feats = StepFeatures.of_chunks(chunks)
            bucket = buckets.pick(feats.num_tokens, feats.num_seqs)
            pred.append(model.predict(bucket, feats))
            padded.append(recipe.step_seconds(bucket, chunks))
            vidur.append(recipe.vidur_iteration_ms(chunks) / 1e3)
        fit = fit_errors(list(zip(pred, padded, strict=True)))
        raw = fit_errors(list(zip(pred, vidur, strict=True)))
        out[kind] = {"num_points": len(plans),
                     "fit": {"mape": fit.mape, "p95_abs_ms": fit.p95_abs_ms},
                     "vs_vidur": {"mape": raw.mape, "p95_abs_ms": raw.p95_abs_ms,
                                  "mean_ratio": float(np.mean(np.array(pred)
                                                              / np.array(vidur)))}}
    return out


def build_profile(device: str, model: str, shared: str | Path | None = None, *, tp: int = 1,
                  buckets: BucketConfig = GPU_BUCKETS, plans_per_bucket: int = 240,
                  max_context: int = 8192, seed: int = 0, include_lm_head: bool = True,
                  holdout_every: int = 5, spill: float = 0.25,
                  attention_kernels: str = "ragged") -> tuple[LatencyModel, GpuRecipe]:
    """Time synthetic plans on every bucket with the recipe and fit a LatencyModel."""
    shared = Path(shared or default_shared_dir())
    recipe = GpuRecipe.from_shared(device, model, shared, tp=tp,
                                   include_lm_head=include_lm_head,
                                   attention_kernels=attention_kernels)
    capacity = recipe.kv_capacity_tokens()
    rng = np.random.default_rng(seed)
    plans = {bucket: synthetic_plans(bucket, buckets, plans_per_bucket, rng, max_context,
                                     capacity) for bucket in buckets.pairs()}
    latency, fit_info = fit_bucketed(recipe, buckets, plans, holdout_every=holdout_every,
                                     spill=spill, max_context=max_context)
    latency.metadata = _metadata(recipe, shared, buckets, plans_per_bucket, max_context, seed)
    latency.metadata["fit"] = fit_info
    latency.metadata["grid_point_errors"] = _grid_point_errors(recipe, latency, buckets)
    return latency, recipe


def _corner_plans(bucket: tuple[int, int], max_context: int,
                  capacity: int) -> list[list[Chunk]]:
    """Extreme contents of a bucket: fewest and most sequences, fewest and most tokens,
    all decodes / one prefill among decodes / all prefills, shortest and longest
    contexts (within the KV capacity), with and without a prefix. The fitted models
    are linear in features of the contents, so their differences peak near these."""
    t, s = bucket
    plans = []
    for n in sorted({1, min(s, t)}):
        for tokens in sorted({n, t}):
            for num_pre in sorted({0, 1, n} if tokens > n else {0}):
                if num_pre == 0 and tokens != n:
                    continue
                num_dec = n - num_pre
                pre_tokens = tokens - num_dec
                if num_pre and pre_tokens < num_pre:
                    continue
                for long in (False, True):
                    kv_budget = max(min(capacity, n * max_context), n)
                    ctx = max(min(max_context, kv_budget // n), 1) if long else 1
                    chunks: list[Chunk] = [(1, ctx, True)] * num_dec
                    if num_pre:
                        q, extra = divmod(pre_tokens, num_pre)
                        sizes = [q + 1] * extra + [q] * (num_pre - extra)
                        chunks += [(c, max(c, min(ctx, max_context)) if long else c, False)
                                   for c in sizes]
                    plans.append(chunks)
    return plans


def fit_bucketed(recipe: GpuRecipe, buckets: BucketConfig,
                 plans: dict[tuple[int, int], list[list[Chunk]]], *, holdout_every: int = 5,
                 spill: float = 0.25, max_context: int = 8192
                 ) -> tuple[LatencyModel, dict[str, Any]]:
    """Fit per-bucket linear models to the recipe's times of ``plans`` (bucket -> plans
    that ``pick`` maps there), so that larger buckets never cost less for the same
    contents.

    * **Shared over seq buckets.** The recipe's step time depends on the seq bucket only
      through the LM head (logit rows), so one regression (``LatencyModel.fit``, NNLS)
      per token bucket is fitted on the plans of all its seq buckets, without the LM
      head, and each (tokens, seqs) bucket gets it plus its own LM head cost in the
      intercept (non-decreasing in rows). Separate fits would each see only their own
      seq range and extrapolate differently outside it.
    * **Spill-over.** A token bucket's regression also sees a ``spill`` share of the
      plans of every smaller token bucket, timed on this bucket (padding and all), so
      neighbouring buckets agree on contents they can both hold.
    * **Monotone lift.** Token buckets are then visited in increasing order, and each
      intercept is raised by the largest amount (if any) by which the bucket would
      predict less than the one below it for any plan (or ``_corner_plans``) of a
      smaller bucket. The linear ops at small token counts cost nearly the same
      (memory-bound GEMMs), so fit noise could otherwise make 64 tokens look cheaper
      than 32.

    Held-out error: every ``holdout_every``-th plan of each bucket is left out of a
    first fit and scored (LM head included); the profile is then refitted on all plans.
    """
    lm_head = {s: recipe.lm_head_ms(s) / 1e3 if recipe.include_lm_head else 0.0
               for s in buckets.seq_buckets}
    feats = {b: [StepFeatures.of_chunks(c) for c in ps] for b, ps in plans.items()}
    capacity = recipe.kv_capacity_tokens()

    attn = {b: [recipe.num_layers * recipe.attention_ms(c) for c in ps]
            for b, ps in plans.items()}

    def body(t: int, bucket: tuple[int, int], i: int) -> float:  # seconds, no LM head
        return (recipe.padded_ms((t, 1), lm_head=False) + attn[bucket][i]) / 1e3

    def fit(keep: dict[tuple[int, int], list[int]]) -> tuple[LatencyModel, dict[int, float]]:
        stride = max(round(1 / spill), 1) if spill > 0 else 0
        points = []
        for t in buckets.token_buckets:
            for bucket, idx in keep.items():
                if bucket[0] == t:
                    chosen = idx
                elif bucket[0] < t and stride:
                    chosen = idx[::stride]
                else:
                    continue
                points += [((t, 0), feats[bucket][i], body(t, bucket, i)) for i in chosen]
        per_token = LatencyModel.fit(points, holdout_every=0).coefficients
        lifts: dict[int, float] = {}
        below: list[StepFeatures] = []
        prev = None
        for t in buckets.token_buckets:
            coef = per_token[(t, 0)]
            lift = 0.0
            if prev is not None and below:
                x = np.stack([f.vector() for f in below])
                lift = max(float((x @ prev - x @ coef).max()), 0.0)
                coef[0] += lift
            lifts[t] = lift
            prev = coef
            for bucket in keep:
                if bucket[0] == t:
                    below += [feats[bucket][i] for i in keep[bucket]]
                    below += [StepFeatures.of_chunks(c)
                              for c in _corner_plans(bucket, max_context, capacity)]
        coefficients = {}
        for bucket in buckets.pairs():
            coef = per_token[(bucket[0], 0)].copy()
            coef[0] += lm_head[bucket[1]]
            coefficients[bucket] = coef
        return LatencyModel(coefficients), lifts

    every = {b: list(range(len(ps))) for b, ps in plans.items()}
    heldout = None
    if holdout_every:
        train = {b: [i for i in idx if i % holdout_every != 2] for b, idx in every.items()}
        probe, _ = fit(train)
        heldout = fit_errors([(probe.predict(b, feats[b][i]),
                            (recipe.padded_ms(b) + attn[b][i]) / 1e3)
                           for b, idx in every.items() for i in idx if i % holdout_every == 2])
    model, lifts = fit(every)
    model.heldout = heldout
    return model, {"method": "fbjax.sched.vidur.fit_bucketed (NNLS per token bucket, "
                             "shared over seq buckets, spill-over, monotone lift)",
                   "spill": spill, "holdout_every": holdout_every,
                   "monotone_lift_ms": {str(t): v * 1e3 for t, v in lifts.items()}}


def _rel(path: str, shared: Path) -> str:
    try:
        return str(Path(path).relative_to(shared))
    except ValueError:
        return str(path)


def _metadata(recipe: GpuRecipe, shared: Path, buckets: BucketConfig, plans_per_bucket: int,
              max_context: int, seed: int) -> dict[str, Any]:
    shape = MODELS[recipe.model]
    grid_max = recipe.linear.max_tokens
    per_bucket = {str(t): recipe.linear.layer_ms(t) for t in buckets.token_buckets}
    return {
        "source": "vidur operator profiles + fbjax.profiling.vidur recipe",
        "step_time": "num_layers * (linear ops at the bucket's tokens + attention on the "
                     "contents + 2 all-reduces if TP > 1) + emb + LM head at the seq bucket",
        "vidur": {"repo": VIDUR_REPO, "commit": VIDUR_COMMIT,
                  "legacy_commit": VIDUR_LEGACY_COMMIT, "license": VIDUR_LICENSE},
        "device": recipe.device, "device_peaks": DEVICES[recipe.device],
        "calibration_device_peaks": DEVICES[CALIBRATION_DEVICE],
        "model": recipe.model, "hf_id": shape["hf_id"], "model_shape": shape,
        "tp": recipe.tp, "num_layers": recipe.num_layers, "dtype": "bf16", "units": "seconds",
        "token_buckets": list(buckets.token_buckets), "seq_buckets": list(buckets.seq_buckets),
        "kv_capacity_tokens": recipe.kv_capacity_tokens(),
        "kv_capacity": {"device_memory_gib": DEVICES[recipe.device]["memory_gib"],
                        "memory_utilization": 0.9, "bytes_per_elem": 2,
                        "rule": "fbjax.sched.vidur.kv_cache_tokens"},
        "measured": {
            "linear_ops": {"file": _rel(recipe.linear.path, shared), "ops": list(LINEAR_OPS),
                           "column": "median", "tp_rows": recipe.tp,
                           "at": "the bucket's token count (steps are padded)",
                           "grid_max_tokens": grid_max,
                           "extrapolated_token_buckets": [t for t in buckets.token_buckets
                                                          if t > grid_max],
                           "layer_ms_at_bucket": per_bucket},
            "emb": {"file": _rel(recipe.linear.path, shared), "included": recipe.include_emb,
                    "per": "step"},
            **({"all_reduce": {"file": _rel(recipe.all_reduce.path, shared),
                               "launch_overhead_ms": NCCL_LAUNCH_OVERHEAD_MS,
                               "per_layer": 2}} if recipe.all_reduce else {}),
        },
        "modelled": {
            "attention": {
                "method": "modelled from bytes and FLOPs, calibrated on the one measured "
                          "attention file (A100, 70B shape, TP2): decode = a0 + KV bytes "
                          "read; prefill = b0 + prefix FLOPs + causal FLOPs + context KV "
                          "bytes; slopes moved to the target by its per-GPU heads/head_dim "
                          "and the device/A100 ratio of peak bandwidth (bytes) or peak "
                          "bf16 FLOP/s (FLOPs); intercepts kept as measured on A100",
                "calibration": {**recipe.attention.to_json(),
                                "file": _rel(recipe.attention.path, shared)},
                "target_per_gpu": {"q_heads": recipe.q_heads, "kv_heads": recipe.kv_heads,
                                   "head_dim": recipe.head_dim},
                "bandwidth_time_ratio": recipe.bandwidth_ratio,
                "flops_time_ratio": recipe.flops_ratio,
                "gqa_batching_overhead": GQA_BATCHING_OVERHEAD if recipe.gqa else 0.0,
                "kernels": recipe.attention_kernels,
                "kernels_note": "ragged: one kernel per layer over the mixed batch (fbjax), "
                                "so a mixed step pays one fixed floor max(a0, b0), not "
                                "a0 + b0 as vidur's split prefill/decode kernels do",
            },
            "lm_head": {"included": recipe.include_lm_head,
                        "method": "measured mlp_up_proj at seq-bucket rows x vocab / "
                                  "(2 * intermediate)",
                        "ms_at_seq_bucket": {str(s): recipe.lm_head_ms(s)
                                             for s in buckets.seq_buckets}},
        },
        "omitted": ["attn_kv_cache_save (not in the legacy file)", "sampler", "final norm",
                    "CPU overheads (vidur default skip_cpu_overhead_modeling)"],
        "caveats": [
            "attention is modelled, not measured, for every profile: one A100 file of the "
            "70B/TP2 shape, moved by bytes/FLOPs and peak ratios",
            "kernels are vLLM/sarathi-era (2024, FlashAttention 2 on A100); newer kernels "
            "(e.g. FA3 on H100) are faster",
            "linear ops above the measured grid are extrapolated linearly",
        ] + (["H100 has no Llama-3 mlp.csv upstream; this is Llama-2-7B"]
             if recipe.device == "h100" else []),
        "synthetic_plans": {"per_bucket": plans_per_bucket, "max_context": max_context,
                            "seed": seed, "total": plans_per_bucket * len(buckets.pairs())},
    }


# ----- README worked examples ---------------------------------------------------------------
def readme_checks(shared: str | Path | None = None) -> list[dict[str, Any]]:
    """The worked numbers of ``data/profiles/README.md`` recomputed with this recipe:
    ``name, expected (README), got, rel_err``. Attention checks use the measured legacy
    value where the README does, and show the modelled value beside it."""
    shared = Path(shared or default_shared_dir())
    root = vidur_dir(shared)
    checks = []

    def add(name: str, expected: float, got: float) -> None:
        checks.append({"name": name, "expected": expected, "got": got,
                       "rel_err": abs(got - expected) / expected})

    a100_l3 = load_linear_ops(root / "compute/a100/meta-llama/Meta-Llama-3-8B/mlp.csv")
    h100_l2 = load_linear_ops(root / "compute/h100/meta-llama/Llama-2-7b-hf/mlp.csv")
    mlp = ("mlp_up_proj", "mlp_act", "mlp_down_proj")
    add("A100 Llama-3-8B MLP 512 tok ms/layer", 0.825,
        sum(a100_l3.op_ms(o, 512) for o in mlp))
    add("H100 Llama-2-7B MLP 512 tok ms/layer", 0.2265,
        sum(h100_l2.op_ms(o, 512) for o in mlp))
    add("A100 Llama-3-8B linear 512 tok ms/layer", 1.0825, a100_l3.layer_ms(512))
    add("H100 Llama-2-7B linear 512 tok ms/layer", 0.3745, h100_l2.layer_ms(512))
    add("A100 Llama-3-8B linear 32 tok ms/layer", 0.341, a100_l3.layer_ms(32))
    add("H100 Llama-2-7B linear 32 tok ms/layer", 0.181, h100_l2.layer_ms(32))

    # 70B TP2 decode iteration, batch 32 at kv 2048.
    recipe = GpuRecipe.from_shared("a100", "llama2-70b", shared, tp=2)
    decode_rows, _ = load_attention_rows(root / "legacy/a100/attention.csv")
    measured = [float(r["time_stats.attn_decode.median"]) for r in decode_rows
                if r["batch_size"] == "32" and r["kv_cache_size"] == "2048"][0]
    linear = recipe.linear.layer_ms(32)
    allreduce = 2 * recipe.all_reduce_ms(32)
    modelled = recipe.decode_attention_ms([2048] * 32)
    add("A100 Llama-2-70B TP2 linear 32 tok ms/layer", 0.605, linear)
    add("A100 70B TP2 attn_decode b32 kv2048 (measured) ms", 0.108, measured)
    add("A100 70B TP2 attn_decode b32 kv2048 (modelled, x1.1) ms", 0.108 * 1.1, modelled)
    add("A100 70B TP2 2 all-reduces 32 tok ms/layer", 2 * (0.053 + 0.02), allreduce)
    add("A100 70B TP2 decode layer (measured attn) ms", 0.870,
        linear + measured * (1 + GQA_BATCHING_OVERHEAD) + allreduce)
    add("A100 70B TP2 decode layer (modelled attn) ms", 0.870, linear + modelled + allreduce)
    return checks
