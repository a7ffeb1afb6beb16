#include "expert_gemms_cpu.h"

#include <atomic>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "../dispatch.h"
#include "../parallel.h"
#include "ffn_math.h"
#include "indices.h"

// GCC 10 and clang 9 know AVX512-BF16; older compilers and other CPUs build without the kernels.
// Every kernel function is compiled for AVX-512 with AVX512-BF16, whose one instruction used here
// (vdpbf16ps) only the bf16 pairs' tiles and dot steps issue (the compilers emit none of its
// instructions unasked: the conversions to bf16 are integer code), so the rest runs on any AVX-512
// CPU.
#if defined(__x86_64__) && ((defined(__clang__) && __clang_major__ >= 9) || \
                            (defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 10))
#define MOEPP_HAS_CPU_GEMMS 1
#include <cpuid.h>
#include <immintrin.h>
#define MOEPP_CPU_GEMM_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#else
#define MOEPP_HAS_CPU_GEMMS 0
#endif
#ifndef MOEPP_EMULATE_BF16_PAIRS
#define MOEPP_EMULATE_BF16_PAIRS 0
#endif

namespace moepp::moe {

namespace {

constexpr int64_t kPanel = 64;      // weight rows (output columns) per panel: 4 vectors of 16 fp32
constexpr int64_t kGatePanel = 32;  // up_swiglu's panels: 32 gate rows of U_e, then the matching up rows

// offsets' bounds (host), checked: non-decreasing within [0, rows].
const int32_t* checked_bounds(const TensorView& offsets, int64_t n_ffn, int64_t rows) {
  check_view(offsets, "offsets", DType::kInt32, {n_ffn + 1}, DeviceType::kCPU, -1);
  const int32_t* bounds = offsets.ptr<int32_t>();
  for (int64_t e = 0; e <= n_ffn; ++e) {
    if (bounds[e] < 0 || bounds[e] > rows || (e > 0 && bounds[e] < bounds[e - 1])) {
      throw_invalid("offsets", "must be non-decreasing within [0, rows]");
    }
  }
  return bounds;
}

bool cpu_has_bf16_pairs();  // AVX512-BF16's vdpbf16ps

void require_cpu_support(const char* op) {
  if (!expert_gemms_cpu_supported()) {
    throw std::runtime_error(std::string(op) + ": this CPU or build has no AVX-512 (F, BW, VL, DQ)");
  }
}

// The kernels work in 32-bit words along K: a bf16 pair (elements 2p, 2p + 1) or one fp32 element.
// The tiles' word type C is T's own, or fp32 for bf16 operands widened on a CPU without the
// pairs' dot product (then each expert's rows run widened into an fp32 buffer, the weights'
// panels are packed as fp32 and only the epilogues see bf16).
template <typename T>
constexpr int64_t kPerWord = 4 / static_cast<int64_t>(sizeof(T));

template <typename C>
struct Compute {
  using type = C;
};

std::atomic<bool>& bf16_pairs_setting() {
  static std::atomic<bool> setting{cpu_has_bf16_pairs()};
  return setting;
}

// f(Compute<C>{}) with the tiles' word type for storage type T.
template <typename T, typename F>
void with_compute(const F& f) {
  if constexpr (std::is_same_v<T, BFloat16>) {
    if (!bf16_pairs_setting().load(std::memory_order_relaxed)) return f(Compute<float>{});
  }
  f(Compute<T>{});
}

#if MOEPP_HAS_CPU_GEMMS

// A tile is kRowsPerTile rows by one packed panel: 6 x 4 accumulators, 4 panel vectors and one
// broadcast word (29 of the 32 vector registers), 24 dot products or FMAs per word of K.
constexpr int kRowsPerTile = 6;

inline uint32_t load_word(const void* row, int64_t p) {
  uint32_t v;
  std::memcpy(&v, static_cast<const char*>(row) + 4 * p, 4);
  return v;
}

// Word p of a row stored in T as the tiles' word type C reads it (a bf16 element widened to fp32
// where C is fp32 and T bf16).
template <typename T, typename C>
inline uint32_t load_word(const void* row, int64_t p) {
  if constexpr (std::is_same_v<T, C>) {
    return load_word(row, p);
  } else {
    return static_cast<uint32_t>(static_cast<const BFloat16*>(row)[p].bits) << 16;
  }
}

// Words [p, p + 16) of such a row, the lanes outside `mask` zero.
template <typename T, typename C>
MOEPP_CPU_GEMM_TARGET inline __m512i load_words16(const void* row, int64_t p, __mmask16 mask = 0xffff) {
  if constexpr (std::is_same_v<T, C>) {
    return _mm512_maskz_loadu_epi32(mask, static_cast<const char*>(row) + 4 * p);
  } else {
    const __m256i bits = _mm256_maskz_loadu_epi16(mask, static_cast<const BFloat16*>(row) + p);
    return _mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16);
  }
}

// A mask of the first n of `lanes` (at most 32) lanes, none for n <= 0.
inline uint32_t first_lanes(int64_t n, int lanes) {
  return n >= lanes ? static_cast<uint32_t>((uint64_t{1} << lanes) - 1u) : n <= 0 ? 0u : (1u << n) - 1u;
}

// Rows of a 16 x 16 block of 32-bit words become its columns.
MOEPP_CPU_GEMM_TARGET inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 16; i += 8) {
    for (int j = 0; j < 4; ++j) {
      t[i + j] = _mm512_shuffle_i32x4(r[i + j], r[i + j + 4], 0x88);
      t[i + j + 4] = _mm512_shuffle_i32x4(r[i + j], r[i + j + 4], 0xdd);
    }
  }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0x88);
    r[j + 8] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0xdd);
  }
}

