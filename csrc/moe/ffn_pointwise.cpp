#include "ffn_pointwise.h"

#include <algorithm>
#include <vector>

#include "../cpu_rows.h"
#include "../dispatch.h"
#include "../parallel.h"
#include "ffn_math.h"
#include "indices.h"

namespace moepp::moe {

namespace {

constexpr int64_t kRowsPerWorker = 64;

int64_t total_rows_cpu(const int32_t* total, int64_t rows) {
  const int64_t m = *total;
  return m < 0 ? 0 : (m > rows ? rows : m);
}

// The SwiGLU row loops (see cpu_rows.h for why they look like this).
template <typename T>
MOEPP_CPU_WIDE_CLONES void swiglu_row(const T* __restrict h, int64_t inner, T* __restrict out) {
  for (int64_t i = 0; i < inner; ++i) out[i] = from_float<T>(swiglu(to_float(h[i]), to_float(h[inner + i])));
}

template <typename T>
MOEPP_CPU_WIDE_CLONES void swiglu_backward_row(const T* __restrict h, const T* __restrict da, int64_t inner,
                                          T* __restrict dh, T* __restrict out) {
  for (int64_t i = 0; i < inner; ++i) {
    float act, dgate, dup;
    swiglu_backward(to_float(h[i]), to_float(h[inner + i]), to_float(da[i]), &act, &dgate, &dup);
    out[i] = from_float<T>(act);
    dh[i] = from_float<T>(dgate);
    dh[inner + i] = from_float<T>(dup);
  }
}

// x's row of `slot` (null for a slot outside [0, tokens * top_k), which names no token).
template <typename T>
const T* source_row(const GatherArgs<T>& a, int32_t slot) {
  return in_range(slot, a.tokens * a.top_k) ? a.x + static_cast<int64_t>(slot / a.top_k) * a.dim : nullptr;
}

}  // namespace

template <typename T>
void gather_rows_cpu(const GatherArgs<T>& a, int num_threads) {
  const int64_t m = total_rows_cpu(a.total_rows, a.rows);
  parallel_for(m, choose_workers(m, num_threads, kRowsPerWorker), [&](int, int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      // The rows come from scattered tokens, cold after the GEMMs: the next one is requested
      // while this one is written.
      if (r + 1 < end) rows::prefetch_lines(source_row(a, a.row_src[r + 1]), 0, a.dim);
      const T* src = source_row(a, a.row_src[r]);
      if (src == nullptr) {
        std::fill_n(a.out + r * a.dim, a.dim, from_float<T>(0.0f));
      } else {
        rows::scale(src, 1.0f, a.scale, a.dim, a.out + r * a.dim);
      }
    }
  });
}

template <typename T>
void swiglu_cpu(const SwigluArgs<T>& a, int num_threads) {
  const int64_t m = total_rows_cpu(a.total_rows, a.rows);
  const int64_t inner = a.inner;
  parallel_for(m, choose_workers(m, num_threads, kRowsPerWorker), [&](int, int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      if (a.da == nullptr) {
        swiglu_row(a.h + r * 2 * inner, inner, a.a + r * inner);
      } else {
        swiglu_backward_row(a.h + r * 2 * inner, a.da + r * inner, inner, a.dh + r * 2 * inner, a.a + r * inner);
      }
    }
  });
}

template <typename T>
void row_sum_cpu(const RowSumArgs<T>& a, int num_threads) {
  parallel_for(a.tokens, choose_workers(a.tokens, num_threads, kRowsPerWorker), [&](int, int64_t begin, int64_t end) {
    std::vector<float> acc(a.dim);
    for (int64_t t = begin; t < end; ++t) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int j = 0; j < a.top_k; ++j) {
        const int32_t row = a.slot_row[t * a.top_k + j];
        if (in_range(row, a.tokens * a.top_k)) {
          rows::add_scaled(a.src + static_cast<int64_t>(row) * a.dim, 1.0f, a.dim, acc.data());
        }
      }
      rows::scale(acc.data(), 1.0f, a.scale, a.dim, a.out + t * a.dim);
    }
  });
}

void gather_rows(const TensorView& x, const TensorView& row_src, const TensorView& offsets, int top_k, float scale,
                 const TensorView& out, int num_threads, uintptr_t stream) {
  if (x.ndim != 2) throw_invalid("x", "expected shape [tokens, hidden]");
  if (top_k < 1) throw_invalid("top_k", "must be >= 1");
  const DeviceType dev = x.device;
  const int32_t idx = x.device_index;
  if (row_src.ndim != 1) throw_invalid("row_src", "expected shape [rows]");
  const int64_t rows = row_src.shape[0];  // the plan's T * k, or one expert's slice of it
  check_view(row_src, "row_src", DType::kInt32, {rows}, dev, idx);
  if (offsets.ndim != 1 || offsets.shape[0] < 1) throw_invalid("offsets", "expected shape [n_ffn + 1]");
  check_view(offsets, "offsets", DType::kInt32, {offsets.shape[0]}, dev, idx);
  MOEPP_DISPATCH(x.dtype, "x", (float, Half, BFloat16), T, {
    check_view(x, "x", DTypeOf<T>::value, {x.shape[0], x.shape[1]}, dev, idx);
    check_view(out, "out", DTypeOf<T>::value, {rows, x.shape[1]}, dev, idx);
    GatherArgs<T> a{x.ptr<T>(), row_src.ptr<int32_t>(), offsets.ptr<int32_t>() + offsets.shape[0] - 1, rows,
                    x.shape[1], x.shape[0], top_k, scale, out.ptr<T>()};
    if (dev == DeviceType::kCUDA) {
      gather_rows_cuda(a, idx, stream);
    } else {
      gather_rows_cpu(a, num_threads);
    }
  });
}

