// Ragged paged attention for XLA:CPU, called through the typed XLA FFI.
//
// Same semantics as reference.py: a flat token axis split by cu_q_lens, keys and values
// read through the page table at absolute positions, causal within the chunk, optional
// sliding window and soft cap, online softmax in float32, padding tokens get zeros.
//
// Why a hand-written kernel: XLA on CPU materialises every page gathered through the
// page table (a copy of each sequence's whole context per step and layer). Here the
// K/V rows are read in place from the cache buffer.
//
// Work unit: one query token, all heads (a kv head's `group` query heads together, so
// each key and value row is loaded once for all of them). Keys are walked in blocks of
// kKeyBlock absolute positions, so a token's result depends only on its own query, its
// position and its sequence's keys: the same alone or batched, in any bucket, prefilled
// at once or in chunks (bitwise). Work units are independent, so they are shared
// between the caller and XLA's intra-op thread pool without changing any result.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <thread>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define FBJAX_AVX2 1
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && \
    defined(__AVX512VL__)
#define FBJAX_AVX512 1
#endif
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kKeyBlock = 64;  // keys per online-softmax step
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

using bf16 = uint16_t;  // raw bfloat16 bits

inline float to_float(float x) { return x; }
inline float to_float(bf16 x) {
  uint32_t u = uint32_t(x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline void store(float x, float* out) { *out = x; }
inline void store(float x, bf16* out) {  // round to nearest even, as XLA's convert
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    *out = 0x7fc0;
  } else {
    *out = bf16((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
}

struct Problem {
  int64_t tokens, q_heads, head_dim, num_pages, page_size, kv_heads, group;
  int64_t max_seqs, pages_per_seq;
  float sm_scale;
  int64_t window;  // < 0: none
  float soft_cap;  // <= 0: none
};

// Per-thread scratch for one work unit.
struct Scratch {
  std::vector<float> q, s, acc, m, l, alpha;
  std::vector<const void*> krows, vrows;
  void resize(int64_t q_heads, int64_t kv_heads, int64_t head_dim) {
    q.resize(q_heads * head_dim);
    s.resize(q_heads * kKeyBlock);
    acc.resize(q_heads * head_dim);
    m.resize(q_heads);
    l.resize(q_heads);
    alpha.resize(q_heads);
    krows.resize(kv_heads * kKeyBlock);
    vrows.resize(kv_heads * kKeyBlock);
  }
};

// ---------------------------------------------------------------------------- kernels
// Each step (scores, softmax, P @ V) has a portable scalar version, an AVX2+FMA one
// (head_dim % 8 == 0) and, where it pays, an AVX-512 one; cpu_ffi.py compiles one build
// per ISA level. `Paths` picks per (build, head_dim, group), never per batch.

#ifdef FBJAX_AVX2
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const bf16* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// The eight horizontal sums of a[0..7], as one vector.
inline __m256 reduce8(const __m256* a) {
  __m256 t0 = _mm256_hadd_ps(a[0], a[1]);
  __m256 t1 = _mm256_hadd_ps(a[2], a[3]);
  __m256 t2 = _mm256_hadd_ps(a[4], a[5]);
  __m256 t3 = _mm256_hadd_ps(a[6], a[7]);
  t0 = _mm256_hadd_ps(t0, t1);
  t2 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(t0, t2, 0x20),
                       _mm256_permute2f128_ps(t0, t2, 0x31));
}

inline float hsum(__m256 a) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_shuffle_ps(x, x, 1));
  return _mm_cvtss_f32(x);
}

inline float hmax(__m256 a) {
  __m128 x = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  x = _mm_max_ps(x, _mm_movehl_ps(x, x));
  x = _mm_max_ss(x, _mm_shuffle_ps(x, x, 1));
  return _mm_cvtss_f32(x);
}

// exp(x) for x <= 0 (Cephes expf polynomial, ~1 ulp); x < -87 (and -inf) gives 0.
inline __m256 exp8(__m256 x) {
  const __m256 dead = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_LT_OQ);
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  __m256i n = _mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127));
  y = _mm256_mul_ps(y, _mm256_castsi256_ps(_mm256_slli_epi32(n, 23)));
  return _mm256_andnot_ps(dead, y);
}