// The dot-product layout of 16 consecutive weight rows (`row_bytes` apart, `words` words of C
// each): panel[p * 64 + column + i] = word p of row i, zero for the rows i >= valid (past the
// weight).
template <typename T, typename C>
MOEPP_CPU_GEMM_TARGET void pack_rows(const char* first, int64_t row_bytes, int valid, int64_t words,
                                     uint32_t* panel, int64_t column) {
  int64_t p = 0;
  if (valid == 16) {
    for (; p + 16 <= words; p += 16) {
      __m512i r[16];
      for (int i = 0; i < 16; ++i) r[i] = load_words16<T, C>(first + i * row_bytes, p);
      transpose16(r);
      for (int j = 0; j < 16; ++j) _mm512_storeu_si512(panel + (p + j) * kPanel + column, r[j]);
    }
  }
  for (; p < words; ++p) {
    for (int i = 0; i < 16; ++i) {
      panel[p * kPanel + column + i] = i < valid ? load_word<T, C>(first + i * row_bytes, p) : 0u;
    }
  }
}

// up_swiglu's epilogue, one row: h's 32 gate and 32 up values scaled and rounded to T (stored
// when kept), and a from them as swiglu_forward computes it.
template <typename T>
struct SwigluEpilogue {
  T* a;  // the expert's first row of a and of h (null when not kept)
  T* h;
  int64_t inner, column;
  float scale;

  MOEPP_CPU_GEMM_TARGET void operator()(int64_t r, const float* gate_up) const {
    T rounded[2 * kGatePanel];
    for (int i = 0; i < 2 * kGatePanel; ++i) rounded[i] = from_float<T>(scale * gate_up[i]);
    T* a_row = a + r * inner + column;
    for (int i = 0; i < kGatePanel; ++i) {
      a_row[i] = from_float<T>(swiglu(to_float(rounded[i]), to_float(rounded[kGatePanel + i])));
    }
    if (h != nullptr) {
      std::memcpy(h + r * 2 * inner + column, rounded, kGatePanel * sizeof(T));
      std::memcpy(h + r * 2 * inner + inner + column, rounded + kGatePanel, kGatePanel * sizeof(T));
    }
  }
};

// down's epilogue, one row: the panel's `width` outputs rounded to T.
template <typename T>
struct StoreEpilogue {
  T* y;  // the expert's first row of y
  int64_t dim, column, width;

  MOEPP_CPU_GEMM_TARGET void operator()(int64_t r, const float* out) const {
    T* y_row = y + r * dim + column;
    for (int64_t i = 0; i < width; ++i) y_row[i] = from_float<T>(out[i]);
  }
};

// The dot-product layout of columns [column, column + width) of K rows (row(i): row i's first
// element, null for a zero row): panel[p * 64 + c] = word p of column + c (in bf16 pairs the pair
// of rows 2p and 2p + 1, the second a zero row past K), zero for c >= width.
constexpr int64_t kPrefetchWords = 8;

template <typename T, typename C, typename RowOf>
MOEPP_CPU_GEMM_TARGET void pack_columns(const RowOf& row_of, int64_t k, int64_t column, int64_t width,
                                        uint32_t* panel) {
  const int64_t words = (k + kPerWord<C> - 1) / kPerWord<C>;
  const auto row = [&](int64_t i) -> const T* {
    const T* first = i < k ? row_of(i) : nullptr;
    return first == nullptr ? nullptr : first + column;
  };
  const auto prefetch = [&](int64_t i) {  // rows ahead: strided reads the hardware prefetcher misses
    if (const T* ahead = row(i)) {
      for (int line = 0; line < static_cast<int>(sizeof(T)); ++line) {  // 64 columns: sizeof(T) lines
        _mm_prefetch(reinterpret_cast<const char*>(ahead) + 64 * line, _MM_HINT_T0);
      }
    }
  };
  if constexpr (std::is_same_v<C, float>) {  // a row of K per word (fp32, or bf16 widened)
    const __mmask16 masks[4] = {static_cast<__mmask16>(first_lanes(width, 16)),
                                static_cast<__mmask16>(first_lanes(width - 16, 16)),
                                static_cast<__mmask16>(first_lanes(width - 32, 16)),
                                static_cast<__mmask16>(first_lanes(width - 48, 16))};
    for (int64_t p = 0; p < words; ++p) {
      prefetch(p + kPrefetchWords);
      const T* r = row(p);
      for (int j = 0; j < 4; ++j) {
        _mm512_store_si512(panel + p * kPanel + 16 * j,
                           r == nullptr ? _mm512_setzero_si512() : load_words16<T, C>(r, 16 * j, masks[j]));
      }
    }
  } else {
    // words of column c: (row 2p, row 2p + 1) interleaved; index i < 32 of a source picks row 2p
    const __m512i low = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6,
                                         37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    const __m512i high = _mm512_set_epi16(63, 31, 62, 30, 61, 29, 60, 28, 59, 27, 58, 26, 57, 25, 56, 24, 55, 23, 54,
                                          22, 53, 21, 52, 20, 51, 19, 50, 18, 49, 17, 48, 16);
    const __mmask32 masks[2] = {first_lanes(width, 32), first_lanes(width - 32, 32)};
    for (int64_t p = 0; p < words; ++p) {
      prefetch(2 * (p + kPrefetchWords));
      prefetch(2 * (p + kPrefetchWords) + 1);
      const T* even = row(2 * p);
      const T* odd = row(2 * p + 1);
      for (int half = 0; half < 2; ++half) {
        const __m512i r0 = even == nullptr ? _mm512_setzero_si512() : _mm512_maskz_loadu_epi16(masks[half], even + 32 * half);
        const __m512i r1 = odd == nullptr ? _mm512_setzero_si512() : _mm512_maskz_loadu_epi16(masks[half], odd + 32 * half);
        _mm512_store_si512(panel + p * kPanel + 32 * half, _mm512_permutex2var_epi16(r0, low, r1));
        _mm512_store_si512(panel + p * kPanel + 32 * half + 16, _mm512_permutex2var_epi16(r0, high, r1));
      }
    }
  }
}

