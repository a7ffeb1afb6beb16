#include "up_swiglu_bf16.h"

#include <cstring>
#include <stdexcept>
#include <vector>

#include "../parallel.h"
#include "ffn_math.h"
#include "indices.h"

// GCC 10 and clang 9 know AVX512-BF16; older compilers and other CPUs build without the kernel.
#if defined(__x86_64__) && ((defined(__clang__) && __clang_major__ >= 9) || \
                            (defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 10))
#define MOEPP_HAS_BF16_KERNEL 1
#include <cpuid.h>
#include <immintrin.h>
#define MOEPP_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#else
#define MOEPP_HAS_BF16_KERNEL 0
#endif

namespace moepp::moe {

constexpr int64_t kPanel = 32;  // gate (and up) columns per panel

#if MOEPP_HAS_BF16_KERNEL

namespace {

// A tile is kRowsPerTile rows of x by a panel of 32 gate and the 32 matching up columns of U_e:
// 6 x 4 accumulators of 16 fp32 lanes, 4 panel vectors and one broadcast row pair (29 of the 32
// vector registers), 24 dot products per pair of K.
constexpr int kRowsPerTile = 6;
constexpr int kPanelWords = 64;  // 32-bit words (bf16 pairs along K) per packed panel row

// Pair p (elements 2p, 2p + 1) of a bf16 row as one 32-bit word.
inline uint32_t load_pair(const BFloat16* row, int64_t p) {
  uint32_t v;
  std::memcpy(&v, row + 2 * p, 4);
  return v;
}

// Rows of a 16 x 16 block of 32-bit words become its columns.
MOEPP_BF16_TARGET inline void transpose16(__m512i r[16]) {
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

// The dot-product layout of 16 consecutive rows of U_e (row-major, `pairs` bf16 pairs each):
// panel[p * 64 + column + i] = pair p of row i, for p < pairs.
MOEPP_BF16_TARGET void pack_rows(const BFloat16* rows, int64_t pairs, uint32_t* panel, int column) {
  int64_t p = 0;
  for (; p + 16 <= pairs; p += 16) {
    __m512i r[16];
    for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(rows + 2 * (i * pairs + p));
    transpose16(r);
    for (int j = 0; j < 16; ++j) _mm512_storeu_si512(panel + (p + j) * kPanelWords + column, r[j]);
  }
  for (; p < pairs; ++p) {
    for (int i = 0; i < 16; ++i) panel[p * kPanelWords + column + i] = load_pair(rows + 2 * i * pairs, p);
  }
}

// The tile's epilogue, one row: h's 32 gate and 32 up values rounded to bf16 (stored when asked),
// and a from them as swiglu_forward computes it.
MOEPP_BF16_TARGET inline void tile_row_epilogue(const float* gate_up, float scale, BFloat16* h_gate, BFloat16* h_up,
                                                BFloat16* a) {
  BFloat16 rounded[2 * kPanel];
  for (int i = 0; i < 2 * kPanel; ++i) rounded[i] = from_float<BFloat16>(scale * gate_up[i]);
  for (int i = 0; i < kPanel; ++i) {
    a[i] = from_float<BFloat16>(swiglu(to_float(rounded[i]), to_float(rounded[kPanel + i])));
  }
  if (h_gate != nullptr) {
    std::memcpy(h_gate, rounded, kPanel * sizeof(BFloat16));
    std::memcpy(h_up, rounded + kPanel, kPanel * sizeof(BFloat16));
  }
}

struct PanelArgs {
  const BFloat16* const* rows;  // the tile's x rows
  const uint32_t* panel;
  int64_t pairs, inner, column;  // column: the panel's first gate column
  float scale;
  BFloat16* a;  // a's row of the tile's first row
  BFloat16* h;  // h's row of the tile's first row, or null
};

template <int R>
MOEPP_BF16_TARGET void tile(const PanelArgs& t) {
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_ps();
  }
  for (int64_t p = 0; p < t.pairs; ++p) {
    const uint32_t* u = t.panel + p * kPanelWords;
    const __m512bh u0 = (__m512bh)_mm512_loadu_si512(u), u1 = (__m512bh)_mm512_loadu_si512(u + 16);
    const __m512bh u2 = (__m512bh)_mm512_loadu_si512(u + 32), u3 = (__m512bh)_mm512_loadu_si512(u + 48);
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const __m512bh x = (__m512bh)_mm512_set1_epi32(static_cast<int>(load_pair(t.rows[r], p)));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], x, u0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], x, u1);
      acc[r][2] = _mm512_dpbf16_ps(acc[r][2], x, u2);
      acc[r][3] = _mm512_dpbf16_ps(acc[r][3], x, u3);
    }
  }
  float gate_up[2 * kPanel];
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < 4; ++j) _mm512_storeu_ps(gate_up + 16 * j, acc[r][j]);
    BFloat16* h_row = t.h == nullptr ? nullptr : t.h + r * 2 * t.inner;
    tile_row_epilogue(gate_up, t.scale, h_row == nullptr ? nullptr : h_row + t.column,
                      h_row == nullptr ? nullptr : h_row + t.inner + t.column, t.a + r * t.inner + t.column);
  }
}

uint32_t* align64(uint32_t* p) {
  return reinterpret_cast<uint32_t*>((reinterpret_cast<uintptr_t>(p) + 63) & ~uintptr_t{63});
}