// Dot products of 8 (query row, key row) pairs, one per lane: lane i = sum(q[i] * k[i]).
// Every lane is summed in the same order, so a score does not depend on its lane.
template <typename KT>
inline __m256 dots8(const float* const* q, const KT* const* k, int64_t d) {
  __m256 a[8];
  for (int u = 0; u < 8; ++u) a[u] = _mm256_mul_ps(load8(q[u]), load8(k[u]));
  for (int64_t c = 8; c < d; c += 8)
    for (int u = 0; u < 8; ++u) a[u] = _mm256_fmadd_ps(load8(q[u] + c), load8(k[u] + c), a[u]);
  return reduce8(a);
}

// s[g * kKeyBlock + j] = q[g] . k[j] for j < ceil(n / 4) * 4 (rows padded past n).
// Two query rows x four keys per step: six loads per eight FMAs.
// kD > 0: head_dim known at compile time (fully unrolled dot products).
template <typename KT, int kD>
void scores_avx2(const float* q, int64_t group, int64_t head_dim, const void* const* rows,
                 int64_t n, float* s) {
  const int64_t d = kD > 0 ? kD : head_dim;
  int64_t g = 0;
  for (; g + 2 <= group; g += 2) {
    const float* q0 = q + g * d;
    const float* q1 = q0 + d;
    const float* qs[8] = {q0, q0, q0, q0, q1, q1, q1, q1};
    for (int64_t j = 0; j < n; j += 4) {
      const KT* k[8];
      for (int u = 0; u < 4; ++u) k[u] = k[u + 4] = static_cast<const KT*>(rows[j + u]);
      const __m256 r = dots8<KT>(qs, k, d);
      _mm_storeu_ps(s + g * kKeyBlock + j, _mm256_castps256_ps128(r));
      _mm_storeu_ps(s + (g + 1) * kKeyBlock + j, _mm256_extractf128_ps(r, 1));
    }
  }
  if (g < group) {  // an odd row: eight keys per step
    const float* q0 = q + g * d;
    const float* qs[8] = {q0, q0, q0, q0, q0, q0, q0, q0};
    for (int64_t j = 0; j < n; j += 8) {
      const KT* k[8];
      for (int u = 0; u < 8; ++u) k[u] = static_cast<const KT*>(rows[j + u]);
      _mm256_storeu_ps(s + g * kKeyBlock + j, dots8<KT>(qs, k, d));
    }
  }
}

// acc[r][offset : offset + 8 * CB] = alpha[r] * acc[r][...] + sum_j p[r][j] * v[j][...]
// for RB rows at once: each value row is loaded once for all of them, and the RB * CB
// accumulators are independent FMA chains.
template <typename VT, int RB, int CB>
void pv_block(const float* p, const float* alpha, const void* const* rows, int64_t n,
              int64_t offset, int64_t d, float* acc) {
  __m256 a[RB][CB];
  for (int r = 0; r < RB; ++r) {
    const __m256 al = _mm256_set1_ps(alpha[r]);
    for (int c = 0; c < CB; ++c)
      a[r][c] = _mm256_mul_ps(al, _mm256_loadu_ps(acc + r * d + offset + 8 * c));
  }
  for (int64_t j = 0; j < n; ++j) {
    const VT* v = static_cast<const VT*>(rows[j]) + offset;
    __m256 vv[CB];
    for (int c = 0; c < CB; ++c) vv[c] = load8(v + 8 * c);
    for (int r = 0; r < RB; ++r) {
      const __m256 pr = _mm256_set1_ps(p[r * kKeyBlock + j]);
      for (int c = 0; c < CB; ++c) a[r][c] = _mm256_fmadd_ps(pr, vv[c], a[r][c]);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int c = 0; c < CB; ++c) _mm256_storeu_ps(acc + r * d + offset + 8 * c, a[r][c]);
}

template <typename VT, int RB>
void pv_rows(const float* p, const float* alpha, const void* const* rows, int64_t n,
             int64_t d, float* acc) {
  int64_t c = 0;
  for (; c + 16 <= d; c += 16) pv_block<VT, RB, 2>(p, alpha, rows, n, c, d, acc);
  if (c < d) pv_block<VT, RB, 1>(p, alpha, rows, n, c, d, acc);
}

template <typename VT>
void pv_avx2(const float* p, const float* alpha, const void* const* rows, int64_t n,
             int64_t group, int64_t d, float* acc) {
  int64_t g = 0;
  for (; g + 4 <= group; g += 4)
    pv_rows<VT, 4>(p + g * kKeyBlock, alpha + g, rows, n, d, acc + g * d);
  const float* pg = p + g * kKeyBlock;
  switch (group - g) {
    case 3: pv_rows<VT, 3>(pg, alpha + g, rows, n, d, acc + g * d); break;
    case 2: pv_rows<VT, 2>(pg, alpha + g, rows, n, d, acc + g * d); break;
    case 1: pv_rows<VT, 1>(pg, alpha + g, rows, n, d, acc + g * d); break;
    default: break;
  }
}

// p = exp(s - m) in place over n entries; returns sum(p).
float exp_avx2(float* s, int64_t n, float m) {
  const int64_t padded = (n + 7) / 8 * 8;  // <= kKeyBlock
  for (int64_t j = n; j < padded; ++j) s[j] = kNegInf;
  const __m256 mv = _mm256_set1_ps(m);
  __m256 total = _mm256_setzero_ps();
  for (int64_t j = 0; j < padded; j += 8) {
    __m256 p = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), mv));
    _mm256_storeu_ps(s + j, p);
    total = _mm256_add_ps(total, p);
  }
  return hsum(total);
}