// swiglu_grad's epilogue, one row: the panel's `width` values of da rounded to T (as a product
// stored in T would be), then swiglu_backward_row's math: a, d gate and d up from h and da.
template <typename T>
struct SwigluGradEpilogue {
  const T* h;  // the expert's first row of h, dh and a
  T* dh;
  T* a;
  int64_t inner, column, width;

  MOEPP_CPU_GEMM_TARGET void operator()(int64_t r, const float* da) const {
    const T* h_row = h + r * 2 * inner + column;
    T* dh_row = dh + r * 2 * inner + column;
    T* a_row = a + r * inner + column;
    for (int64_t i = 0; i < width; ++i) {
      float act, dgate, dup;
      swiglu_backward(to_float(h_row[i]), to_float(h_row[inner + i]), to_float(from_float<T>(da[i])), &act, &dgate,
                      &dup);
      a_row[i] = from_float<T>(act);
      dh_row[i] = from_float<T>(dgate);
      dh_row[inner + i] = from_float<T>(dup);
    }
  }
};

// acc + x's bf16 pairs times w's, lane by lane: vdpbf16ps, or where the build emulates it
// (MOEPP_EMULATE_BF16_PAIRS, so that CPUs without AVX512-BF16 test the pairs' route) the sum as
// the instruction's definition writes it: the odd elements' product, then the even ones', each
// exact in fp32 and added with one rounding (its flush of denormals to zero aside).
MOEPP_CPU_GEMM_TARGET inline __m512 dot_bf16_pairs(__m512 acc, __m512i x, __m512i w) {
#if MOEPP_EMULATE_BF16_PAIRS
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  const __m512 odd = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_and_si512(x, high)),
                                   _mm512_castsi512_ps(_mm512_and_si512(w, high)));
  return _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(x, 16)),
                         _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)), _mm512_add_ps(acc, odd));
#else
  return _mm512_dpbf16_ps(acc, (__m512bh)x, (__m512bh)w);
#endif
}

// R rows (first: their index among the expert's rows) against one packed panel of `words` words,
// both in the word type C.
template <typename C, int R, typename Epilogue>
MOEPP_CPU_GEMM_TARGET void tile(const void* const* rows, const uint32_t* panel, int64_t words,
                                const Epilogue& epilogue, int64_t first) {
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_ps();
  }
  for (int64_t p = 0; p < words; ++p) {
    const uint32_t* w = panel + p * kPanel;
    const __m512i u0 = _mm512_loadu_si512(w), u1 = _mm512_loadu_si512(w + 16);
    const __m512i u2 = _mm512_loadu_si512(w + 32), u3 = _mm512_loadu_si512(w + 48);
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      if constexpr (std::is_same_v<C, float>) {
        const __m512 x = _mm512_set1_ps(static_cast<const float*>(rows[r])[p]);
        acc[r][0] = _mm512_fmadd_ps(x, _mm512_castsi512_ps(u0), acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(x, _mm512_castsi512_ps(u1), acc[r][1]);
        acc[r][2] = _mm512_fmadd_ps(x, _mm512_castsi512_ps(u2), acc[r][2]);
        acc[r][3] = _mm512_fmadd_ps(x, _mm512_castsi512_ps(u3), acc[r][3]);
      } else {
        const __m512i x = _mm512_set1_epi32(static_cast<int>(load_word(rows[r], p)));
        acc[r][0] = dot_bf16_pairs(acc[r][0], x, u0);
        acc[r][1] = dot_bf16_pairs(acc[r][1], x, u1);
        acc[r][2] = dot_bf16_pairs(acc[r][2], x, u2);
        acc[r][3] = dot_bf16_pairs(acc[r][3], x, u3);
      }
    }
  }
  alignas(64) float out[kPanel];
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < 4; ++j) _mm512_store_ps(out + 16 * j, acc[r][j]);
    epilogue(first + r, out);
  }
}

// Rows [0, m) of one expert against one packed panel, kRowsPerTile at a time.
template <typename C, typename Epilogue>
MOEPP_CPU_GEMM_TARGET void panel_rows(const void* const* rows, int64_t m, const uint32_t* panel, int64_t words,
                                      const Epilogue& epilogue) {
  int64_t r = 0;
  for (; r + kRowsPerTile <= m; r += kRowsPerTile) tile<C, kRowsPerTile>(rows + r, panel, words, epilogue, r);
  switch (m - r) {
    case 1: tile<C, 1>(rows + r, panel, words, epilogue, r); break;
    case 2: tile<C, 2>(rows + r, panel, words, epilogue, r); break;
    case 3: tile<C, 3>(rows + r, panel, words, epilogue, r); break;
    case 4: tile<C, 4>(rows + r, panel, words, epilogue, r); break;
    case 5: tile<C, 5>(rows + r, panel, words, epilogue, r); break;
    default: break;
  }
}

// An expert of at most kDirectRows rows skips the packing, which would cost more than its
// product (a decode step's experts): each of its rows against the panel's 64 weight rows read
// where they are (null: a zero row past the weight), 4 dot products at a time along K.
constexpr int64_t kDirectRows = 2;