namespace {

void swiglu_any(const TensorView& h, const TensorView* da, const TensorView& offsets, const TensorView* dh,
                const TensorView& out_a, int num_threads, uintptr_t stream) {
  if (h.ndim != 2 || h.shape[1] % 2 != 0) throw_invalid("h", "expected shape [rows, 2 * ffn_size]");
  const DeviceType dev = h.device;
  const int32_t idx = h.device_index;
  const int64_t rows = h.shape[0];
  const int64_t inner = h.shape[1] / 2;
  if (offsets.ndim != 1 || offsets.shape[0] < 1) throw_invalid("offsets", "expected shape [n_ffn + 1]");
  check_view(offsets, "offsets", DType::kInt32, {offsets.shape[0]}, dev, idx);
  MOEPP_DISPATCH(h.dtype, "h", (float, Half, BFloat16), T, {
    const DType dt = DTypeOf<T>::value;
    check_view(h, "h", dt, {rows, 2 * inner}, dev, idx);
    check_view(out_a, "a", dt, {rows, inner}, dev, idx);
    if (da != nullptr) {
      check_view(*da, "da", dt, {rows, inner}, dev, idx);
      check_view(*dh, "dh", dt, {rows, 2 * inner}, dev, idx);
    }
    SwigluArgs<T> a{h.ptr<T>(), da ? da->ptr<T>() : nullptr, offsets.ptr<int32_t>() + offsets.shape[0] - 1, rows,
                    inner, dh ? dh->ptr<T>() : nullptr, out_a.ptr<T>()};
    if (dev == DeviceType::kCUDA) {
      swiglu_cuda(a, idx, stream);
    } else {
      swiglu_cpu(a, num_threads);
    }
  });
}

}  // namespace

void swiglu_forward(const TensorView& h, const TensorView& offsets, const TensorView& a, int num_threads,
                    uintptr_t stream) {
  swiglu_any(h, nullptr, offsets, nullptr, a, num_threads, stream);
}

void swiglu_backward(const TensorView& h, const TensorView& da, const TensorView& offsets, const TensorView& dh,
                     const TensorView& a, int num_threads, uintptr_t stream) {
  swiglu_any(h, &da, offsets, &dh, a, num_threads, stream);
}

void row_sum(const TensorView& src, const TensorView& slot_row, float scale, const TensorView& out, int num_threads,
             uintptr_t stream) {
  if (slot_row.ndim != 2) throw_invalid("slot_row", "expected shape [tokens, top_k]");
  const DeviceType dev = src.device;
  const int32_t idx = src.device_index;
  const int64_t tokens = slot_row.shape[0];
  const int64_t k = slot_row.shape[1];
  if (src.ndim != 2 || src.shape[0] != tokens * k) throw_invalid("src", "expected shape [tokens * top_k, hidden]");
  check_view(slot_row, "slot_row", DType::kInt32, {tokens, k}, dev, idx);
  MOEPP_DISPATCH(src.dtype, "src", (float, Half, BFloat16), T, {
    check_view(src, "src", DTypeOf<T>::value, {tokens * k, src.shape[1]}, dev, idx);
    check_view(out, "out", DTypeOf<T>::value, {tokens, src.shape[1]}, dev, idx);
    RowSumArgs<T> a{src.ptr<T>(), slot_row.ptr<int32_t>(), tokens, src.shape[1], static_cast<int>(k), scale,
                    out.ptr<T>()};
    if (dev == DeviceType::kCUDA) {
      row_sum_cuda(a, idx, stream);
    } else {
      row_sum_cpu(a, num_threads);
    }
  });
}

#define MOEPP_INSTANTIATE(T)                                   \
  template void gather_rows_cpu<T>(const GatherArgs<T>&, int); \
  template void swiglu_cpu<T>(const SwigluArgs<T>&, int);      \
  template void row_sum_cpu<T>(const RowSumArgs<T>&, int);
MOEPP_INSTANTIATE(float)
MOEPP_INSTANTIATE(Half)
MOEPP_INSTANTIATE(BFloat16)
#undef MOEPP_INSTANTIATE

}  // namespace moepp::moe