float max_avx2(const float* s, int64_t n) {
  int64_t j = 0;
  float m = kNegInf;
  if (n >= 8) {
    __m256 mv = _mm256_loadu_ps(s);
    for (j = 8; j + 8 <= n; j += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(s + j));
    m = hmax(mv);
  }
  for (; j < n; ++j) m = std::max(m, s[j]);
  return m;
}
#endif  // FBJAX_AVX2

#ifdef FBJAX_AVX512
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const bf16* p) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// exp(x) for x <= 0, as exp8 on sixteen lanes.
inline __m512 exp16(__m512 x) {
  const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_GE_OQ);
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  __m512 fx = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693359375f), x);
  x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(-2.12194440e-4f), x);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.0f)));
  __m512i n = _mm512_add_epi32(_mm512_cvtps_epi32(fx), _mm512_set1_epi32(127));
  y = _mm512_mul_ps(y, _mm512_castsi512_ps(_mm512_slli_epi32(n, 23)));
  return _mm512_maskz_mov_ps(live, y);
}

float exp_avx512(float* s, int64_t n, float m) {
  const int64_t padded = (n + 15) / 16 * 16;  // <= kKeyBlock
  for (int64_t j = n; j < padded; ++j) s[j] = kNegInf;
  const __m512 mv = _mm512_set1_ps(m);
  __m512 total = _mm512_setzero_ps();
  for (int64_t j = 0; j < padded; j += 16) {
    __m512 p = exp16(_mm512_sub_ps(_mm512_loadu_ps(s + j), mv));
    _mm512_storeu_ps(s + j, p);
    total = _mm512_add_ps(total, p);
  }
  return _mm512_reduce_add_ps(total);
}

float max_avx512(const float* s, int64_t n) {
  __m512 mv = _mm512_set1_ps(kNegInf);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 in = n - j >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - j)) - 1);
    mv = _mm512_max_ps(mv, _mm512_mask_loadu_ps(_mm512_set1_ps(kNegInf), in, s + j));
  }
  return _mm512_reduce_max_ps(mv);
}

constexpr int64_t kMaxPairChunks = 32;  // head_dim <= 256 for scores_avx512