// acc + the products of x's and w's words, lane by lane.
template <typename C>
MOEPP_CPU_GEMM_TARGET inline __m512 dot_step(__m512 acc, __m512i x, __m512i w) {
  if constexpr (std::is_same_v<C, float>) {
    return _mm512_fmadd_ps(_mm512_castsi512_ps(x), _mm512_castsi512_ps(w), acc);
  } else {
    return dot_bf16_pairs(acc, x, w);
  }
}

// rows: words of C; weight_rows: stored in T.
template <typename T, typename C, typename Epilogue>
MOEPP_CPU_GEMM_TARGET void direct_rows(const void* const* rows, int64_t m, const char* const* weight_rows,
                                       int64_t words, const Epilogue& epilogue) {
  const __mmask16 tail = static_cast<__mmask16>(first_lanes(words % 16, 16));
  for (int64_t r = 0; r < m; ++r) {
    const char* x = static_cast<const char*>(rows[r]);
    alignas(64) float out[kPanel];
    for (int64_t c = 0; c < kPanel; c += 4) {
      __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
      int64_t p = 0;
      for (; p + 16 <= words; p += 16) {
        const __m512i xv = _mm512_loadu_si512(x + 4 * p);
        for (int j = 0; j < 4; ++j) {
          if (weight_rows[c + j] != nullptr) {
            acc[j] = dot_step<C>(acc[j], xv, load_words16<T, C>(weight_rows[c + j], p));
          }
        }
      }
      if (p < words) {
        const __m512i xv = _mm512_maskz_loadu_epi32(tail, x + 4 * p);
        for (int j = 0; j < 4; ++j) {
          if (weight_rows[c + j] != nullptr) {
            acc[j] = dot_step<C>(acc[j], xv, load_words16<T, C>(weight_rows[c + j], p, tail));
          }
        }
      }
      for (int j = 0; j < 4; ++j) out[c + j] = _mm512_reduce_add_ps(acc[j]);
    }
    epilogue(r, out);
  }
}

// The most rows any expert has.
int64_t widest_expert(const int32_t* bounds, int64_t n_ffn) {
  int64_t widest = 0;
  for (int64_t e = 0; e < n_ffn; ++e) widest = std::max<int64_t>(widest, bounds[e + 1] - bounds[e]);
  return widest;
}

uint32_t* align64(uint32_t* p) {
  return reinterpret_cast<uint32_t*>((reinterpret_cast<uintptr_t>(p) + 63) & ~uintptr_t{63});
}

// body(e, lo, m, rows, p, panel) for every expert e with m > 0 rows (from row lo; rows: their
// pointers from rows_of(lo, m), taken once per expert) and each of its `panels` panels p, the
// panels split over the workers; panel: the worker's buffer for one packed panel of `words`
// words, 64-byte aligned (one cache line per word of K).
template <typename RowsOf, typename Body>
void each_expert_panel(const int32_t* bounds, int64_t n_ffn, int64_t panels, int64_t words, int num_threads,
                       RowsOf& rows_of, const Body& body) {
  const int workers = choose_workers(panels, num_threads, 1);
  std::vector<std::vector<uint32_t>> buffers(workers, std::vector<uint32_t>(words * kPanel + 16));
  for (int64_t e = 0; e < n_ffn; ++e) {
    const int64_t lo = bounds[e], m = bounds[e + 1] - lo;
    if (m == 0) continue;
    const void* const* rows = rows_of(lo, m);
    parallel_for(panels, workers, [&](int w, int64_t begin, int64_t end) {
      uint32_t* panel = align64(buffers[w].data());
      for (int64_t p = begin; p < end; ++p) body(e, lo, m, rows, p, panel);
    });
  }
}

// The first `count` rows of a row-major [count, width] tensor, one pointer each (the tiles' rows).
template <typename T>
std::vector<const void*> row_pointers(const T* rows, int64_t count, int64_t width) {
  std::vector<const void*> out(static_cast<size_t>(count));
  for (int64_t r = 0; r < count; ++r) out[r] = rows + r * width;
  return out;
}

// bf16 rows [begin, end) of `rows` (their pointers; width elements each) as fp32 rows of out.
MOEPP_CPU_GEMM_TARGET void widen_rows(const void* const* rows, int64_t begin, int64_t end, int64_t width,
                                      float* out) {
  for (int64_t r = begin; r < end; ++r) {
    for (int64_t i = 0; i < width; i += 16) {
      const __mmask16 mask = static_cast<__mmask16>(first_lanes(width - i, 16));
      _mm512_mask_storeu_epi32(out + r * width + i, mask, load_words16<BFloat16, float>(rows[r], i, mask));
    }
  }
}

// One expert's rows as the tiles read them (words of C), from the pointers of every row (`width`
// elements of T each): the pointers themselves, or, for fp32 tiles of bf16 rows, the expert's
// rows widened into a buffer reused from expert to expert.
template <typename T, typename C>
class ExpertRows {
 public:
  ExpertRows(std::vector<const void*> rows, int64_t width, const int32_t* bounds, int64_t n_ffn, int num_threads)
      : rows_(std::move(rows)), width_(width), num_threads_(num_threads) {
    if constexpr (!std::is_same_v<T, C>) {
      const int64_t widest = widest_expert(bounds, n_ffn);
      widened_.reset(new float[static_cast<size_t>(widest * width)]);  // not zeroed: written before read
      widened_rows_ = row_pointers(widened_.get(), widest, width);
    }
  }

  const void* const* operator()(int64_t lo, int64_t m) {
    if constexpr (std::is_same_v<T, C>) {
      return rows_.data() + lo;
    } else {
      parallel_for(m, choose_workers(m * width_, num_threads_, 1 << 16), [&](int, int64_t begin, int64_t end) {
        widen_rows(rows_.data() + lo, begin, end, width_, widened_.get());
      });
      return widened_rows_.data();
    }
  }