// Rows [0, m) of one expert against one packed panel, kRowsPerTile at a time.
MOEPP_BF16_TARGET void panel_rows(PanelArgs t, int64_t m) {
  int64_t r = 0;
  for (; r + kRowsPerTile <= m; r += kRowsPerTile) {
    tile<kRowsPerTile>(t);
    t.rows += kRowsPerTile;
    t.a += kRowsPerTile * t.inner;
    if (t.h != nullptr) t.h += kRowsPerTile * 2 * t.inner;
  }
  switch (m - r) {
    case 1: tile<1>(t); break;
    case 2: tile<2>(t); break;
    case 3: tile<3>(t); break;
    case 4: tile<4>(t); break;
    case 5: tile<5>(t); break;
    default: break;
  }
}

}  // namespace

bool up_swiglu_bf16_supported() {
  static const bool supported = [] {
    __builtin_cpu_init();  // avx512f here also means the OS saves the vector state
    if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512bw") ||
        !__builtin_cpu_supports("avx512vl") || !__builtin_cpu_supports("avx512dq")) {
      return false;
    }
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (!__get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx)) return false;
    return ((eax >> 5) & 1u) != 0;  // CPUID.(EAX=7, ECX=1):EAX[5], AVX512_BF16
  }();
  return supported;
}

#else

bool up_swiglu_bf16_supported() { return false; }

#endif

void up_swiglu_bf16(const TensorView& x, const TensorView& row_src, const TensorView& offsets, const TensorView& up,
                    int top_k, float scale, const TensorView& a, const std::optional<TensorView>& h,
                    int num_threads) {
  if (x.ndim != 2) throw_invalid("x", "expected shape [tokens, hidden]");
  if (up.ndim != 3) throw_invalid("up", "expected shape [n_ffn, 2 * ffn_size, hidden]");
  if (row_src.ndim != 1) throw_invalid("row_src", "expected shape [rows]");
  if (top_k < 1) throw_invalid("top_k", "must be >= 1");
  const int64_t tokens = x.shape[0], dim = x.shape[1], n_ffn = up.shape[0], inner = up.shape[1] / 2;
  const int64_t rows = row_src.shape[0];
  const DeviceType cpu = DeviceType::kCPU;
  check_view(x, "x", DType::kBFloat16, {tokens, dim}, cpu, -1);
  check_view(up, "up", DType::kBFloat16, {n_ffn, 2 * inner, dim}, cpu, -1);
  check_view(row_src, "row_src", DType::kInt32, {rows}, cpu, -1);
  check_view(offsets, "offsets", DType::kInt32, {n_ffn + 1}, cpu, -1);
  check_view(a, "a", DType::kBFloat16, {rows, inner}, cpu, -1);
  if (h) check_view(*h, "h", DType::kBFloat16, {rows, 2 * inner}, cpu, -1);
  if (dim % 2 != 0) throw_invalid("x", "needs an even hidden size");
  if (inner % kPanel != 0) throw_invalid("up", "needs ffn_size a multiple of 32");
  if (!up_swiglu_bf16_supported()) throw std::runtime_error("up_swiglu_bf16: this CPU or build has no AVX512-BF16");
  const int32_t* bounds = offsets.ptr<int32_t>();
  for (int64_t e = 0; e <= n_ffn; ++e) {
    if (bounds[e] < 0 || bounds[e] > rows || (e > 0 && bounds[e] < bounds[e - 1])) {
      throw_invalid("offsets", "must be non-decreasing within [0, rows]");
    }
  }
#if MOEPP_HAS_BF16_KERNEL
  const BFloat16* xs = x.ptr<BFloat16>();
  const int32_t* src = row_src.ptr<int32_t>();
  const int64_t pairs = dim / 2, panels = inner / kPanel;
  const std::vector<BFloat16> zero_row(static_cast<size_t>(dim), BFloat16{0});
  std::vector<const BFloat16*> x_rows(static_cast<size_t>(rows));
  for (int64_t r = 0; r < bounds[n_ffn]; ++r) {
    x_rows[r] = in_range(src[r], tokens * top_k) ? xs + static_cast<int64_t>(src[r] / top_k) * dim : zero_row.data();
  }
  const int workers = choose_workers(panels, num_threads, 1);
  // each worker's panel, 64-byte aligned (one cache line per packed pair row)
  std::vector<std::vector<uint32_t>> panel_buffers(workers, std::vector<uint32_t>(pairs * kPanelWords + 16));
  BFloat16* h_data = h ? h->ptr<BFloat16>() : nullptr;
  for (int64_t e = 0; e < n_ffn; ++e) {
    const int64_t lo = bounds[e], m = bounds[e + 1] - lo;
    if (m == 0) continue;
    const BFloat16* u_e = up.ptr<BFloat16>() + e * 2 * inner * dim;
    parallel_for(panels, workers, [&](int w, int64_t begin, int64_t end) {
      uint32_t* panel = align64(panel_buffers[w].data());
      for (int64_t p = begin; p < end; ++p) {
        const int64_t column = p * kPanel;
        for (int q = 0; q < 4; ++q) {  // gate columns, then the matching up columns, 16 at a time
          const int64_t first = (q < 2 ? 0 : inner) + column + (q % 2) * 16;
          pack_rows(u_e + first * dim, pairs, panel, q * 16);
        }
        PanelArgs t{x_rows.data() + lo, panel, pairs, inner, column, scale, a.ptr<BFloat16>() + lo * inner,
                    h_data == nullptr ? nullptr : h_data + lo * 2 * inner};
        panel_rows(t, m);
      }
    });
  }
#else
  (void)scale;
  (void)num_threads;
#endif
}

}  // namespace moepp::moe