// Scores of two query rows against eight keys: each zmm lane pair holds (row, dims c..c+8)
// times the key broadcast to both rows, so a dot product needs half the FMAs of the
// AVX2 code; three shuffle levels then finish all sixteen sums at once.
template <typename KT, int kD>
void scores_avx512(const float* q, int64_t group, int64_t head_dim, const void* const* rows,
                   int64_t n, float* s) {
  const int64_t d = kD > 0 ? kD : head_dim;
  const int64_t chunks = d / 8;
  // keys in the order that makes the reduction below come out sorted
  static constexpr int kOrder[8] = {0, 4, 1, 5, 2, 6, 3, 7};
  for (int64_t g = 0; g + 2 <= group; g += 2) {
    const float* q0 = q + g * d;
    const float* q1 = q0 + d;
    float* s0 = s + g * kKeyBlock;
    float* s1 = s0 + kKeyBlock;
    __m512 qc[kD > 0 ? kD / 8 : kMaxPairChunks];  // [row0 dims c..c+8 | row1 dims c..c+8]
    for (int64_t c = 0; c < chunks; ++c)
      qc[c] = _mm512_insertf32x8(_mm512_castps256_ps512(load8(q0 + 8 * c)), load8(q1 + 8 * c),
                                 1);
    for (int64_t j = 0; j < n; j += 8) {
      const KT* k[8];
      for (int u = 0; u < 8; ++u) k[u] = static_cast<const KT*>(rows[j + kOrder[u]]);
      __m512 a[8];
      for (int u = 0; u < 8; ++u) a[u] = _mm512_setzero_ps();
      for (int64_t c = 0; c < chunks; ++c)
        for (int u = 0; u < 8; ++u)
          a[u] = _mm512_fmadd_ps(qc[c], _mm512_broadcast_f32x8(load8(k[u] + 8 * c)), a[u]);
      // a[u] = [row0 partial sums (8) | row1 partial sums (8)]
      __m512 b[4];
      for (int i = 0; i < 4; ++i)
        b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xdd));
      __m512 c2[2];
      for (int i = 0; i < 2; ++i)
        c2[i] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0x44),
                              _mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0xee));
      const __m512 r = _mm512_add_ps(_mm512_shuffle_ps(c2[0], c2[1], 0x88),
                                     _mm512_shuffle_ps(c2[0], c2[1], 0xdd));
      // r = [row0 keys 0-3 | row1 keys 0-3 | row0 keys 4-7 | row1 keys 4-7]
      _mm_storeu_ps(s0 + j, _mm512_castps512_ps128(r));
      _mm_storeu_ps(s1 + j, _mm512_extractf32x4_ps(r, 1));
      _mm_storeu_ps(s0 + j + 4, _mm512_extractf32x4_ps(r, 2));
      _mm_storeu_ps(s1 + j + 4, _mm512_extractf32x4_ps(r, 3));
    }
  }
}