 private:
  std::vector<const void*> rows_;
  int64_t width_;
  int num_threads_;
  std::unique_ptr<float[]> widened_;
  std::vector<const void*> widened_rows_;
};

template <typename T, typename C>
void up_swiglu_typed(const TensorView& x, const int32_t* src, const int32_t* bounds, int64_t n_ffn,
                     const TensorView& up, int top_k, float scale, T* a, T* h, int num_threads) {
  const int64_t tokens = x.shape[0], dim = x.shape[1], inner = up.shape[1] / 2;
  const int64_t words = dim / kPerWord<C>, panels = inner / kGatePanel, row_bytes = dim * sizeof(T);
  const std::vector<T> zero_row(static_cast<size_t>(dim), T{0});
  std::vector<const void*> x_rows(static_cast<size_t>(bounds[n_ffn]));
  for (int64_t r = 0; r < bounds[n_ffn]; ++r) {
    x_rows[r] = in_range(src[r], tokens * top_k) ? x.ptr<T>() + static_cast<int64_t>(src[r] / top_k) * dim
                                                 : zero_row.data();
  }
  ExpertRows<T, C> rows_of(std::move(x_rows), dim, bounds, n_ffn, num_threads);
  each_expert_panel(bounds, n_ffn, panels, words, num_threads, rows_of, [&](int64_t e, int64_t lo, int64_t m,
                                                                           const void* const* rows, int64_t p,
                                                                           uint32_t* panel) {
    const char* u_e = reinterpret_cast<const char*>(up.ptr<T>() + e * 2 * inner * dim);
    const int64_t column = p * kGatePanel;
    const SwigluEpilogue<T> epilogue{a + lo * inner, h == nullptr ? nullptr : h + lo * 2 * inner, inner, column,
                                     scale};
    if (m <= kDirectRows) {
      const char* weight_rows[kPanel];  // gate rows, then the matching up rows
      for (int64_t c = 0; c < kPanel; ++c) {
        weight_rows[c] = u_e + ((c < kGatePanel ? 0 : inner - kGatePanel) + column + c) * row_bytes;
      }
      direct_rows<T, C>(rows, m, weight_rows, words, epilogue);
      return;
    }
    for (int q = 0; q < 4; ++q) {  // gate rows, then the matching up rows, 16 at a time
      const int64_t first = (q < 2 ? 0 : inner) + column + (q % 2) * 16;
      pack_rows<T, C>(u_e + first * row_bytes, row_bytes, 16, words, panel, q * 16);
    }
    panel_rows<C>(rows, m, panel, words, epilogue);
  });
}

template <typename T, typename C>
void down_typed(const T* a, const int32_t* bounds, int64_t n_ffn, const T* down, int64_t dim, int64_t inner, T* y,
                int num_threads) {
  const int64_t words = inner / kPerWord<C>, panels = (dim + kPanel - 1) / kPanel, row_bytes = inner * sizeof(T);
  ExpertRows<T, C> rows_of(row_pointers(a, bounds[n_ffn], inner), inner, bounds, n_ffn, num_threads);
  each_expert_panel(bounds, n_ffn, panels, words, num_threads, rows_of, [&](int64_t e, int64_t lo, int64_t m,
                                                                           const void* const* rows, int64_t p,
                                                                           uint32_t* panel) {
    const char* v_e = reinterpret_cast<const char*>(down + e * dim * inner);
    const int64_t column = p * kPanel;
    const StoreEpilogue<T> epilogue{y + lo * dim, dim, column, std::min(kPanel, dim - column)};
    if (m <= kDirectRows) {
      const char* weight_rows[kPanel];  // V_e's rows column + c, null past D
      for (int64_t c = 0; c < kPanel; ++c) weight_rows[c] = column + c < dim ? v_e + (column + c) * row_bytes : nullptr;
      direct_rows<T, C>(rows, m, weight_rows, words, epilogue);
      return;
    }
    for (int q = 0; q < 4; ++q) {  // V_e's rows column + 16q ..., zeros past D
      const int64_t first = column + 16 * q;
      const int valid = static_cast<int>(std::min<int64_t>(16, std::max<int64_t>(0, dim - first)));
      pack_rows<T, C>(valid > 0 ? v_e + first * row_bytes : nullptr, row_bytes, valid, words, panel, 16 * q);
    }
    panel_rows<C>(rows, m, panel, words, epilogue);
  });
}

// rows[r] · B_e for every expert's rows, B_e the [K, N] weight at weights + e * weight_elements
// (N-contiguous), panels of 64 columns of N, each row's outputs to make_epilogue(lo, column,
// width).
template <typename T, typename C, typename MakeEpilogue>
void rows_by_columns(const T* rows, int64_t k, const int32_t* bounds, int64_t n_ffn, const T* weights, int64_t n,
                     int num_threads, const MakeEpilogue& make_epilogue) {
  const int64_t words = k / kPerWord<C>, panels = (n + kPanel - 1) / kPanel;
  ExpertRows<T, C> rows_of(row_pointers(rows, bounds[n_ffn], k), k, bounds, n_ffn, num_threads);
  each_expert_panel(bounds, n_ffn, panels, words, num_threads, rows_of, [&](int64_t e, int64_t lo, int64_t m,
                                                                           const void* const* expert_rows, int64_t p,
                                                                           uint32_t* panel) {
    const int64_t column = p * kPanel, width = std::min(kPanel, n - column);
    const T* b_e = weights + e * k * n;
    pack_columns<T, C>([&](int64_t i) { return b_e + i * n; }, k, column, width, panel);
    panel_rows<C>(expert_rows, m, panel, words, make_epilogue(lo, column, width));
  });
}

template <typename T, typename C>
void swiglu_grad_typed(const T* dy, const int32_t* bounds, int64_t n_ffn, const T* down, int64_t dim, int64_t inner,
                       const T* h, T* dh, T* a, int num_threads) {
  rows_by_columns<T, C>(dy, dim, bounds, n_ffn, down, inner, num_threads, [&](int64_t lo, int64_t column,
                                                                              int64_t width) {
    return SwigluGradEpilogue<T>{h + lo * 2 * inner, dh + lo * 2 * inner, a + lo * inner, inner, column, width};
  });
}

template <typename T, typename C>
void up_grad_input_typed(const T* dh, const int32_t* bounds, int64_t n_ffn, const T* up, int64_t width, int64_t dim,
                         T* dx, int num_threads) {
  rows_by_columns<T, C>(dh, width, bounds, n_ffn, up, dim, num_threads, [&](int64_t lo, int64_t column,
                                                                           int64_t columns) {
    return StoreEpilogue<T>{dx + lo * dim, dim, column, columns};
  });
}

// weight_grad's epilogue, one output row of a panel: the sums over K's chunks so far kept in
// fp32 (`sums`: the worker's [rows, 64]), the last chunk's total scaled and rounded to T.
template <typename T>
struct WeightGradEpilogue {
  float* sums;
  T* out;  // the expert's [n1, n2] gradient
  int64_t n2, column, width;
  float scale;
  bool first, last;  // the chunk of K

  MOEPP_CPU_GEMM_TARGET void operator()(int64_t r, const float* chunk) const {
    float* sum = sums + r * kPanel;
    if (last) {
      T* out_row = out + r * n2 + column;
      for (int64_t i = 0; i < width; ++i) out_row[i] = from_float<T>(scale * (first ? chunk[i] : sum[i] + chunk[i]));
    } else {
      for (int i = 0; i < kPanel; ++i) sum[i] = first ? chunk[i] : sum[i] + chunk[i];
    }
  }
};

// The transpose of `m` rows [m, n1] (`stride` elements apart) as fp32 rows: out[n * m + p] =
// row p's element n, for the columns [n_begin, n_end).
template <typename T>
MOEPP_CPU_GEMM_TARGET void transpose_columns(const T* rows, int64_t stride, int64_t m, int64_t n_begin,
                                             int64_t n_end, float* out) {
  for (int64_t n0 = n_begin; n0 < n_end; n0 += 16) {
    const int valid = static_cast<int>(std::min<int64_t>(16, n_end - n0));
    const __mmask16 columns = static_cast<__mmask16>(first_lanes(valid, 16));
    for (int64_t p0 = 0; p0 < m; p0 += 16) {
      __m512i r[16];
      for (int j = 0; j < 16; ++j) {
        r[j] = p0 + j < m ? load_words16<T, float>(rows + (p0 + j) * stride, n0, columns) : _mm512_setzero_si512();
      }
      transpose16(r);
      const __mmask16 tail = static_cast<__mmask16>(first_lanes(m - p0, 16));
      for (int i = 0; i < valid; ++i) _mm512_mask_storeu_epi32(out + (n0 + i) * m + p0, tail, r[i]);
    }
  }
}

// An expert's rows (K of the weight gradient) in chunks of at most kGradRows: each chunk's panel
// (64 columns) stays in L2 while every output row runs over it.
constexpr int64_t kGradRows = 256;

// out[e] = scale * lhs_eᵀ · rhs_e for every expert, in fp32 FMAs (bf16 widened): lhs [R, n1] (its
// rows r of expert e), rhs_row(r) the first of n2 elements of row r of rhs (null: a zero row);
// out [n_ffn, n1, n2], zero for an expert without rows. The tiles' rows are lhs_e's columns,
// transposed per expert.
template <typename T, typename RhsRow>
void weight_grad_typed(const T* lhs, int64_t n1, const int32_t* bounds, int64_t n_ffn, int64_t n2,
                       const RhsRow& rhs_row, float scale, T* out, int num_threads) {
  const int64_t widest = widest_expert(bounds, n_ffn);
  const int64_t panels = (n2 + kPanel - 1) / kPanel;
  const int workers = choose_workers(panels, num_threads, 1);
  const std::unique_ptr<float[]> lhs_t(new float[static_cast<size_t>(n1 * widest)]);  // written per expert
  struct Worker {
    std::vector<uint32_t> panel;
    std::vector<float> sums;
    std::vector<const void*> rows;
  };
  std::vector<Worker> state(workers);
  for (Worker& w : state) {
    w.panel.resize(static_cast<size_t>(std::min(widest, kGradRows) * kPanel + 16));
    w.sums.resize(static_cast<size_t>(n1 * kPanel));
    w.rows.resize(static_cast<size_t>(n1));
  }
  for (int64_t e = 0; e < n_ffn; ++e) {
    const int64_t lo = bounds[e], m = bounds[e + 1] - lo;
    T* out_e = out + e * n1 * n2;
    if (m == 0) {
      std::memset(static_cast<void*>(out_e), 0, static_cast<size_t>(n1 * n2) * sizeof(T));
      continue;
    }
    parallel_for(n1, choose_workers(n1, num_threads, 64), [&](int, int64_t begin, int64_t end) {
      transpose_columns(lhs + lo * n1, n1, m, begin, end, lhs_t.get());
    });
    parallel_for(panels, workers, [&](int w, int64_t begin, int64_t end) {
      Worker& mine = state[w];
      uint32_t* panel = align64(mine.panel.data());
      for (int64_t p = begin; p < end; ++p) {
        const int64_t column = p * kPanel, width = std::min(kPanel, n2 - column);
        for (int64_t k0 = 0; k0 < m; k0 += kGradRows) {
          const int64_t chunk = std::min(kGradRows, m - k0);
          pack_columns<T, float>([&](int64_t i) { return rhs_row(lo + k0 + i); }, chunk, column, width, panel);
          for (int64_t n = 0; n < n1; ++n) mine.rows[n] = lhs_t.get() + n * m + k0;
          const WeightGradEpilogue<T> epilogue{mine.sums.data(), out_e, n2, column, width, scale, k0 == 0,
                                               k0 + chunk >= m};
          panel_rows<float>(mine.rows.data(), n1, panel, chunk, epilogue);
        }
      }
    });
  }
}