// As pv_block on sixteen lanes.
template <typename VT, int RB, int CB>
void pv_block512(const float* p, const float* alpha, const void* const* rows, int64_t n,
                 int64_t offset, int64_t d, float* acc) {
  __m512 a[RB][CB];
  for (int r = 0; r < RB; ++r) {
    const __m512 al = _mm512_set1_ps(alpha[r]);
    for (int c = 0; c < CB; ++c)
      a[r][c] = _mm512_mul_ps(al, _mm512_loadu_ps(acc + r * d + offset + 16 * c));
  }
  for (int64_t j = 0; j < n; ++j) {
    const VT* v = static_cast<const VT*>(rows[j]) + offset;
    __m512 vv[CB];
    for (int c = 0; c < CB; ++c) vv[c] = load16(v + 16 * c);
    for (int r = 0; r < RB; ++r) {
      const __m512 pr = _mm512_set1_ps(p[r * kKeyBlock + j]);
      for (int c = 0; c < CB; ++c) a[r][c] = _mm512_fmadd_ps(pr, vv[c], a[r][c]);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int c = 0; c < CB; ++c) _mm512_storeu_ps(acc + r * d + offset + 16 * c, a[r][c]);
}

template <typename VT, int RB>
void pv_rows512(const float* p, const float* alpha, const void* const* rows, int64_t n,
                int64_t d, float* acc) {
  int64_t c = 0;
  for (; c + 64 <= d; c += 64) pv_block512<VT, RB, 4>(p, alpha, rows, n, c, d, acc);
  switch ((d - c) / 16) {
    case 3: pv_block512<VT, RB, 3>(p, alpha, rows, n, c, d, acc); break;
    case 2: pv_block512<VT, RB, 2>(p, alpha, rows, n, c, d, acc); break;
    case 1: pv_block512<VT, RB, 1>(p, alpha, rows, n, c, d, acc); break;
    default: break;
  }
}

// head_dim % 16 == 0
template <typename VT>
void pv_avx512(const float* p, const float* alpha, const void* const* rows, int64_t n,
               int64_t group, int64_t d, float* acc) {
  int64_t g = 0;
  for (; g + 4 <= group; g += 4)
    pv_rows512<VT, 4>(p + g * kKeyBlock, alpha + g, rows, n, d, acc + g * d);
  const float* pg = p + g * kKeyBlock;
  switch (group - g) {
    case 3: pv_rows512<VT, 3>(pg, alpha + g, rows, n, d, acc + g * d); break;
    case 2: pv_rows512<VT, 2>(pg, alpha + g, rows, n, d, acc + g * d); break;
    case 1: pv_rows512<VT, 1>(pg, alpha + g, rows, n, d, acc + g * d); break;
    default: break;
  }
}
#endif  // FBJAX_AVX512

template <typename KT>
void scores_scalar(const float* q, int64_t group, int64_t d, const void* const* rows,
                   int64_t n, float* s) {
  for (int64_t g = 0; g < group; ++g) {
    const float* qg = q + g * d;
    for (int64_t j = 0; j < n; ++j) {
      const KT* k = static_cast<const KT*>(rows[j]);
      float a = 0.0f;
      for (int64_t c = 0; c < d; ++c) a += qg[c] * to_float(k[c]);
      s[g * kKeyBlock + j] = a;
    }
  }
}

template <typename VT>
void pv_scalar(const float* p, const float* alpha, const void* const* rows, int64_t n,
               int64_t group, int64_t d, float* acc) {
  for (int64_t g = 0; g < group; ++g) {
    float* ag = acc + g * d;
    for (int64_t c = 0; c < d; ++c) ag[c] *= alpha[g];
    for (int64_t j = 0; j < n; ++j) {
      const VT* v = static_cast<const VT*>(rows[j]);
      const float pj = p[g * kKeyBlock + j];
      for (int64_t c = 0; c < d; ++c) ag[c] += pj * to_float(v[c]);
    }
  }
}

float exp_scalar(float* s, int64_t n, float m) {
  float total = 0.0f;
  for (int64_t j = 0; j < n; ++j) {
    s[j] = std::exp(s[j] - m);
    total += s[j];
  }
  return total;
}

float max_scalar(const float* s, int64_t n) {
  float m = kNegInf;
  for (int64_t j = 0; j < n; ++j) m = std::max(m, s[j]);
  return m;
}

// ------------------------------------------------------------------------- one unit

// Ask for the K/V rows of positions [from, to) ahead of use: the pages are scattered,
// so the hardware prefetcher cannot guess the next one.
template <typename KT>
inline void prefetch_rows(const Problem& pr, const KT* k_cache, const KT* v_cache,
                          const int32_t* pages, int64_t from, int64_t to) {
  const int64_t row_stride = pr.kv_heads * pr.head_dim;
  const int64_t row_bytes = row_stride * int64_t(sizeof(KT));
  for (int64_t j = from; j < to; ++j) {
    int64_t page = pages[j / pr.page_size];
    page = std::min(std::max<int64_t>(page, 0), pr.num_pages - 1);
    const int64_t offset = (page * pr.page_size + j % pr.page_size) * row_stride;
    const char* k = reinterpret_cast<const char*>(k_cache + offset);
    const char* v = reinterpret_cast<const char*>(v_cache + offset);
    for (int64_t b = 0; b < row_bytes; b += 64) {
      __builtin_prefetch(k + b);
      __builtin_prefetch(v + b);
    }
  }
}

// The code paths of one build for one problem; fixed per (build, head_dim, group), so a
// token's result never depends on the batch around it.
struct Paths {
  bool vec8 = false;    // AVX2 dot products and PV (head_dim % 8 == 0)
  bool vec16 = false;   // AVX-512 PV (head_dim % 16 == 0)
  bool pairs16 = false; // AVX-512 scores, two query rows per zmm (even group)
  bool soft = false;    // vector softmax
  Paths(int64_t head_dim, int64_t group) {
#ifdef FBJAX_AVX2
    vec8 = head_dim % 8 == 0;
    soft = true;
#endif
#ifdef FBJAX_AVX512
    vec16 = head_dim % 16 == 0;
    pairs16 = vec8 && group % 2 == 0 && head_dim <= 8 * kMaxPairChunks;
#endif
    (void)head_dim;
    (void)group;
  }
};

template <typename KT>
void scores(const Paths& paths, const float* q, int64_t group, int64_t d,
            const void* const* rows, int64_t n, float* s) {
#ifdef FBJAX_AVX512
  if (paths.pairs16) {
    switch (d) {  // the common head sizes get unrolled code
      case 32: return scores_avx512<KT, 32>(q, group, d, rows, n, s);
      case 64: return scores_avx512<KT, 64>(q, group, d, rows, n, s);
      case 128: return scores_avx512<KT, 128>(q, group, d, rows, n, s);
      default: return scores_avx512<KT, 0>(q, group, d, rows, n, s);
    }
  }
#endif
#ifdef FBJAX_AVX2
  if (paths.vec8) {
    switch (d) {
      case 32: return scores_avx2<KT, 32>(q, group, d, rows, n, s);
      case 64: return scores_avx2<KT, 64>(q, group, d, rows, n, s);
      case 128: return scores_avx2<KT, 128>(q, group, d, rows, n, s);
      default: return scores_avx2<KT, 0>(q, group, d, rows, n, s);
    }
  }
#endif
  (void)paths;
  scores_scalar<KT>(q, group, d, rows, n, s);
}

inline float row_max(const Paths& paths, const float* s, int64_t n) {
#ifdef FBJAX_AVX512
  if (paths.soft) return max_avx512(s, n);
#elif defined(FBJAX_AVX2)
  if (paths.soft) return max_avx2(s, n);
#endif
  (void)paths;
  return max_scalar(s, n);
}

inline float row_exp(const Paths& paths, float* s, int64_t n, float m) {
#ifdef FBJAX_AVX512
  if (paths.soft) return exp_avx512(s, n, m);
#elif defined(FBJAX_AVX2)
  if (paths.soft) return exp_avx2(s, n, m);
#endif
  (void)paths;
  return exp_scalar(s, n, m);
}

template <typename VT>
void pv(const Paths& paths, const float* p, const float* alpha, const void* const* rows,
        int64_t n, int64_t group, int64_t d, float* acc) {
#ifdef FBJAX_AVX512
  if (paths.vec16) return pv_avx512<VT>(p, alpha, rows, n, group, d, acc);
#endif
#ifdef FBJAX_AVX2
  if (paths.vec8) return pv_avx2<VT>(p, alpha, rows, n, group, d, acc);
#endif
  (void)paths;
  pv_scalar<VT>(p, alpha, rows, n, group, d, acc);
}

// Attention of one query token (all its heads) over keys [lo, hi). All kv heads of a
// key block are done together, so each cache row (all heads) is read from memory once.
template <typename QT, typename KT>
void attend(const Problem& pr, const QT* q_tok, const KT* k_cache, const KT* v_cache,
            const int32_t* pages, int64_t lo, int64_t hi, Scratch& sc, QT* out_tok) {
  const int64_t d = pr.head_dim, group = pr.group, rows = pr.q_heads;
  const int64_t row_stride = pr.kv_heads * d;
  const Paths paths(d, group);
  float* q = sc.q.data();
  for (int64_t i = 0; i < rows * d; ++i) q[i] = to_float(q_tok[i]) * pr.sm_scale;
  float* acc = sc.acc.data();
  float* m = sc.m.data();
  float* l = sc.l.data();
  float* alpha = sc.alpha.data();
  std::fill(acc, acc + rows * d, 0.0f);
  std::fill(m, m + rows, kNegInf);
  std::fill(l, l + rows, 0.0f);

  for (int64_t block = lo / kKeyBlock * kKeyBlock; block < hi; block += kKeyBlock) {
    const int64_t j0 = std::max(lo, block), j1 = std::min(hi, block + kKeyBlock);
    const int64_t n = j1 - j0;
    const void** krows = sc.krows.data();  // [kv_heads][kKeyBlock]
    const void** vrows = sc.vrows.data();
    for (int64_t j = j0; j < j1;) {  // row addresses, a page at a time
      int64_t page = pages[j / pr.page_size];
      page = std::min(std::max<int64_t>(page, 0), pr.num_pages - 1);
      const int64_t in_page = j % pr.page_size;
      const int64_t stop = std::min(j1, j - in_page + pr.page_size);
      const int64_t base = (page * pr.page_size + in_page) * row_stride;
      for (int64_t h = 0; h < pr.kv_heads; ++h) {
        for (int64_t i = 0; i < stop - j; ++i) {
          krows[h * kKeyBlock + j - j0 + i] = k_cache + base + i * row_stride + h * d;
          vrows[h * kKeyBlock + j - j0 + i] = v_cache + base + i * row_stride + h * d;
        }
      }
      j = stop;
    }
    for (int64_t h = 0; h < pr.kv_heads; ++h)  // pad lanes
      for (int64_t j = n; j < (n + 7) / 8 * 8; ++j)
        krows[h * kKeyBlock + j] = krows[h * kKeyBlock + n - 1];
    prefetch_rows(pr, k_cache, v_cache, pages, j1, std::min(hi, j1 + kKeyBlock));
    for (int64_t h = 0; h < pr.kv_heads; ++h) {
      const float* qh = q + h * group * d;
      float* s = sc.s.data() + h * group * kKeyBlock;
      scores<KT>(paths, qh, group, d, krows + h * kKeyBlock, n, s);
    }
    for (int64_t r = 0; r < rows; ++r) {
      float* sr = sc.s.data() + r * kKeyBlock;
      if (pr.soft_cap > 0.0f)
        for (int64_t j = 0; j < n; ++j) sr[j] = pr.soft_cap * std::tanh(sr[j] / pr.soft_cap);
      const float m_new = std::max(m[r], row_max(paths, sr, n));
      // m_new is finite unless the scores are; exp(-inf) = 0 on the first block
      alpha[r] = std::exp(m[r] - m_new);
      const float total = row_exp(paths, sr, n, m_new);
      l[r] = l[r] * alpha[r] + total;
      m[r] = m_new;
    }
    for (int64_t h = 0; h < pr.kv_heads; ++h) {
      const float* p = sc.s.data() + h * group * kKeyBlock;
      const void* const* vh = vrows + h * kKeyBlock;
      pv<KT>(paths, p, alpha + h * group, vh, n, group, d, acc + h * group * d);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
    for (int64_t c = 0; c < d; ++c) store(acc[r * d + c] * inv, out_tok + r * d + c);
  }
}

// --------------------------------------------------------------------------- a batch

struct Unit {  // one query token of one sequence
  int64_t seq, token, lo, hi;
};

// Units handed out in chunks from a shared counter; lives as long as the last task.
struct WorkQueue {
  std::vector<Unit> units;
  int64_t chunk = 1;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

// Below this many (query row, key) pairs a call runs on the calling thread alone: a
// thread pool hand-off costs more than the work.
constexpr int64_t kParallelMinPairs = 16384;

template <typename QT, typename KT>
void run(const Problem& pr, const QT* q, const KT* k_cache, const KT* v_cache,
         const int32_t* kv_lens, const int32_t* page_indices, const int32_t* cu_q_lens,
         int64_t num_seqs, QT* out, ffi::ThreadPool* pool) {
  std::memset(out, 0, sizeof(QT) * pr.tokens * pr.q_heads * pr.head_dim);
  num_seqs = std::min(std::max<int64_t>(num_seqs, 0), pr.max_seqs);
  const int64_t max_kv = pr.pages_per_seq * pr.page_size;
  auto queue = std::make_shared<WorkQueue>();
  int64_t pairs = 0;
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t start = std::min(std::max<int64_t>(cu_q_lens[s], 0), pr.tokens);
    const int64_t end = std::min(std::max<int64_t>(cu_q_lens[s + 1], start), pr.tokens);
    const int64_t kv_len = std::min(std::max<int64_t>(kv_lens[s], 0), max_kv);
    for (int64_t t = start; t < end; ++t) {
      const int64_t pos = kv_len - (end - start) + (t - start);  // absolute position
      const int64_t hi = std::min(pos + 1, kv_len);
      const int64_t lo = pr.window >= 0 ? std::max<int64_t>(0, pos - pr.window + 1) : 0;
      if (hi <= lo) continue;  // sees no key: zeros, as the reference
      pairs += (hi - lo) * pr.q_heads;
      queue->units.push_back({s, t, lo, hi});
    }
  }
  const int64_t total = int64_t(queue->units.size());
  const int64_t helpers =
      pool != nullptr && pairs >= kParallelMinPairs
          ? std::min<int64_t>(pool->num_threads(), total - 1) : 0;
  queue->chunk = std::max<int64_t>(1, total / (8 * (helpers + 1)));
  const int64_t row = pr.q_heads * pr.head_dim;
  // Copied into each task: the queue by shared_ptr, the rest by value. A task that
  // starts after the caller returned finds no unit left and touches no buffer.
  auto worker = [queue, pr, q, k_cache, v_cache, page_indices, out, row]() {
    thread_local Scratch scratch;
    scratch.resize(pr.q_heads, pr.kv_heads, pr.head_dim);
    const int64_t total = int64_t(queue->units.size());
    for (;;) {
      const int64_t first = queue->next.fetch_add(queue->chunk);
      if (first >= total) return;
      const int64_t last = std::min(total, first + queue->chunk);
      for (int64_t i = first; i < last; ++i) {
        const Unit& u = queue->units[i];
        attend<QT, KT>(pr, q + u.token * row, k_cache, v_cache,
                       page_indices + u.seq * pr.pages_per_seq, u.lo, u.hi, scratch,
                       out + u.token * row);
      }
      queue->done.fetch_add(last - first, std::memory_order_acq_rel);
    }
  };
  for (int64_t i = 0; i < helpers; ++i) pool->Schedule(decltype(worker)(worker));
  worker();
  // Units taken by helpers may still be running; untaken ones were done by the caller.
  while (queue->done.load(std::memory_order_acquire) < total) std::this_thread::yield();
}

ffi::Error Dispatch(ffi::AnyBuffer q, ffi::AnyBuffer k_cache, ffi::AnyBuffer v_cache,
                    ffi::Buffer<ffi::S32> kv_lens, ffi::Buffer<ffi::S32> page_indices,
                    ffi::Buffer<ffi::S32> cu_q_lens, ffi::Buffer<ffi::S32> num_seqs,
                    ffi::Result<ffi::AnyBuffer> out, float sm_scale, int64_t sliding_window,
                    float soft_cap, ffi::ThreadPool pool) {
  const auto qd = q.dimensions(), kd = k_cache.dimensions(), pd = page_indices.dimensions();
  if (qd.size() != 3 || kd.size() != 4 || pd.size() != 2)
    return ffi::Error::InvalidArgument("ragged_paged_attention: bad ranks");
  if (k_cache.element_type() != v_cache.element_type() ||
      out->element_type() != q.element_type())
    return ffi::Error::InvalidArgument("ragged_paged_attention: dtype mismatch");
  Problem pr;
  pr.tokens = qd[0];
  pr.q_heads = qd[1];
  pr.head_dim = qd[2];
  pr.num_pages = kd[0];
  pr.page_size = kd[1];
  pr.kv_heads = kd[2];
  pr.max_seqs = pd[0];
  pr.pages_per_seq = pd[1];
  if (kd[3] != pr.head_dim || pr.kv_heads <= 0 || pr.q_heads % pr.kv_heads ||
      kv_lens.element_count() != size_t(pr.max_seqs) ||
      cu_q_lens.element_count() != size_t(pr.max_seqs + 1) ||
      num_seqs.element_count() != 1)
    return ffi::Error::InvalidArgument("ragged_paged_attention: inconsistent shapes");
  pr.group = pr.q_heads / pr.kv_heads;
  pr.sm_scale = sm_scale;
  pr.window = sliding_window;
  pr.soft_cap = soft_cap;
  if (pr.tokens == 0 || pr.num_pages == 0) return ffi::Error::Success();
  const int64_t ns = num_seqs.typed_data()[0];
  const auto qt = q.element_type(), kt = k_cache.element_type();
  ffi::ThreadPool* pool_ptr = pool.num_threads() > 0 ? &pool : nullptr;
  auto go = [&](auto q_tag, auto k_tag) {
    using QT = decltype(q_tag);
    using KT = decltype(k_tag);
    run<QT, KT>(pr, static_cast<const QT*>(q.untyped_data()),
                static_cast<const KT*>(k_cache.untyped_data()),
                static_cast<const KT*>(v_cache.untyped_data()), kv_lens.typed_data(),
                page_indices.typed_data(), cu_q_lens.typed_data(), ns,
                static_cast<QT*>(out->untyped_data()), pool_ptr);
  };
  const bool q32 = qt == ffi::DataType::F32, k32 = kt == ffi::DataType::F32;
  const bool q16 = qt == ffi::DataType::BF16, k16 = kt == ffi::DataType::BF16;
  if (q32 && k32) go(float{}, float{});
  else if (q32 && k16) go(float{}, bf16{});
  else if (q16 && k32) go(bf16{}, float{});
  else if (q16 && k16) go(bf16{}, bf16{});
  else return ffi::Error::InvalidArgument("ragged_paged_attention: float32 or bfloat16 only");
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FbjaxRaggedPagedAttention, Dispatch,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()  // q
                                  .Arg<ffi::AnyBuffer>()  // k_cache
                                  .Arg<ffi::AnyBuffer>()  // v_cache
                                  .Arg<ffi::Buffer<ffi::S32>>()  // kv_lens
                                  .Arg<ffi::Buffer<ffi::S32>>()  // page_indices
                                  .Arg<ffi::Buffer<ffi::S32>>()  // cu_q_lens
                                  .Arg<ffi::Buffer<ffi::S32>>()  // num_seqs
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<float>("sm_scale")
                                  .Attr<int64_t>("sliding_window")
                                  .Attr<float>("soft_cap")
                                  .Ctx<ffi::ThreadPool>());