bool cpu_has_bf16_pairs() {
  if (MOEPP_EMULATE_BF16_PAIRS) return true;
  static const bool has = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (!__get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx)) return false;
    return ((eax >> 5) & 1u) != 0;  // CPUID.(EAX=7, ECX=1):EAX[5], AVX512_BF16
  }();
  return has;
}

#else

// Builds without the kernels never reach these: require_cpu_support throws first.
bool cpu_has_bf16_pairs() { return false; }
template <typename T, typename C, typename... Args>
void up_swiglu_typed(const Args&...) {}
template <typename T, typename C, typename... Args>
void down_typed(const Args&...) {}
template <typename T, typename C, typename... Args>
void swiglu_grad_typed(const Args&...) {}
template <typename T, typename C, typename... Args>
void up_grad_input_typed(const Args&...) {}
template <typename T, typename... Args>
void weight_grad_typed(const Args&...) {}

#endif

}  // namespace

#if MOEPP_HAS_CPU_GEMMS

bool expert_gemms_cpu_supported() {
  static const bool supported = [] {
    __builtin_cpu_init();  // avx512f here also means the OS saves the vector state
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  }();
  return supported;
}

#else

bool expert_gemms_cpu_supported() { return false; }

#endif

bool expert_gemms_cpu_bf16_pairs() {
  return expert_gemms_cpu_supported() && bf16_pairs_setting().load(std::memory_order_relaxed);
}

void set_expert_gemms_cpu_bf16_pairs(bool enabled) {
  if (enabled && !(expert_gemms_cpu_supported() && cpu_has_bf16_pairs())) {
    throw_invalid("enabled", "this CPU or build has no AVX512-BF16");
  }
  bf16_pairs_setting().store(enabled, std::memory_order_relaxed);
}

void up_swiglu_cpu(const TensorView& x, const TensorView& row_src, const TensorView& offsets, const TensorView& up,
                   int top_k, float scale, const TensorView& a, const std::optional<TensorView>& h, int num_threads) {
  if (x.ndim != 2) throw_invalid("x", "expected shape [tokens, hidden]");
  if (up.ndim != 3) throw_invalid("up", "expected shape [n_ffn, 2 * ffn_size, hidden]");
  if (row_src.ndim != 1) throw_invalid("row_src", "expected shape [rows]");
  if (top_k < 1) throw_invalid("top_k", "must be >= 1");
  const int64_t tokens = x.shape[0], dim = x.shape[1], n_ffn = up.shape[0], inner = up.shape[1] / 2;
  const int64_t rows = row_src.shape[0];
  const DeviceType cpu = DeviceType::kCPU;
  MOEPP_DISPATCH(x.dtype, "x", (float, BFloat16), T, {
    check_view(x, "x", DTypeOf<T>::value, {tokens, dim}, cpu, -1);
    check_view(up, "up", DTypeOf<T>::value, {n_ffn, 2 * inner, dim}, cpu, -1);
    check_view(row_src, "row_src", DType::kInt32, {rows}, cpu, -1);
    check_view(a, "a", DTypeOf<T>::value, {rows, inner}, cpu, -1);
    if (h) check_view(*h, "h", DTypeOf<T>::value, {rows, 2 * inner}, cpu, -1);
    if (dim % kPerWord<T> != 0) throw_invalid("x", "needs an even hidden size in bf16");
    if (inner % kGatePanel != 0) throw_invalid("up", "needs ffn_size a multiple of 32");
    const int32_t* bounds = checked_bounds(offsets, n_ffn, rows);
    require_cpu_support("up_swiglu_cpu");
    with_compute<T>([&](auto compute) {
      up_swiglu_typed<T, typename decltype(compute)::type>(x, row_src.ptr<int32_t>(), bounds, n_ffn, up, top_k, scale,
                                                           a.ptr<T>(), h ? h->ptr<T>() : nullptr, num_threads);
    });
  });
}

void down_cpu(const TensorView& a, const TensorView& offsets, const TensorView& down, const TensorView& y,
              int num_threads) {
  if (a.ndim != 2) throw_invalid("a", "expected shape [rows, ffn_size]");
  if (down.ndim != 3) throw_invalid("down", "expected shape [n_ffn, hidden, ffn_size]");
  const int64_t rows = a.shape[0], inner = a.shape[1], n_ffn = down.shape[0], dim = down.shape[1];
  const DeviceType cpu = DeviceType::kCPU;
  MOEPP_DISPATCH(a.dtype, "a", (float, BFloat16), T, {
    check_view(a, "a", DTypeOf<T>::value, {rows, inner}, cpu, -1);
    check_view(down, "down", DTypeOf<T>::value, {n_ffn, dim, inner}, cpu, -1);
    check_view(y, "y", DTypeOf<T>::value, {rows, dim}, cpu, -1);
    if (inner % kPerWord<T> != 0) throw_invalid("a", "needs an even ffn_size in bf16");
    const int32_t* bounds = checked_bounds(offsets, n_ffn, rows);
    require_cpu_support("down_cpu");
    with_compute<T>([&](auto compute) {
      down_typed<T, typename decltype(compute)::type>(a.ptr<T>(), bounds, n_ffn, down.ptr<T>(), dim, inner,
                                                      y.ptr<T>(), num_threads);
    });
  });
}

void swiglu_grad_cpu(const TensorView& dy, const TensorView& offsets, const TensorView& down, const TensorView& h,
                     const TensorView& dh, const TensorView& a, int num_threads) {
  if (dy.ndim != 2) throw_invalid("dy", "expected shape [rows, hidden]");
  if (down.ndim != 3) throw_invalid("down", "expected shape [n_ffn, hidden, ffn_size]");
  const int64_t rows = dy.shape[0], dim = dy.shape[1], n_ffn = down.shape[0], inner = down.shape[2];
  const DeviceType cpu = DeviceType::kCPU;
  MOEPP_DISPATCH(dy.dtype, "dy", (float, BFloat16), T, {
    check_view(dy, "dy", DTypeOf<T>::value, {rows, dim}, cpu, -1);
    check_view(down, "down", DTypeOf<T>::value, {n_ffn, dim, inner}, cpu, -1);
    check_view(h, "h", DTypeOf<T>::value, {rows, 2 * inner}, cpu, -1);
    check_view(dh, "dh", DTypeOf<T>::value, {rows, 2 * inner}, cpu, -1);
    check_view(a, "a", DTypeOf<T>::value, {rows, inner}, cpu, -1);
    if (dim % kPerWord<T> != 0) throw_invalid("dy", "needs an even hidden size in bf16");
    const int32_t* bounds = checked_bounds(offsets, n_ffn, rows);
    require_cpu_support("swiglu_grad_cpu");
    with_compute<T>([&](auto compute) {
      swiglu_grad_typed<T, typename decltype(compute)::type>(dy.ptr<T>(), bounds, n_ffn, down.ptr<T>(), dim, inner,
                                                             h.ptr<T>(), dh.ptr<T>(), a.ptr<T>(), num_threads);
    });
  });
}

void up_grad_input_cpu(const TensorView& dh, const TensorView& offsets, const TensorView& up, const TensorView& dx,
                       int num_threads) {
  if (dh.ndim != 2) throw_invalid("dh", "expected shape [rows, 2 * ffn_size]");
  if (up.ndim != 3) throw_invalid("up", "expected shape [n_ffn, 2 * ffn_size, hidden]");
  const int64_t rows = dh.shape[0], width = dh.shape[1], n_ffn = up.shape[0], dim = up.shape[2];
  const DeviceType cpu = DeviceType::kCPU;
  MOEPP_DISPATCH(dh.dtype, "dh", (float, BFloat16), T, {
    check_view(dh, "dh", DTypeOf<T>::value, {rows, width}, cpu, -1);
    check_view(up, "up", DTypeOf<T>::value, {n_ffn, width, dim}, cpu, -1);
    check_view(dx, "dx", DTypeOf<T>::value, {rows, dim}, cpu, -1);
    if (width % kPerWord<T> != 0) throw_invalid("dh", "needs an even width in bf16");
    const int32_t* bounds = checked_bounds(offsets, n_ffn, rows);
    require_cpu_support("up_grad_input_cpu");
    with_compute<T>([&](auto compute) {
      up_grad_input_typed<T, typename decltype(compute)::type>(dh.ptr<T>(), bounds, n_ffn, up.ptr<T>(), width, dim,
                                                               dx.ptr<T>(), num_threads);
    });
  });
}

void weight_grad_cpu(const TensorView& lhs, const TensorView& rhs, const std::optional<TensorView>& rhs_src,
                     const TensorView& offsets, int top_k, float scale, const TensorView& out, int num_threads) {
  if (lhs.ndim != 2) throw_invalid("lhs", "expected shape [rows, n1]");
  if (rhs.ndim != 2) throw_invalid("rhs", "expected shape [rows (tokens with rhs_src), n2]");
  if (out.ndim != 3) throw_invalid("out", "expected shape [n_ffn, n1, n2]");
  if (top_k < 1) throw_invalid("top_k", "must be >= 1");
  const int64_t rows = lhs.shape[0], n1 = lhs.shape[1], rhs_rows = rhs.shape[0], n2 = rhs.shape[1];
  const int64_t n_ffn = out.shape[0];
  const DeviceType cpu = DeviceType::kCPU;
  MOEPP_DISPATCH(lhs.dtype, "lhs", (float, BFloat16), T, {
    check_view(lhs, "lhs", DTypeOf<T>::value, {rows, n1}, cpu, -1);
    check_view(rhs, "rhs", DTypeOf<T>::value, {rhs_src ? rhs_rows : rows, n2}, cpu, -1);
    if (rhs_src) check_view(*rhs_src, "rhs_src", DType::kInt32, {rows}, cpu, -1);
    check_view(out, "out", DTypeOf<T>::value, {n_ffn, n1, n2}, cpu, -1);
    const int32_t* bounds = checked_bounds(offsets, n_ffn, rows);
    require_cpu_support("weight_grad_cpu");
    const T* rhs_first = rhs.ptr<T>();
    const int32_t* src = rhs_src ? rhs_src->ptr<int32_t>() : nullptr;
    const int64_t slots = rhs_rows * top_k;
    // row r of rhs: rhs's row r, or through rhs_src the token of slot src[r] (a zero row for a slot naming none)
    const auto rhs_row = [&](int64_t r) -> const T* {
      if (src == nullptr) return rhs_first + r * n2;
      return in_range(src[r], slots) ? rhs_first + (src[r] / top_k) * n2 : nullptr;
    };
    weight_grad_typed<T>(lhs.ptr<T>(), n1, bounds, n_ffn, n2, rhs_row, scale, out.ptr<T>(), num_threads);
  });
}

}  // namespace moepp::moe
